"""No silent update: a non-finite gradient behind a finite loss stops the run before the update, a
step without any answer token is skipped (not an AdamW step over nothing), and the first-step guard
stops a run in which something that should train does not, or something frozen moved."""

import json
import re
import shutil
import glob

import pytest
import torch

from tests.conftest import damage_first_image
from tests.test_train import ckpt_tensors, demo_data, probe, tags, train  # noqa: F401 - demo_data is a fixture

pytestmark = pytest.mark.timeout(900)

SETS = ["schedule.stage1_epochs=1", "output.save_every_steps=1", "output.keep_last=20", "optim.warmup_ratio=0.0", "data.val=[]"]


def test_nan_gradient_with_finite_loss_stops_before_the_update(tmp_path, demo_data, tiny_dirs):  # noqa: F811
    out, r = train(tmp_path, "nan-grad", demo_data, tiny_dirs["qwen2_5_vl"], nproc=2, sets=SETS,
                   env={"LIVR_DS_NAN_GRAD_AT_STEP": "2"}, check=False)
    assert re.search(r"exitcode\s*:\s*3", r.stderr), r.stderr[-3000:]
    assert "non-finite gradient (the loss was finite) at step 2" in r.stderr
    stage = out / "stage1"
    assert tags(stage) == ["step-00000001"] and not (stage / "DONE").exists()
    assert all(torch.isfinite(v).all() for v in ckpt_tensors(stage, 1).values())


def test_a_step_without_answer_tokens_is_skipped_not_applied(tmp_path, demo_data, tiny_dirs):  # noqa: F811
    """One damaged image, micro batch 1, global batch 1, data.on_error: skip: that step holds only
    padding. It must not run AdamW (moments, weight decay, the step count would move)."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    damage_first_image(sorted(glob.glob(str(data / "*" / "train-*.tar")))[0])
    out, r = train(tmp_path, "skip", str(data), tiny_dirs["qwen2_5_vl"], nproc=1,
                   sets=SETS + ["data.on_error=skip", "optim.micro_batch_size=1", "optim.global_batch_size=1",
                                "lora.dropout=0.0"])
    skipped = [int(m) for m in re.findall(r"step (\d+) skipped: no answer token on any rank", r.stderr)]
    assert len(skipped) == 1, r.stderr[-3000:]
    stage = out / "stage1"
    final = json.loads((stage / "checkpoints" / tags(stage)[-1] / "trainer_state.json").read_text())
    assert final["skipped_steps"] == 1 and final["global_step"] == 10
    assert final["optimizer_step"] == 9  # AdamW ran 9 times for 10 planned steps
    # The skipped step left every trainable tensor as the step before it.
    before, at = ckpt_tensors(stage, skipped[0] - 1), ckpt_tensors(stage, skipped[0])
    assert all(torch.equal(before[k], at[k]) for k in before)
    rows = [json.loads(line) for line in open(stage / "metrics.jsonl")]
    assert [row["loss"] for row in rows if row["step"] == skipped[0]] == [None]


@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_first_step_guard_names_a_lora_matrix_that_does_not_train(tmp_path, demo_data, tiny_dirs, ds):  # noqa: F811
    rep, r = probe(tmp_path, f"lora-{ds}", demo_data, tiny_dirs["qwen2_5_vl"], 2, sets=SETS, ds=ds,
                   env={"GUARD_PROBE_BREAK": "lora"}, script="guard_probe.py")
    assert rep["message"], r.stderr[-3000:]
    layer = rep["broken"][: -len(".lora_B.default")]
    assert f"{layer}.lora_B.default.weight got no non-zero gradient" in rep["message"]
    assert f"{layer}.lora_A.default.weight got no non-zero gradient" in rep["message"]
    assert rep["step"] == 2  # stopped right after the window (lr > 0 from step 1: no warmup)


def test_first_step_guard_names_a_frozen_weight_that_moved(tmp_path, demo_data, tiny_dirs):  # noqa: F811
    rep, r = probe(tmp_path, "frozen", demo_data, tiny_dirs["qwen2_5_vl"], 1, sets=SETS,
                   env={"GUARD_PROBE_BREAK": "frozen"}, script="guard_probe.py")
    assert rep["message"] and f"frozen {rep['broken']} changed" in rep["message"], r.stderr[-3000:]
    assert "did not change" not in rep["message"] and "no non-zero gradient" not in rep["message"]
