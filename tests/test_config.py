"""Config loading: typed, validated at start-up, errors that name the key."""

import os
import subprocess
import sys

import pytest

from livr_ds.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_follow_the_paper():
    cfg = load_config(None)
    assert (cfg.latents.num, cfg.mask.stage1, cfg.mask.stage2) == (16, "bottleneck", "standard")
    assert (cfg.schedule.stage1_epochs, cfg.schedule.stage2_epochs) == (4, 6)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.optim.lr, cfg.optim.grad_accum) == (16, 32, 1e-4, 8)


def test_base_files_and_overrides(tmp_path):
    write(tmp_path, "latents: {num: 8}\nmask: {stage1: answer_only}\n", "base.yaml")
    path = write(tmp_path, "base: base.yaml\nlatents: {shared: true}\n")
    cfg = load_config(path, ["optim.lr=2e-4", "data.train=[shards/a, {path: shards/b, weight: 2}]"])
    assert cfg.latents.num == 8 and cfg.latents.shared and cfg.mask.stage1 == "answer_only"
    assert cfg.optim.lr == 2e-4
    assert [(s.path, s.weight) for s in cfg.data.train] == [("shards/a", 1.0), ("shards/b", 2.0)]


@pytest.mark.parametrize("text, match", [
    ("latents: {nmu: 4}\n", r"unknown config key 'latents.nmu' \(did you mean latents.num\?\)"),
    ("mask: {stage1: botleneck}\n", r"mask.stage1: unknown policy 'botleneck'"),
    ("latents: {num: -1}\n", r"latents.num: must be >= 0"),
    ("optim: {lr: fast}\n", r"optim.lr: expected a number"),
    ("model: {dtype: fp16}\n", r"model.dtype: 'fp16' is not one of"),
])
def test_bad_configs_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("override, match", [
    ("latents.nmu=4", "unknown config key 'latents.nmu'"),
    ("mask.stage1=botleneck", "unknown policy 'botleneck'"),
    ("latents.num=-2", "latents.num: must be >= 0"),
])
def test_train_entry_point_exits_nonzero_on_bad_config(tmp_path, override, match):
    path = write(tmp_path, "name: x\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", path,
                        "--set", override], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert match in r.stderr
