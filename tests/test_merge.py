"""`livr-ds export --merge` streams: the merged tensors are PEFT's merge_and_unload of the export
(bit for bit in float32), under the names, config.json and index transformers' save_pretrained
writes, while the merging process holds about one tensor rather than the model.

The reference is computed here with PEFT alone: the export loaded onto its base
(`load_export`: base in float32, table grown to the tokenizer, PeftModel) and `merge_and_unload()`,
saved with save_pretrained (transformers' names)."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from livr_ds.config import load_config
from livr_ds.models import get_adapter
from tests.conftest import TINY_SPARE_ROWS

K = 4
# (family, tied head, spare table rows): the fixtures' models, and an untied head whose table has
# spare rows (the latents take 2 spare rows and grow the table by 2).
CASES = [("qwen2_5_vl", True, TINY_SPARE_ROWS), ("qwen2_5_vl", False, 0), ("qwen2_5_vl", False, TINY_SPARE_ROWS),
         ("qwen3_vl", True, TINY_SPARE_ROWS), ("qwen3_vl", False, 0), ("llava_onevision", False, 0)]
IDS = [f"{f}-{'tied' if t else 'untied'}-spare{s}" for f, t, s in CASES]


def make_export(base: str, family: str, out: str, dtype: str = "float32", seed: int = 1) -> SimpleNamespace:
    """An adapter export of `base` with random LoRA B and latent rows (both start neutral)."""
    from livr_ds.export import save_export
    from livr_ds.modeling import build_backbone

    cfg = load_config(None, [f"model.family={family}", f"model.path={base}", f"latents.num={K}",
                             "lora.dropout=0.0", f"model.dtype={dtype}"])
    bb = build_backbone(cfg, policy="standard")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif name == "latent_rows.weight":
                p.normal_(0, 0.5)
    rows = bb.model.latent_rows.weight.detach().float().clone()
    return SimpleNamespace(dir=save_export(bb, cfg, 1, out), latent_ids=bb.latent_ids, rows=rows)


def reference(export_dir: str, out: str):
    """PEFT's merge in float32, written by save_pretrained: (model, name -> tensor, config.json)."""
    from livr_ds.export import load_export

    merged = load_export(export_dir, dtype=torch.float32).model.peft_model.merge_and_unload().eval()
    merged.save_pretrained(out)
    tensors = {}
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(out, name)))
    with open(os.path.join(out, "config.json")) as f:
        return merged, tensors, json.load(f)


def shard_tensors(path: str) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out[name] = {k: f.get_tensor(k) for k in f.keys()}
    return out


def streamed(caplog, *args, **kwargs) -> str:
    """merge_export, failing if it fell back to the in-memory merge."""
    from livr_ds.export import merge_export

    with caplog.at_level(logging.WARNING, logger="livr_ds.export.merge"):
        out = merge_export(*args, **kwargs)
    assert not [r for r in caplog.records if "in memory" in r.getMessage()], caplog.text
    return out


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request, tiny_dirs, tiny_tied_dirs, tmp_path_factory):
    family, tied, spare = request.param
    tmp = tmp_path_factory.mktemp(f"merge_{family}_{tied}_{spare}")
    if tied:
        base = tiny_tied_dirs[family]
    elif spare == 0:
        base = tiny_dirs[family]
    else:
        base = get_adapter(family).write_tiny(str(tmp / "base"), seed=0, spare_rows=spare)
    export = make_export(base, family, str(tmp / "final"))
    model, tensors, config = reference(export.dir, str(tmp / "reference"))
    return SimpleNamespace(family=family, tied=tied, base=base, export=export, tmp=tmp, ref=model,
                           ref_tensors=tensors, ref_config=config)


def test_streamed_merge_equals_peft_merge_in_float32(case, caplog):
    from transformers import AutoModelForImageTextToText

    out = streamed(caplog, case.export.dir, str(case.tmp / "merged"), dtype="float32")
    (got,) = shard_tensors(out).values()
    assert sorted(got) == sorted(case.ref_tensors)  # save_pretrained's names: same set, none extra
    for name, want in case.ref_tensors.items():
        assert got[name].shape == want.shape and got[name].dtype == torch.float32, name
        assert torch.equal(got[name], want), name  # same float32 arithmetic as PEFT's merge: exact
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config == case.ref_config
    rows = case.ref.get_input_embeddings().weight.shape[0]
    assert config["text_config"]["vocab_size"] == rows
    # The trained rows are in the table; an untied head's rows beyond the base table are zero.
    latent = sorted(set(case.export.latent_ids))
    table = next(t for n, t in got.items() if n.endswith("embed_tokens.weight"))
    assert torch.equal(table[latent], case.export.rows)
    with open(os.path.join(case.base, "config.json")) as f:
        base_rows = json.load(f)["text_config"]["vocab_size"]
    heads = [t for n, t in got.items() if n.endswith("lm_head.weight")]
    assert len(heads) == (0 if case.tied else 1)
    if heads and rows > base_rows:
        assert not heads[0][base_rows:].any()

    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == case.tied
    ids = torch.tensor([[*range(20, 40), *case.export.latent_ids]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.equal(logits, case.ref(input_ids=ids).logits)
        # It can fail: the base model, without LoRA and the trained rows, gives other logits.
        base = AutoModelForImageTextToText.from_pretrained(case.base).eval()
        assert not torch.allclose(logits[:, :20, :base_rows], base(input_ids=ids[:, :20]).logits, atol=1e-3)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_bf16_merge_is_sharded_with_an_index(family, tiny_dirs, tmp_path, caplog):
    export = make_export(tiny_dirs[family], family, str(tmp_path / "final"), dtype="bfloat16")
    out = streamed(caplog, export.dir, str(tmp_path / "merged"), max_shard_size="100KB")  # auto: the run's bf16
    shards = shard_tensors(out)
    assert len(shards) >= 3
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    names = [n for tensors in shards.values() for n in tensors]
    assert len(names) == len(set(names))  # every tensor in exactly one shard
    assert index["weight_map"] == {n: file for file, tensors in shards.items() for n in tensors}
    assert index["metadata"]["total_size"] == sum(t.nbytes for ts in shards.values() for t in ts.values())
    for file, tensors in shards.items():  # each shard's tensors within the limit (save_pretrained's rule)
        assert sum(t.nbytes for t in tensors.values()) <= 100_000 or len(tensors) == 1, file
    # bf16, and equal to PEFT's float32 merge cast once to bf16 (the update is added in float32)
    _, ref, _ = reference(export.dir, str(tmp_path / "reference"))
    got = {n: t for ts in shards.values() for n, t in ts.items()}
    assert sorted(got) == sorted(ref)
    for name, want in ref.items():
        assert got[name].dtype == torch.bfloat16, name
        assert torch.equal(got[name], want.to(torch.bfloat16)), name
    with open(os.path.join(out, "livr.json")) as f:
        assert json.load(f)["merged_dtype"] == "bfloat16"


# A Qwen2.5-VL of about 380 MB in bf16 (hidden 1024, 8 layers, 32,768 table rows, untied head),
# merged in a subprocess that reports its peak RSS over a baseline taken after the imports. The
# peak is VmHWM, this process's own high-water mark: ru_maxrss also keeps the high-water mark of
# the memory the process had before exec, i.e. of the forked test process (gigabytes here).
MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch, transformers
    import livr_ds.export.merge as merge

    def hwm_kib():
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])

    base = hwm_kib()
    merge.merge_export(sys.argv[1], sys.argv[2], max_shard_size="50MB", streaming=sys.argv[3] == "stream")
    print(json.dumps({"baseline_kib": base, "peak_kib": hwm_kib(),
                      "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def write_wide_qwen(out: str) -> int:
    """A tiny-family Qwen2.5-VL made wider and deeper, random bf16 weights in 100 MB shards; returns
    the weights' bytes."""
    adapter = get_adapter("qwen2_5_vl")
    adapter.write_tiny(out, seed=0)
    config = adapter.model_class.config_class.from_pretrained(out)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 1024, 4096, 8
    text.num_attention_heads, text.num_key_value_heads, text.vocab_size = 16, 4, 32768
    text.layer_types = ["full_attention"] * 8
    config.vision_config.out_hidden_size = 1024
    torch.manual_seed(0)
    model = adapter.model_class(config).to(torch.bfloat16)
    os.remove(os.path.join(out, "model.safetensors"))
    model.save_pretrained(out, max_shard_size="100MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_streamed_merge_peak_memory_is_far_below_the_model(tmp_path):
    weights = write_wide_qwen(str(tmp_path / "base"))
    assert weights > 350e6
    export = make_export(str(tmp_path / "base"), "qwen2_5_vl", str(tmp_path / "final"), dtype="bfloat16")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, export.dir, str(tmp_path / "merged"), "stream"],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = (rss["peak_kib"] - rss["baseline_kib"]) * 1024
    # The in-memory merge holds the whole model (measured: more than the weights' size, see
    # docs/performance.md); the streaming one its largest tensor and the adapter.
    assert growth < 0.4 * weights, f"peak RSS grew {growth / 1e6:.0f} MB merging {weights / 1e6:.0f} MB of weights"
    assert len([f for f in os.listdir(tmp_path / "merged") if f.endswith(".safetensors")]) >= 8
