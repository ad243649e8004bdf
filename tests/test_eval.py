"""Evaluation: answer parsing, the four test-time modes, exactly-once distributed eval, the
attention probe, results files and `livr-ds table`.

Models are tiny random Qwen2.5-VL checkpoints; the LIVR exports are written by the project's own
`save_export` (no training needed to test evaluation): one LoRA adapter + K = 4 latent rows, one
full-weight ("merged") export.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from livr_ds import segments
from livr_ds.evaluation import cli as eval_cli
from livr_ds import inference
from livr_ds.evaluation import loop, probes, scoring
from livr_ds.evaluation.scoring import is_correct, parse_choice, parse_count
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(600)
K = 4


# ---- answer parsing ------------------------------------------------------------------------
COLOURS = ["red", "green", "blue", "yellow"]
CHOICE_CASES = [
    ("(B)", "B"), ("B", "B"), ("B.", "B"), ("B)", "B"), ("B: green", "B"), ("(B) green", "B"),
    ("The answer is (B)", "B"),  # never "T": only valid choice letters count
    ("The answer is (B).", "B"), ("The answer is B.", "B"), ("Answer: B", "B"), ("answer: (C) blue", "C"),
    ("The answer is: D", "D"), ("I think the answer is (C), blue.", "C"),
    ("green", "B"), ("Green.", "B"), ("  yellow  ", "D"),  # the option text
    ("(E)", None), ("E", None), ("The answer is (E)", None),  # not among the 4 choices
    ("", None), ("I am not sure", None), ("The square", None), ("purple", None),
]
CHOICE_KNOWN_BAD = [  # gaps the first parser had, fixed since
    ("The answer is a green square", None),  # reads the article "a" as choice A; should not parse
    ("A or B", None),  # ambiguous: two letters, should not parse
    ("**B**", "B"),  # markdown bold
    ("b", "B"),  # lower-case bare letter
]


@pytest.mark.parametrize("text,expected", CHOICE_CASES)
def test_parse_choice(text, expected):
    assert parse_choice(text, COLOURS) == expected


@pytest.mark.parametrize("text,expected", CHOICE_KNOWN_BAD)
def test_parse_choice_former_gaps(text, expected):
    assert parse_choice(text, COLOURS) == expected


@pytest.mark.parametrize("text,expected", [
    ("3", 3), ("3.", 3), (" 12 ", 12), ("There are 3 red circles.", 3), ("3 circles", 3),
    ("three", 3), ("Three.", 3), ("I count five squares", 5), ("zero", 0), ("ten", 10),
    ("2 or 3", 2),  # the first integer
    ("", None), ("none", None), ("many", None), ("(A)", None),
])
def test_parse_count(text, expected):
    assert parse_count(text) == expected


def test_is_correct_scores_parsed_answers():
    assert is_correct("The answer is (B)", "B", COLOURS) == (True, "B")
    assert is_correct("green", "B", COLOURS) == (True, "B")
    assert is_correct("(A)", "B", COLOURS) == (False, "A")
    assert is_correct("gibberish", "B", COLOURS) == (False, None)
    assert is_correct("four", "4", []) == (True, "4")
    assert is_correct("There are 5", "4", []) == (False, "5")
    assert is_correct("lots", "4", []) == (False, None)


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """2 tasks x 5 test samples (10: an odd number of global batches at 2 ranks x 4)."""
    from livr_ds.data.demo import make_demo

    out = str(tmp_path_factory.mktemp("eval_demo"))
    make_demo(out, seed=0, n_train=0, n_val=0, n_test=5, tasks=["counting", "localization"])
    return out


def _export(tiny_dir, out, trainable):
    from livr_ds.config import load_config
    from livr_ds.modeling import build_backbone
    from livr_ds.export import save_export

    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      [f"model.path={tiny_dir}", f"latents.num={K}", f"model.trainable={trainable}", "stage=2"])
    backbone = build_backbone(cfg, policy="standard")
    return save_export(backbone, cfg, 2, out, extra={"epoch": 1, "global_step": 1})


@pytest.fixture(scope="module")
def lora_export(tiny_dirs, tmp_path_factory):
    return _export(tiny_dirs["qwen2_5_vl"], str(tmp_path_factory.mktemp("exp") / "lora"), "lora")


@pytest.fixture(scope="module")
def full_export(tiny_dirs, tmp_path_factory):
    return _export(tiny_dirs["qwen2_5_vl"], str(tmp_path_factory.mktemp("exp") / "full"), "all")


def eval_args(argv):
    p = argparse.ArgumentParser()
    eval_cli.add_eval_arguments(p)
    return p.parse_args(argv)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---- modes ---------------------------------------------------------------------------------
def test_modes_change_exactly_the_input_and_mask(lora_export, demo):
    """Record what evaluate() hands the model: per mode, the latents in the input and the mask of
    the prefill (the prompt batch, run once; generation then decodes against the KV cache)."""
    backbone = loop.load_model(lora_export)
    assert len(backbone.latent_ids) == K
    model = backbone.model
    batches, masks = [], []
    original = model.position_ids

    def recording(batch):
        batches.append(batch)
        return original(batch)

    model.position_ids = recording
    hook = model.hf_model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
    feeds = {}
    for mode in inference.MODES:
        batches.clear()
        masks.clear()
        loop.evaluate(backbone, [demo], mode, batch_size=4, max_new_tokens=2, max_samples=3)
        batch, policy = batches[0], inference.MODES[mode].policy  # the first prefill: prompt (+ latents) only
        feeds[mode] = batch
        # The mask the model was given is exactly the policy's rule on this batch.
        assert torch.equal(masks[0], segments.dense_mask(batch["segment_ids"], batch["doc_ids"], policy))
        assert torch.equal(model.attention_mask(batch, policy), masks[0])
    assert inference.MODES["bottleneck"].policy == "bottleneck" == inference.MODES["bottleneck_no_latents"].policy
    assert inference.MODES["standard"].policy == "standard" == inference.MODES["no_latents"].policy

    for with_lat, without in (("standard", "no_latents"), ("bottleneck", "bottleneck_no_latents")):
        a, b = feeds[with_lat], feeds[without]
        for row in range(a["input_ids"].shape[0]):
            ids_a = a["input_ids"][row][a["segment_ids"][row] != segments.PAD].tolist()
            seg_a = a["segment_ids"][row][a["segment_ids"][row] != segments.PAD].tolist()
            ids_b = b["input_ids"][row][b["segment_ids"][row] != segments.PAD].tolist()
            # exactly the K latent tokens, at the end of the prompt, are removed; nothing else changes
            assert ids_a[-K:] == backbone.latent_ids and seg_a[-K:] == [segments.LATENT] * K
            assert ids_a[:-K] == ids_b
            assert segments.LATENT not in b["segment_ids"][row].tolist()
        assert torch.equal(a["pixel_values"], b["pixel_values"])

    # Under the bottleneck the generated answer tokens cannot see the image; the latents can.
    batch = feeds["bottleneck"]
    mask = segments.dense_mask(batch["segment_ids"], batch["doc_ids"], "bottleneck")[0, 0]
    seg = batch["segment_ids"][0]
    img, lat, prm = seg == segments.IMAGE, seg == segments.LATENT, seg == segments.PROMPT
    assert not mask[prm][:, img].any()
    assert mask[lat][:, img].any()
    hook.remove()
    model.position_ids = original


# ---- KV-cached generation == the recompute reference -----------------------------------------
def _backbone(tiny_dir, family, backend="sdpa"):
    from livr_ds.config import load_config
    from livr_ds.modeling import build_backbone

    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      [f"model.family={family}", f"model.path={tiny_dir}", f"latents.num={K}", "stage=2",
                       f"model.attn_backend={backend}"])
    backbone = build_backbone(cfg, policy="standard")
    backbone.model.eval()
    return backbone


def _mixed_samples(demo, n):
    """n samples, alternating between the two tasks: prompts of different lengths."""
    every = [s for _, ss in loop.iter_samples([demo], "test", 0, 1, 10) for s in ss]
    by_task = [[s for s in every if s.task == t] for t in sorted({s.task for s in every})]
    return [by_task[i % 2][i // 2] for i in range(n)]


@pytest.mark.parametrize("family,backend", [("qwen2_5_vl", "sdpa"), ("qwen2_5_vl", "eager"), ("qwen3_vl", "sdpa"),
                                            ("llava_onevision", "sdpa"), ("qwen2_5_vl", "flex")])
def test_cached_generation_equals_recompute(tiny_dirs, demo, family, backend):
    """Prefill once + one cached step per token gives exactly the reference loop's token ids
    (the whole padded sequence recomputed per token), in every eval mode, on a right-padded batch
    whose rows end at different steps; and it runs the vision tower once per call."""
    from livr_ds.evaluation import generate

    if backend == "flex":  # transformers compiles flex; recompiling for another model in the same
        torch._dynamo.reset()  # process hits an inductor CPU codegen bug (cur_kvSplitSize8), see test_model
    backbone = _backbone(tiny_dirs[family], family, backend)
    model = backbone.model
    samples = _mixed_samples(demo, 4)
    calls = []
    tower = backbone.adapter.vision_modules(model.hf_model)[0]
    hook = tower.register_forward_hook(lambda *a: calls.append(1))
    for name, mode in inference.MODES.items():
        collator = loop.make_collator(backbone, mode, with_answer=False)
        lengths = [len(collator.encode(s).input_ids) for s in samples]
        assert len(set(lengths)) > 1  # right padding is exercised
        logits = []
        head = model.hf_model.lm_head.register_forward_hook(lambda mod, args, out: logits.append(out.float().clone()))
        reference = generate.greedy_ids(model, collator, samples, mode.policy, 5, use_cache=False)
        full, logits = logits, []
        cached = generate.greedy_ids(model, collator, samples, mode.policy, 5)
        head.remove()
        assert cached == reference and all(len(r) == 5 for r in reference), name
        # The LM head saw one position per row per step; those logits are the reference's, at each
        # row's own last position (tokens alone could agree despite wrong positions or masks).
        assert [tuple(x.shape) for x in logits] == [(len(samples), full[0].shape[-1])] * 5
        rows = torch.arange(len(samples))
        for t in range(5):
            at = full[t][rows, torch.tensor(lengths) - 1 + t]
            assert torch.allclose(logits[t], at, atol=1e-4, rtol=1e-4), (name, t, (logits[t] - at).abs().max())
        # A random model never says <eos>: call one of its tokens <eos>, so rows finish at different
        # steps (finished rows leave the cache while the others go on).
        for tok in sorted({t for row in reference for t in row[1:]}):
            collator.eos_id = tok
            reference = generate.greedy_ids(model, collator, samples, mode.policy, 5, use_cache=False)
            if len({len(r) for r in reference}) > 1 and max(map(len, reference)) > 1:
                break
        assert len({len(r) for r in reference}) > 1, name
        calls.clear()
        cached = generate.greedy_ids(model, collator, samples, mode.policy, 5)
        assert len(calls) == 1, name  # the vision tower ran in the prefill only
        assert cached == reference, name
        # ZeRO-3 lockstep: finished rows stay in the cache (every step feeds all rows, as every
        # rank must run the same forwards), and the tokens are the same.
        widths = []
        head = model.hf_model.lm_head.register_forward_hook(lambda mod, args, out: widths.append(out.shape[0]))
        model.lockstep = True
        try:
            assert generate.greedy_ids(model, collator, samples, mode.policy, 5) == reference, name
        finally:
            model.lockstep = False
            head.remove()
        # the prefill, then one step per token until the longest row is done (at most 4 more)
        assert widths == [len(samples)] * (1 + min(max(map(len, reference)), 4)), (name, widths)
    calls.clear()
    generate.greedy_ids(model, collator, samples, "standard", 3, use_cache=False)
    assert len(calls) == 3  # the reference reruns it for every token
    # flex (training's GPU kernel; the reference above ran on it): generation borrowed sdpa and gave it back
    assert backbone.adapter.text_config(model.hf_model)._attn_implementation == (
        "flex_attention" if backend == "flex" else backend)
    hook.remove()


def test_cached_decode_masks_follow_the_segment_rule(tiny_dirs, demo):
    """Each decode step's mask row is the segment rule for an ANSWER token after the cache: no
    padding, and under the bottleneck no image token; positions continue each row's own."""
    from livr_ds.evaluation import generate

    backbone = _backbone(tiny_dirs["qwen2_5_vl"], "qwen2_5_vl")
    model = backbone.model
    samples = _mixed_samples(demo, 3)
    seen = []
    hook = model.hf_model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["input_ids"].shape[1], kwargs["attention_mask"],
                                               kwargs["position_ids"])), with_kwargs=True)
    for policy in ("standard", "bottleneck"):
        seen.clear()
        collator = loop.make_collator(backbone, inference.MODES[policy], with_answer=False)
        generate.greedy_ids(model, collator, samples, policy, 3)
        batch = collator.pad([collator.encode(s) for s in samples])
        seg = batch["segment_ids"]
        full = segments.dense_mask(seg, batch["doc_ids"], policy)
        assert torch.equal(segments.dense_mask(seg, batch["doc_ids"], policy, q_start=5), full[:, :, 5:])
        (L, prefill_mask, prefill_pos), *steps = seen
        assert L == seg.shape[1] and len(steps) == 2
        last = torch.tensor([len(collator.encode(s).input_ids) - 1 for s in samples])
        for t, (q, mask, pos) in enumerate(steps):
            assert q == 1 and mask.shape == (3, 1, 1, L + t + 1) and mask.dtype == torch.bool
            row = mask[:, 0, 0]
            assert not row[:, :L][seg == segments.PAD].any()
            assert row[:, L:].all()  # earlier answer tokens and itself
            assert row[:, :L][seg == segments.IMAGE].any().item() == (policy == "standard")
            assert row[:, :L][(seg == segments.PROMPT) | (seg == segments.LATENT)].all()
            assert torch.equal(pos[:, :, 0], prefill_pos[:, torch.arange(3), last] + 1 + t)
    hook.remove()


# ---- one loop for eval and validation; defaults ----------------------------------------------
def test_evaluate_takes_an_engine_and_shard_sources(lora_export, demo):
    """Validation's call: the model inside a (DeepSpeed-like) engine, sources as ShardSource or
    config DataSource objects; the records equal the CLI's, the model's train mode comes back, and
    gather_accuracy (one process: no collective) is accuracy_by_task over them."""
    import dataclasses

    from livr_ds.config import DataSource
    from livr_ds.data.sources import ShardSource

    class Engine(torch.nn.Module):  # what DeepSpeed hands back: the model is engine.module
        def __init__(self, module):
            super().__init__()
            self.module = module

    backbone = loop.load_model(lora_export)
    kw = dict(batch_size=3, max_new_tokens=2, max_samples=5)
    expected, _ = loop.evaluate(backbone, [demo], "bottleneck", **kw)
    engine = Engine(backbone.model)
    engine.train()
    wrapped = dataclasses.replace(backbone, model=engine)
    got, _ = loop.evaluate(wrapped, [ShardSource(demo, split="test")], "bottleneck", **kw)
    assert got == expected and len(got) == 5
    assert backbone.model.training  # evaluate() put it in eval mode and gave it back as it was
    got, _ = loop.evaluate(wrapped, [DataSource(path=demo, weight=1.0)], "bottleneck", split="test", **kw)
    assert got == expected
    assert loop.gather_accuracy(got) == scoring.accuracy_by_task(expected)


def test_a_sample_the_processor_refuses_is_a_named_error_or_skipped(lora_export, tmp_path):
    """Generation and likelihood scoring collate outside the loader: a sample the processor refuses
    (a 4000 x 10 image) is a DataError naming shard:key, or with on_error: skip left out of the
    records while every other sample is evaluated as without it."""
    from livr_ds.data.schema import DataError
    from tests.conftest import REFUSED_KEY, write_shards_with_a_refused_image

    data = write_shards_with_a_refused_image(tmp_path / "data")
    backbone = loop.load_model(lora_export)
    kw = dict(batch_size=3, max_new_tokens=2)
    for how in ("generate", "likelihood"):
        with pytest.raises(DataError, match=rf"test-\d+\.tar:{REFUSED_KEY}: the processor refused the sample "
                                            r"\(ValueError: [^)]*aspect ratio"):
            loop.evaluate(backbone, [data], "standard", scoring=how, **kw)
        got, _ = loop.evaluate(backbone, [data], "standard", scoring=how, on_error="skip", **kw)
        assert [r["key"] for r in got] == [f"test-{i}" for i in range(7) if i != 2]
        assert [r["index"] for r in got] == [0, 1, 3, 4, 5, 6]
    # The others are evaluated exactly as in a batch without the refused one.
    alone, _ = loop.evaluate(backbone, [data], "standard", on_error="skip", batch_size=1, max_new_tokens=2)
    assert [r["prediction"] for r in alone] == [r["prediction"] for r in
                                                loop.evaluate(backbone, [data], "standard", on_error="skip", **kw)[0]]


def test_max_tokens_defaults_to_the_exports(lora_export, demo, tmp_path):
    """--max-tokens unset: the limit training saved in livr.json (demo.yaml: 512), enforced; an
    explicit flag wins; zero-shot falls back to 8192 (test_zero_shot_results_file_and_provenance)."""
    import shutil

    from livr_ds.data.collate import SampleTooLong

    assert eval_args(["--ckpt", "c", "--data", "d", "--out", "o.json"]).max_tokens is None
    with open(os.path.join(lora_export, "livr.json")) as f:
        assert json.load(f)["max_tokens"] == 512
    common = ["--data", demo, "--mode", "standard", "--max-samples", "2", "--max-new-tokens", "1"]
    res = eval_cli.run(eval_args(["--ckpt", lora_export, *common, "--out", str(tmp_path / "a.json")]))
    assert res["provenance"]["max_tokens"] == 512
    small = str(tmp_path / "small")
    shutil.copytree(lora_export, small)
    with open(os.path.join(small, "livr.json")) as f:
        meta = json.load(f)
    with open(os.path.join(small, "livr.json"), "w") as f:
        json.dump({**meta, "max_tokens": 40}, f)  # below every demo prompt
    with pytest.raises(SampleTooLong, match="max_tokens=40"):
        eval_cli.run(eval_args(["--ckpt", small, *common, "--out", str(tmp_path / "b.json")]))
    res = eval_cli.run(eval_args(["--ckpt", small, *common, "--max-tokens", "600", "--out", str(tmp_path / "c.json")]))
    assert res["provenance"]["max_tokens"] == 600


def test_device_and_dtype_defaults(monkeypatch):
    """auto: the accelerator (cuda:LOCAL_RANK) in bfloat16 when there is one, else CPU float32."""
    args = eval_args(["--ckpt", "c", "--data", "d", "--out", "o.json"])
    assert (args.device, args.dtype) == ("auto", "auto")
    if not torch.cuda.is_available():
        assert loop.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA"):
            loop.resolve_device("cuda")
    assert loop.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loop.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert loop.resolve_device("auto") == torch.device("cuda", 1)
    assert loop.resolve_device("cpu") == torch.device("cpu")
    assert loop.resolve_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16
    assert loop.resolve_dtype("float32", torch.device("cuda", 1)) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert loop.resolve_dtype("auto", torch.device("cuda", 1)) == torch.float32


# ---- results files, zero-shot ---------------------------------------------------------------
def test_zero_shot_results_file_and_provenance(tiny_dirs, demo, tmp_path, monkeypatch):
    from livr_ds import distributed as dist

    def no_process_group(*a, **k):
        raise AssertionError("one process must not initialise torch.distributed")

    monkeypatch.setattr(dist, "init", no_process_group)
    out = str(tmp_path / "zs.json")
    res = eval_cli.run(eval_args(["--base-model", tiny_dirs["qwen2_5_vl"], "--family", "qwen2_5_vl", "--data", demo,
                                  "--mode", "standard", "--out", out, "--batch-size", "4", "--max-new-tokens", "3"]))
    with open(out) as f:
        saved = json.load(f)
    assert saved["mode"] == "standard" and saved["n"] == 10
    assert set(saved["per_task"]) == {"counting", "localization"}
    assert all(v["n"] == 5 and 0 <= v["accuracy"] <= 100 for v in saved["per_task"].values())
    assert saved["mean"] == pytest.approx(sum(v["accuracy"] for v in saved["per_task"].values()) / 2)
    prov = saved["provenance"]
    assert prov["zero_shot"] is True and prov["ckpt"] is None and prov["num_latents"] == 0
    assert prov["max_tokens"] == loop.DEFAULT_MAX_TOKENS == 8192
    if not torch.cuda.is_available():
        assert (prov["device"], prov["dtype"]) == ("cpu", "float32")
    with open(os.path.join(demo, "manifest.json"), "rb") as f:
        assert prov["data"][0]["manifest_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert prov["pixels"]["min_pixels"] == 28 * 28 * 4 and prov["pixels"]["max_pixels"] == 112 * 112
    records = read_jsonl(eval_cli.predictions_path(out))
    assert saved["predictions"] == os.path.basename(eval_cli.predictions_path(out))
    assert [r["index"] for r in records] == list(range(10))
    assert len({r["key"] for r in records}) == 10
    assert saved["parse_failures"]["total"] == sum(r["parsed"] is None for r in records)
    for task, v in saved["per_task"].items():
        rs = [r for r in records if r["task"] == task]
        assert v["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in rs) / len(rs))
    assert res["mean"] == saved["mean"]


def test_merged_export_evaluates_and_records_checkpoint(full_export, demo, tmp_path):
    out = str(tmp_path / "full.json")
    eval_cli.run(eval_args(["--ckpt", full_export, "--data", demo, "--mode", "bottleneck", "--out", out,
                            "--batch-size", "5", "--max-new-tokens", "2", "--max-samples", "4", "--name", "full"]))
    with open(out) as f:
        saved = json.load(f)
    assert saved["name"] == "full" and saved["mode"] == "bottleneck" and saved["policy"] == "bottleneck"
    assert saved["n"] == 4 and saved["provenance"]["max_samples"] == 4
    prov = saved["provenance"]
    assert prov["ckpt"] == os.path.abspath(full_export) and prov["livr"]["merged"] is True
    assert prov["livr"]["latents"]["num"] == K and prov["latents_fed"] == K


def test_likelihood_scoring_is_forced_choice(lora_export, demo, tmp_path):
    """--scoring likelihood: per option, the summed log-likelihood of its answer "(X)" <eos>
    (== minus the model's own answer NLL x answer tokens); the best option is the prediction;
    open-ended samples are still generated."""
    out = str(tmp_path / "lik.json")
    res = eval_cli.run(eval_args(["--ckpt", lora_export, "--data", demo, "--mode", "bottleneck", "--out", out,
                                  "--scoring", "likelihood", "--batch-size", "4", "--max-new-tokens", "2"]))
    assert res["scoring"] == "likelihood" and res["provenance"]["generation"]["scoring"] == "likelihood"
    records = read_jsonl(eval_cli.predictions_path(out))
    mc = [r for r in records if r["task"] == "localization"]
    assert len(mc) == 5 and all(len(r["option_loglik"]) == 2 and r["parsed"] in "AB" for r in mc)
    assert res["parse_failures"]["per_task"]["localization"] == 0
    assert all("option_loglik" not in r for r in records if r["task"] == "counting")
    backbone = loop.load_model(lora_export)
    collator = loop.make_collator(backbone, inference.MODES["bottleneck"], with_answer=True)
    sample = next(s for _, ss in loop.iter_samples([demo], "test", 0, 1, 10) for s in ss if s.choices)
    rec = next(r for r in mc if r["key"] == sample.key)
    import dataclasses

    for j, letter in enumerate("AB"):
        batch = collator([dataclasses.replace(sample, answer=letter)])
        n_answer = int((batch["labels"] != -100).sum())
        with torch.no_grad():
            nll = backbone.model(batch, "bottleneck").item()
        assert rec["option_loglik"][j] == pytest.approx(-nll * n_answer, rel=1e-4)
    assert rec["parsed"] == "AB"[max(range(2), key=rec["option_loglik"].__getitem__)]


# ---- distributed == single process --------------------------------------------------------
def test_two_ranks_equal_one_process(lora_export, demo, tmp_path):
    common = ["--ckpt", lora_export, "--data", demo, "--mode", "standard", "--batch-size", "4",
              "--max-new-tokens", "3", "--probe", "attention", "--probe-images", "1"]
    single = str(tmp_path / "single.json")
    eval_cli.run(eval_args(common + ["--out", single]))
    multi = str(tmp_path / "multi.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                        str(29300 + os.getpid() % 400), os.path.join(ROOT, "launch", "eval.py"), *common,
                        "--out", multi], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = read_jsonl(eval_cli.predictions_path(single)), read_jsonl(eval_cli.predictions_path(multi))
    # 10 samples on 2 ranks x 4: 6 padded duplicates were dropped, each sample exactly once.
    assert len(b) == 10 and [x["index"] for x in b] == list(range(10))
    for x, y in zip(a, b):
        v1, v2 = x.pop("answer_to_latent"), y.pop("answer_to_latent")
        assert x == y
        assert v1 == pytest.approx(v2, rel=1e-5)
    with open(single) as f:
        s = json.load(f)
    with open(multi) as f:
        m = json.load(f)
    assert s["per_task"] == m["per_task"] and s["mean"] == m["mean"]
    assert m["provenance"]["world_size"] == 2 and s["provenance"]["world_size"] == 1
    assert m["probe"]["samples"] == s["probe"]["samples"] == 10
    assert m["probe"]["answer_to_latent"] == pytest.approx(s["probe"]["answer_to_latent"], rel=1e-5)


def test_max_samples_is_a_fixed_mix_of_tasks(tmp_path):
    """--max-samples N: the same N samples at any world size, drawn from every task (the unshuffled
    first N of a multi-task split would be the first task's alone)."""
    from livr_ds.data.demo import make_demo

    data = str(tmp_path / "d")
    make_demo(data, seed=1, n_train=0, n_val=0, n_test=20, tasks=["counting", "localization"])

    def take(world, n):
        got = []
        for rank in range(world):
            got += [(p, s.task, s.key) for ps, ss in loop.iter_samples([data], "test", rank, world, 3, n)
                    for p, s in zip(ps, ss)]
        return sorted(got)

    one, two = take(1, 10), take(2, 10)
    assert one == two and len(one) == 10
    assert len({t for _, t, _ in one}) == 2
    everything = [s.task for _, ss in loop.iter_samples([data], "test", 0, 1, 4) for s in ss]
    assert len(everything) == 40 and len(set(everything[:10])) == 1  # an unshuffled first 10: one task


# ---- the attention probe ------------------------------------------------------------------
def test_probe_equals_direct_computation(lora_export, demo, tmp_path):
    """The probe's mean (batched, padded) == a per-sample computation with explicit loops."""
    out = str(tmp_path / "probe.json")
    res = eval_cli.run(eval_args(["--ckpt", lora_export, "--data", demo, "--mode", "standard", "--out", out,
                                  "--batch-size", "3", "--max-new-tokens", "2", "--max-samples", "5",
                                  "--probe", "attention", "--probe-images", "2"]))
    backbone = loop.load_model(lora_export, attn_backend="eager")
    model = backbone.model
    collator = loop.make_collator(backbone, inference.MODES["standard"], with_answer=True)
    samples = [s for _, ss in loop.iter_samples([demo], "test", 0, 1, 5, 5) for s in ss]
    total, count, per_sample = 0.0, 0, []
    for s in samples:
        batch = collator([s])
        vision = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
        with torch.no_grad():
            att = model.hf_model.model(
                input_ids=batch["input_ids"], attention_mask=model.attention_mask(batch, "standard"),
                position_ids=model.position_ids(batch),
                mm_token_type_ids=(batch["input_ids"] == model.image_token_id).int(),
                output_attentions=True, use_cache=False, **vision).attentions
        seg = batch["segment_ids"][0].tolist()
        answer = [i for i, g in enumerate(seg) if g == segments.ANSWER]
        latent = [i for i, g in enumerate(seg) if g == segments.LATENT]
        assert len(latent) == K and answer
        s_sum, s_n = 0.0, 0
        for layer in att:
            for h in range(layer.shape[1]):
                for q in answer:
                    s_sum += sum(float(layer[0, h, q, k]) for k in latent)
                    s_n += 1
        total, count = total + s_sum, count + s_n
        per_sample.append(s_sum / s_n)
    assert res["probe"]["answer_to_latent"] == pytest.approx(total / count, rel=1e-4)
    assert res["probe"]["answer_to_latent_per_latent"] == pytest.approx(total / count / K, rel=1e-4)
    records = read_jsonl(eval_cli.predictions_path(out))
    assert [r["answer_to_latent"] for r in records] == pytest.approx(per_sample, rel=1e-4)
    pngs = sorted(os.listdir(res["probe"]["heatmaps"]))
    assert len(pngs) == 2 and all(p.endswith(".png") for p in pngs)
    with open(os.path.join(res["probe"]["heatmaps"], pngs[0]), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_probe_maps_follow_the_mask(lora_export, demo):
    """Latent->image maps sit on each image's token grid; under the bottleneck the answer
    puts no attention on image tokens, the latents do."""
    backbone = loop.load_model(lora_export, attn_backend="eager")
    collator = loop.make_collator(backbone, inference.MODES["bottleneck"], with_answer=True)
    samples = [s for _, ss in loop.iter_samples([demo], "test", 0, 1, 2, 2) for s in ss]
    batch = collator(samples)
    attn = torch.stack(probes.attention_weights(backbone.model, batch, "bottleneck"))
    layers, B, heads = attn.shape[:3]
    real = batch["segment_ids"][0] != segments.PAD
    assert (layers, B, heads) == (2, 2, 4)
    assert torch.allclose(attn[:, 0][..., real, :].sum(-1), torch.ones(layers, heads, int(real.sum())))
    seg = batch["segment_ids"][0]
    ans, img, lat = seg == segments.ANSWER, seg == segments.IMAGE, seg == segments.LATENT
    assert attn[:, 0][:, :, ans][:, :, :, img].abs().max() == 0
    assert attn[:, 0][:, :, lat][:, :, :, img].sum() > 0
    _, maps = probes.attention_probe(backbone.model, batch, "bottleneck", want_maps=True)
    assert [m[0].shape for m in maps] == [torch.Size([4, 4])] * 2  # 112 px -> 8 x 8 patches -> 4 x 4 tokens
    with pytest.raises(ValueError, match="eager"):
        probes.attention_weights(loop.load_model(lora_export).model, batch, "standard")


# ---- table ---------------------------------------------------------------------------------
def _result(path, name, mode, per_task):
    mean = sum(per_task.values()) / len(per_task)
    with open(path, "w") as f:
        json.dump({"name": name, "mode": mode, "per_task": {t: {"accuracy": a, "n": 10} for t, a in per_task.items()},
                   "mean": mean}, f)
    return str(path)


def cli(argv):
    from livr_ds.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


def test_table_two_files(tmp_path, capsys):
    sft = _result(tmp_path / "sft.json", None, "standard", {"counting": 50.0, "jigsaw": 60.0})
    livr = _result(tmp_path / "livr_run.json", "LIVR", "standard", {"counting": 55.0, "jigsaw": 70.0})
    assert cli(["table", sft, livr, "--baseline", "sft"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "| Method | Counting | Jigsaw | Mean | Δ |",
        "|---|---:|---:|---:|---:|",
        "| sft | 50.00 | 60.00 | 55.00 | – |",
        "| LIVR | 55.00 | 70.00 | 62.50 | +7.50 |",
    ]
    bn = _result(tmp_path / "livr_bn.json", "LIVR", "bottleneck", {"counting": 25.0, "jigsaw": 50.0})
    assert cli(["table", sft, livr, bn, "--by", "mode", "--digits", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "| Run | standard | bottleneck |", "|---|---:|---:|",
        "| sft | 55.0 | – |", "| LIVR | 62.5 | 37.5 |",
    ]
    with pytest.raises(ValueError, match="not a row"):
        cli(["table", sft, livr, "--baseline", "nope"])


def test_cli_registers_eval_table_experiment():
    from livr_ds.cli import build_parser

    parser = build_parser()
    a = parser.parse_args(["experiment", "bottleneck-proof", "--out", "x", "--stage1-steps", "5"])
    assert a.experiment == "bottleneck-proof" and a.stage1_steps == 5 and callable(a.func)
    a = parser.parse_args(["eval", "--ckpt", "c", "--data", "d", "--out", "o.json", "--mode", "no_latents"])
    assert a.mode == "no_latents"


def test_eval_on_blink_hub_shards_prints_table1_and_records_revision(tiny_dirs, tmp_path, capsys):
    """BLINK as it ships -> shards (val scored as the test split) -> `livr-ds eval` zero-shot: the
    Table 1 columns of the tasks present, and the hub's revision and file checksums in provenance."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from builder_fixtures import BLINK_HUB_COMMIT, make_blink_hub

    from livr_ds.data.convert import convert_parquet

    hub = make_blink_hub(str(tmp_path / "BLINK"), n_val=2, n_test=1)
    data = str(tmp_path / "blink_shards")
    convert_parquet(hub, data, parquet_split="val", split="test", progress=False)
    out = str(tmp_path / "blink.json")
    capsys.readouterr()
    assert cli(["eval", "--base-model", tiny_dirs["qwen2_5_vl"], "--family", "qwen2_5_vl", "--data", data,
                "--out", out, "--batch-size", "6", "--max-new-tokens", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert rows[0] == "| Method | Counting | Jigsaw | Localization | Mean |" and rows[2].startswith("| blink | ")
    with open(out) as f:
        saved = json.load(f)
    assert set(saved["per_task"]) == {"counting", "jigsaw", "localization"} and saved["n"] == 6
    prov = saved["provenance"]["data"][0]
    assert prov["revision"] == BLINK_HUB_COMMIT and prov["source"]["hub_split"] == "val"
    with open(os.path.join(hub, "Object_Localization", "val-00000-of-00001.parquet"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert {"name": "Object_Localization/val-00000-of-00001.parquet", "sha256": sha} in [
        {k: x[k] for k in ("name", "sha256")} for x in prov["source"]["files"]]


def test_table_puts_blink_subtask_names_in_the_paper_columns(tmp_path, capsys):
    old = _result(tmp_path / "old.json", "old", "standard", {"object_localization": 40.0, "Counting": 50.0,
                                                             "iq_test": 30.0})
    assert cli(["table", old]) == 0
    assert capsys.readouterr().out.strip().splitlines()[0] == "| Method | Counting | Localization | Iq Test | Mean |"


@pytest.mark.parametrize("flag, value, message", [
    ("--max-samples", "-1", "--max-samples -1: must be >= 0 (0 = all samples)"),
    ("--batch-size", "0", "--batch-size 0: must be >= 1"),
    ("--max-new-tokens", "0", "--max-new-tokens 0: must be >= 1"),
])
def test_eval_refuses_counts_that_would_evaluate_nothing(tmp_path, capsys, flag, value, message):
    """Checked before anything loads: a negative --max-samples used to evaluate 0 samples, 'accuracy 0.0'."""
    from livr_ds.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "--ckpt", str(tmp_path / "none"), "--data", str(tmp_path), "--out", str(out),
                 flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
