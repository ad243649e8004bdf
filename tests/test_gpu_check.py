"""launch/gpu_check.py, the GPU first-contact script, in its CPU form: the same pipeline (both
stages through launch/train.py, a kill + --resume auto, the four eval modes through launch/eval.py,
the comparison with the CPU fp32 reference) so that it cannot rot before a GPU is lent."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(900)


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "gc"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "gpu_check.py"), "--out", str(out), "--cpu",
                        "--n-train", "4", "--bench", "no"], capture_output=True, text=True, timeout=800,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads((out / "gpu_check.json").read_text())
    assert r.returncode == 0 and summary["ok"], json.dumps([s for s in summary["steps"] if not s["ok"]])[:4000]
    steps = {s["step"]: s for s in summary["steps"]}
    assert {"env", "reference_stage1_cpu_fp32", "stage1_killed", "stage1_resume_auto", "stage1_resumed_from_checkpoint",
            "stage1_loss_vs_cpu_reference", "stage1_zero3", "stage1_zero3_vs_zero2", "stage2_init_from_stage1",
            "eval_results"} <= steps.keys()
    assert steps["stage1_zero3_vs_zero2"]["steps"] > 0 and steps["stage1_zero3_vs_zero2"]["max_rel_diff_loss"] <= 1e-5
    # On CPU the device run (killed and resumed) must equal the reference bit for bit.
    cmp = steps["stage1_loss_vs_cpu_reference"]
    assert cmp["rtol"] == 0.0 and cmp["steps"] and all(c["device"] == c["cpu_fp32"] for c in cmp["steps"])
    assert set(steps["eval_results"]["results"]) == {"standard", "no_latents", "bottleneck", "bottleneck_no_latents"}
    assert all(v["n"] == 8 for v in steps["eval_results"]["results"].values())
