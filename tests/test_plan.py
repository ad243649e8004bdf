"""`livr-ds plan`: parameter counts on the meta device, the ZeRO-2/3 choice, the activation model."""

import dataclasses

from livr_ds import cli
from livr_ds.config import load_config
from livr_ds.plan import activation_bytes, build_meta, count_shapes, plan

GIB = 2**30
ARGS = ["--set", "model.path=arch:qwen2_5_vl_3b", "--set", "model.dtype=bfloat16",
        "--set", "data.max_tokens=2048", "--set", "model.gradient_checkpointing=true"]


def _cfg():
    return load_config(None, [a for a in ARGS if a != "--set"])


def test_plan_3b_zero3_fits_where_zero2_does_not(capsys):
    cfg = _cfg()
    shapes = count_shapes(cfg, *build_meta(cfg))
    assert shapes.total_params == 3_754_622_976  # the released checkpoint's size
    # LoRA r=16 on q,k,v,o,gate,up,down of 36 layers: r x (in + out) each (hidden 2048, kv 2 x 128, I 11008)
    per_layer = 16 * ((2048 + 2048) * 2 + (2048 + 256) * 2 + (2048 + 11008) * 3)
    assert shapes.lora_params == 36 * per_layer
    assert shapes.latent_params == 16 * 2048
    p = plan(cfg, gpus=2, gpu_mem_gib=8, shapes=shapes)
    rows = {(r["stage"], r["offload"]): r for r in p["rows"]}
    n = 3_754_622_976 + 36 * per_layer + 16 * 2048
    assert abs(rows[(2, False)]["params_gib"] - n * 2 / GIB) < 1e-9  # bf16, replicated
    assert abs(rows[(3, False)]["params_gib"] - (n * 2 / 2 + 2 * shapes.layer_params * 2) / GIB) < 1e-9
    assert abs(rows[(2, False)]["optim_gib"] - 12 * (n - 3_754_622_976) / 2 / GIB) < 1e-9
    assert rows[(2, True)]["optim_gib"] == 0
    assert not rows[(2, False)]["fits"] and not rows[(2, True)]["fits"]
    assert rows[(3, False)]["fits"]
    assert p["recommended"] == "ds_configs/zero3.json"
    assert cli.main(["plan", *ARGS, "--gpus", "2", "--gpu-mem-gib", "8"]) == 0
    out = capsys.readouterr().out
    assert "recommended: ds_configs/zero3.json: ZeRO-3 (not yet supported by livr-ds, issue #15)" in out
    assert cli.main(["plan", *ARGS, "--gpus", "1", "--gpu-mem-gib", "80"]) == 0
    assert "recommended: ds_configs/zero2.json" in capsys.readouterr().out


def test_activations_linear_in_tokens_and_smaller_with_checkpointing():
    cfg = _cfg()
    s = count_shapes(cfg, *build_meta(cfg))
    s = dataclasses.replace(s, latent_params=0)  # the table-copy term is constant in tokens
    for ckpt in (False, True):
        a1, a2, a4 = (activation_bytes(s, tokens=t, checkpointing=ckpt, answer_tokens=0) for t in (1024, 2048, 4096))
        assert a2 == 2 * a1 and a4 == 4 * a1
    assert activation_bytes(s, tokens=4096, checkpointing=True) < activation_bytes(s, tokens=4096) / 5
