"""Stage 1 -> Stage 2 and resume refuse every silent mismatch, and --stage all lets Stage 1 go.

Each refusal goes through launch/train.py (exit 2, one line naming the key and both values);
the rule table itself (export.HANDOFF_KEYS) is checked key by key in-process."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_train import demo_data, launch, overrides, train  # noqa: F401 - demo_data is a fixture

pytestmark = pytest.mark.timeout(900)

SHORT = ["schedule.stage1_epochs=1", "schedule.stage2_epochs=1", "output.save_every_steps=1",
         "data.val_max_samples=2"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, demo_data, tiny_dirs):  # noqa: F811
    tmp = tmp_path_factory.mktemp("handoff")
    out, _ = train(tmp, "s1", demo_data, tiny_dirs["qwen2_5_vl"], nproc=1, sets=SHORT)
    return tmp, out


def trainer_exit(r) -> int:
    """The trainer's own exit code: torchrun reports a failed rank's code and exits 1 itself."""
    m = re.search(r"exitcode\s*:\s*(\d+)", r.stderr)
    return int(m.group(1)) if m else r.returncode


def _error_lines(r):
    return [line for line in (r.stdout + r.stderr).splitlines() if " ERROR " in line]


def test_stage2_refuses_every_inherited_setting_that_changed(stage1, demo_data, tiny_dirs):  # noqa: F811
    tmp, s1 = stage1
    changed = ["lora.alpha=32", "lora.r=4", "lora.dropout=0.0", "data.max_tokens=400", "model.max_pixels=20000",
               r"lora.target_regex=.*language_model\.layers\.\d+\.self_attn\.(q|v)_proj"]
    _, r = train(tmp, "s2-changed", demo_data, tiny_dirs["qwen2_5_vl"], nproc=1, stage="2", sets=SHORT + changed,
                 extra=["--init-from", str(s1 / "stage1")], check=False)
    assert trainer_exit(r) == 2, r.stderr[-3000:]
    (line,) = _error_lines(r)
    for want in ("lora.alpha is 16 there, 32 here", "lora.r is 8 there, 4 here", "lora.dropout is 0.05 there, 0.0 here",
                 "data.max_tokens is 512 there, 400 here", "model.max_pixels is 0 there, 20000 here",
                 "lora.target_regex is"):
        assert want in line, want
    assert str(s1 / "stage1" / "export" / "final") in line
    assert "Traceback" not in r.stderr.split("failed (exitcode")[0]  # none from the trainer; torchrun prints its own


def test_stage2_tells_base_from_instruct_of_one_architecture(stage1, demo_data, tmp_path):  # noqa: F811
    """Same config.json, other weights (a Base and an Instruct checkpoint of one size)."""
    from livr_ds.models import get_adapter

    tmp, s1 = stage1
    other = get_adapter("qwen2_5_vl").write_tiny(str(tmp_path / "other-weights"), seed=1)
    _, r = train(tmp_path, "s2-other", demo_data, other, nproc=1, stage="2", sets=SHORT,
                 extra=["--init-from", str(s1 / "stage1")], check=False)
    assert trainer_exit(r) == 2
    (line,) = _error_lines(r)
    assert "model.path (the base checkpoint's weights) is 'sha256:" in line
    assert "model.path (the backbone's architecture)" not in line  # the architecture is the same


def test_resume_refuses_another_stage_or_recipe(stage1, demo_data, tiny_dirs):  # noqa: F811
    tmp, s1 = stage1
    ckpts = sorted((s1 / "stage1" / "checkpoints").glob("step-*"))
    # A Stage 1 checkpoint handed to Stage 2 (with the recipe of Stage 1's epochs, so only the stage differs).
    _, r = train(tmp, "s1", demo_data, tiny_dirs["qwen2_5_vl"], nproc=1, stage="2", sets=SHORT,
                 extra=["--resume", str(ckpts[-1])], check=False)
    assert trainer_exit(r) == 2
    (line,) = _error_lines(r)
    assert "it is a Stage 1 checkpoint and this is Stage 2" in line
    # The run's own stage, another global batch and epoch count.
    _, r = train(tmp, "s1", demo_data, tiny_dirs["qwen2_5_vl"], nproc=1,
                 sets=SHORT + ["optim.global_batch_size=2", "schedule.stage1_epochs=3"],
                 extra=["--resume", "auto"], check=False)
    assert trainer_exit(r) == 2
    (line,) = _error_lines(r)
    assert "optim.global_batch_size was 4 there, 2 here" in line and "schedule.stage1_epochs was 1 there, 3 here" in line
    assert os.path.exists(s1 / "stage1" / "DONE")  # nothing was moved aside or overwritten


def test_resume_checkpoint_chosen_by_rank0_is_checked_on_every_rank(stage1, demo_data, tiny_dirs, tmp_path):  # noqa: F811
    """Rank 0 decides; a rank that cannot read the chosen checkpoint stops the launch with its reason."""
    import shutil

    tmp, s1 = stage1
    ckpt = sorted((s1 / "stage1" / "checkpoints").glob("step-*"))[-1]
    copy = tmp_path / "run"
    shutil.copytree(s1, copy)
    # Only rank 1 sees the checkpoint damaged: tests/view_probe.py bind-mounts a truncated files.json
    # over it in rank 1's own mount namespace. Before, rank 1 would have resumed from an older step.
    target = copy / "stage1" / "checkpoints" / ckpt.name
    args = [os.path.join(ROOT, "tests", "view_probe.py"), "--damage-on-rank", "1", "--damage", str(target / "files.json"),
            os.path.join(ROOT, "launch", "train.py"), "--ds", os.path.join(ROOT, "ds_configs", "zero2.json"),
            "--config", os.path.join(ROOT, "configs", "demo.yaml"), "--stage", "1", "--resume", "auto"]
    for s in overrides(copy, demo_data, tiny_dirs["qwen2_5_vl"], SHORT):
        args += ["--set", s]
    r = launch(args, 2)
    if "view_probe: cannot make a private view" in r.stderr:
        pytest.skip("no mount namespaces here (needs root)")
    assert trainer_exit(r) == 2
    out = r.stdout + r.stderr
    assert f"rank 0 chose {target} to resume from, but 1 rank(s) cannot read it (rank 1:" in out


@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_stage_all_frees_stage1_before_stage2_builds(tmp_path, demo_data, tiny_dirs, ds):  # noqa: F811
    report = tmp_path / "release.json"
    args = [os.path.join(ROOT, "tests", "release_probe.py"), "--report", str(report),
            "--ds", os.path.join(ROOT, "ds_configs", f"{ds}.json"),
            "--config", os.path.join(ROOT, "configs", "demo.yaml"), "--stage", "all"]
    for s in overrides(tmp_path / "run", demo_data, tiny_dirs["qwen2_5_vl"], SHORT):
        args += ["--set", s]
    r = launch(args, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["trainers"] == 2
    assert rep["alive_at_start"] == [[], []], rep  # Stage 2 started with nothing of Stage 1 alive


# ---- the rule table, key by key (in-process) ------------------------------------------------------

def test_each_handoff_key_is_compared(tiny_dirs):
    from livr_ds.config import ConfigError, load_config
    from livr_ds.export import HANDOFF_KEYS, check_compatible, livr_metadata
    from livr_ds.modeling import build_backbone

    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [f"model.path={tiny_dirs['qwen2_5_vl']}"])
    backbone = build_backbone(cfg, policy="standard")
    meta = livr_metadata(cfg, backbone, 1)
    check_compatible(meta, cfg, backbone)  # its own metadata passes
    for path, key in HANDOFF_KEYS:
        other = json.loads(json.dumps(meta))
        node = other
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = "something else"
        with pytest.raises(ConfigError, match=key.split(" ")[0].replace(".", r"\.")):
            check_compatible(other, cfg, backbone)
    old = {k: v for k, v in meta.items() if k not in ("lora", "base_weights")}
    check_compatible(old, cfg, backbone)  # an older export: not refused for what it did not record


def test_missing_lora_matrices_are_refused(tiny_dirs):
    from livr_ds.config import ConfigError, load_config
    from livr_ds.export import load_trainable_state, trainable_state
    from livr_ds.modeling import build_backbone

    base = [f"model.path={tiny_dirs['qwen2_5_vl']}"]
    narrow = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                         base + [r"lora.target_regex=.*language_model\.layers\.\d+\.self_attn\.(q|v)_proj"])
    wide = load_config(os.path.join(ROOT, "configs", "demo.yaml"), base)
    tensors = trainable_state(build_backbone(narrow, policy="standard").model)
    with pytest.raises(ConfigError, match="holds no tensor for .* LoRA matrices"):
        load_trainable_state(build_backbone(wide, policy="standard").model, tensors, where="x")


def test_no_stage1_settings_are_left_unrecorded(stage1):
    """Every key a Stage 1 export's livr.json records is either compared at the hand-off or named
    informational (a new key must join one of the two tables)."""
    from livr_ds.export import HANDOFF_KEYS, INFORMATIONAL_KEYS, read_livr_metadata

    _, s1 = stage1
    meta = read_livr_metadata(str(s1 / "stage1" / "export" / "final"))
    compared = {p[0] for p, _ in HANDOFF_KEYS}
    recorded = set(meta)
    assert recorded - set(INFORMATIONAL_KEYS) <= compared, recorded - set(INFORMATIONAL_KEYS) - compared
    assert {"lora", "latents", "backbone", "base_weights"} <= compared


if __name__ == "__main__":  # pragma: no cover
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", __file__, "-q"]))
