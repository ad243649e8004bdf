"""The shipped files are the test matrix: every ds_configs/*.json in bfloat16 and float32 at 1 and 2
ranks (the 2-rank runs stopped by SIGTERM mid-stage and resumed with --resume auto), launched through
launch/train.py by torchrun as users launch it, on the tied tiny Qwen2.5-VL (tied head, embedding
rows beyond the tokenizer, like the released 3B). The configs/*.yaml matrix is test_configs.py's.

What must hold: bf16 starts under every ZeRO stage (it crashed ZeRO-3's flatten before the dtype
policy), and one policy trains the same way under all four configs: the same losses and the same
adapters to bf16 tolerance, whatever the ZeRO stage, the offload and the world size."""

import itertools
import json
import os
import re

import pytest
import torch

from tests.test_train import adapter, curve, demo_data, metrics, train  # noqa: F401 - demo_data is a fixture

pytestmark = pytest.mark.timeout(1800)

DS_CONFIGS = ("zero2", "zero2_offload", "zero3", "zero3_offload")
DTYPES = ("bfloat16", "float32")
# micro 1, global 4: 1 rank x accumulation 4, 2 ranks x 2; 10 samples -> steps of 4 + 4 + 2 per
# epoch (a short last step), 2 epochs = 6 steps; the 2-rank runs are stopped after step 3.
SETS = ["optim.micro_batch_size=1", "optim.global_batch_size=4", "schedule.stage1_epochs=2",
        "data.val_max_samples=2", "output.save_every_minutes=0", "optim.warmup_ratio=0.2",
        "lora.dropout=0.0"]  # dropout draws differ between world sizes
STEPS = 6
STOP_AT = 3
# bf16 has an 8-bit mantissa (relative rounding 2^-8 = 0.4 %); six steps of it through a 2-layer
# model: the same run under two configs may differ by a few roundings.
BF16_LOSS_REL = 2e-2
FP32_LOSS_REL = 1e-5


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, demo_data, tiny_tied_dirs):  # noqa: F811
    tmp = tmp_path_factory.mktemp("shipped")
    model = tiny_tied_dirs["qwen2_5_vl"]
    runs = {}
    for ds, dtype in itertools.product(DS_CONFIGS, DTYPES):
        sets = [*SETS, f"model.dtype={dtype}"]
        one, alone = train(tmp, f"{ds}-{dtype}-1", demo_data, model, nproc=1, sets=sets, ds=ds)
        name = f"{ds}-{dtype}-2"
        _, first = train(tmp, name, demo_data, model, nproc=2, sets=sets, ds=ds,
                         env={"LIVR_DS_FAULT": f"after_step:{STOP_AT}:TERM"})
        two, second = train(tmp, name, demo_data, model, nproc=2, sets=sets, ds=ds, extra=["--resume", "auto"])
        runs[ds, dtype] = {"1": one / "stage1", "2": two / "stage1", "alone": alone, "first": first, "second": second}
    return runs


def test_every_ds_config_starts_trains_and_resumes_in_both_dtypes(matrix):
    for (ds, dtype), run in matrix.items():
        for world in ("1", "2"):
            stage = run[world]
            assert os.path.exists(stage / "DONE"), (ds, dtype, world)
            assert [s for s, *_ in curve(stage)] == list(range(1, STEPS + 1)), (ds, dtype, world)
            ds_json = json.loads((stage / "ds_config.json").read_text())
            assert ds_json["bf16"]["enabled"] is (dtype == "bfloat16")
        # The 2-rank run really was stopped mid-stage and resumed from the checkpoint of the stop.
        stopped = re.search(r"stopped on signal at step (\d+)", run["first"].stderr)
        assert stopped and STOP_AT <= int(stopped[1]) < STEPS, (ds, dtype)
        assert f"step-{int(stopped[1]):08d}: epoch" in run["second"].stderr, (ds, dtype)


def test_bf16_uses_fp32_gradient_accumulation_and_reduction(matrix):
    for ds in DS_CONFIGS:
        ds_json = json.loads((matrix[ds, "bfloat16"]["1"] / "ds_config.json").read_text())
        assert ds_json["data_types"]["grad_accum_dtype"] == "fp32"
        assert ds_json["communication_data_type"] == "fp32"


def _assert_adapters_close(a, b, rel, what):
    assert a.keys() == b.keys(), what
    for k in a:
        x, y = a[k].float(), b[k].float()
        assert x.dtype == y.dtype
        err = (x - y).norm() / max(y.norm(), 1e-12)
        assert err <= rel, f"{what}: {k} differs by {err:.2e} (relative)"


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_policy_trains_alike_under_every_config_and_world_size(matrix, dtype):
    """The reference is ZeRO-2 at 1 rank; every other config and world size must give its curve
    and adapter. Before the policy, ZeRO-3 bf16 could not start and ZeRO-3 offload trained fp32 LoRA
    copies where ZeRO-2 trained bf16 ones."""
    rel = BF16_LOSS_REL if dtype == "bfloat16" else FP32_LOSS_REL
    ref = matrix["zero2", dtype]["1"]
    ref_curve, ref_adapter = curve(ref), adapter(ref)
    want = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert {v.dtype for v in ref_adapter.values()} == {want}
    for (ds, dt), run in matrix.items():
        if dt != dtype:
            continue
        for world in ("1", "2"):
            got = curve(run[world])
            for (s, loss, lr, _), (_, loss_ref, lr_ref, _) in zip(got, ref_curve):
                assert lr == pytest.approx(lr_ref, rel=1e-12), (ds, world, s)
                assert loss == pytest.approx(loss_ref, rel=rel), (ds, world, s)
            _assert_adapters_close(adapter(run[world]), ref_adapter, 10 * rel, f"{ds} {dtype} at {world} ranks")


def test_bf16_and_fp32_runs_are_the_same_training(matrix):
    """bf16 is a precision, not another recipe: its curve follows fp32's to bf16 tolerance."""
    for ds in DS_CONFIGS:
        bf, fp = curve(matrix[ds, "bfloat16"]["1"]), curve(matrix[ds, "float32"]["1"])
        for (s, loss, *_), (_, loss_fp, *_) in zip(bf, fp):
            assert loss == pytest.approx(loss_fp, rel=5e-2), (ds, s)
        vals = [r for r in metrics(matrix[ds, "bfloat16"]["1"]) if "loss" in r]
        assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in vals[1:]), ds


def test_first_step_guard_passes_on_every_rank_of_every_config(matrix):
    """The guard (train/guards.py) ran on the real shipped paths and found everything in order: it
    spans steps 2-3 here (step 1 is warmup's lr 0), which both the 1-rank and the stopped launch reach."""
    for (ds, dtype), run in matrix.items():
        for launch in ("alone", "first"):
            out = run[launch].stdout + run[launch].stderr
            assert "first-step guard: all" in out and "did not change" not in out, (ds, dtype, launch)


def test_merge_of_a_bf16_run_is_bf16_sharded_and_loads_in_plain_transformers(matrix, tmp_path):
    """`livr-ds export --merge` keeps the run's dtype (it wrote fp32, twice the released size, before)
    and writes safetensors shards with an index that transformers reads as they are."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from livr_ds.cli import main

    out = tmp_path / "merged"
    assert main(["export", "--ckpt", str(matrix["zero3", "bfloat16"]["2"]), "--merge", "--out", str(out),
                 "--max-shard-size", "200KB"]) == 0
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    dtypes = set()
    for p in shards:
        with safe_open(str(p), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    model = AutoModelForImageTextToText.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    assert json.loads((out / "livr.json").read_text())["merged_dtype"] == "bfloat16"
