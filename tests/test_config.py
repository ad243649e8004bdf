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
    assert (cfg.lora.r, cfg.lora.alpha, cfg.optim.lr) == (16, 32, 1e-4)
    # The paper's global batch of 8; accumulation is derived from it at start-up.
    assert (cfg.optim.micro_batch_size, cfg.optim.global_batch_size, cfg.optim.grad_accum) == (1, 8, 0)
    assert cfg.output.save_every_minutes > 0  # a crash loses minutes, not a stage


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
    ("output: {keep_last: 0}\n", r"output.keep_last: must be >= 1"),
    ("output: {keep_last: -1}\n", r"output.keep_last: must be >= 1"),
    ("output: {save_every_steps: -5}\n", r"output.save_every_steps: must be >= 0"),
    ("output: {save_every_minutes: -1}\n", r"output.save_every_minutes: must be a finite number >= 0"),
    ("lora: {alpha: 0}\n", r"lora.alpha: must be > 0"),
    ("lora: {dropout: 1.0}\n", r"lora.dropout: must be in \[0, 1\)"),
    ("lora: {dropout: -0.1}\n", r"lora.dropout: must be in \[0, 1\)"),
    ("optim: {grad_clip: -1}\n", r"optim.grad_clip: must be a finite number >= 0"),
    ("optim: {weight_decay: -0.01}\n", r"optim.weight_decay: must be a finite number >= 0"),
    ("optim: {betas: [0.9, 1.0]}\n", r"optim.betas: must be two numbers in \[0, 1\)"),
    ("optim: {lr: .inf}\n", r"optim.lr: must be a finite number > 0"),
    ("optim: {lr: .nan}\n", r"optim.lr: must be a finite number > 0"),
    ("model: {max_pixels: -1}\n", r"model.min_pixels/max_pixels: must be >= 0"),
    ("optim: {eps: .inf}\n", r"optim.eps: must be a finite number > 0"),
    ("optim: {grad_clip: .inf}\n", r"optim.grad_clip: must be a finite number >= 0"),
    ("optim: {weight_decay: .nan}\n", r"optim.weight_decay: must be a finite number >= 0"),
    ("output: {save_every_minutes: .inf}\n", r"output.save_every_minutes: must be a finite number >= 0"),
    ("model: {min_pixels: 200000, max_pixels: 100000}\n", r"model.min_pixels/max_pixels: min_pixels 200000 is above "
                                                           r"max_pixels 100000"),
    ("data: {val_max_samples: -1}\n", r"data.val_max_samples: must be >= 0"),
    ("data: {val: [{path: v, weight: 0}]}\n", r"data.val\[\].weight: must be a finite number > 0"),
    ("data: {train: [{path: t, weight: .inf}]}\n", r"data.train\[\].weight: must be a finite number > 0"),
    ("optim: {global_batch_size: 6, micro_batch_size: 4}\n", r"optim.global_batch_size 6 is not a multiple of "
                                                              r"optim.micro_batch_size 4"),
])
def test_bad_configs_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("override, match", [
    ("latents.nmu=4", "unknown config key 'latents.nmu'"),
    ("mask.stage1=botleneck", "unknown policy 'botleneck'"),
    ("latents.num=-2", "latents.num: must be >= 0"),
    ("optim.eps=inf", "optim.eps: must be a finite number > 0"),
    ("output.save_every_minutes=inf", "output.save_every_minutes: must be a finite number >= 0"),
    ("data.val_max_samples=-1", "data.val_max_samples: must be >= 0"),
])
def test_train_entry_point_exits_nonzero_on_bad_config(tmp_path, override, match):
    path = write(tmp_path, "name: x\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", path,
                        "--set", override], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert match in r.stderr


def test_train_refuses_a_global_batch_the_world_cannot_hold(tmp_path):
    """Checked before any model is loaded; the numbers are in the message."""
    path = write(tmp_path, "name: x\noptim: {global_batch_size: 8, micro_batch_size: 3}\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", path],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "optim.global_batch_size 8 is not a multiple of optim.micro_batch_size 3" in r.stderr


@pytest.mark.parametrize("train, match", [
    ("[]", "data.train is empty"),
    ("[{missing}]", "{missing}: no manifest.json and no shards matching train-*.tar"),
])
def test_train_refuses_missing_data_in_one_line(tmp_path, train, match):
    path = write(tmp_path, "name: x\nmodel: {path: /nonexistent/model}\n")
    missing = str(tmp_path / "empty_dir")
    os.makedirs(missing)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", path,
                        "--set", f"data.train={train.format(missing=missing)}", "--set", f"output.dir={tmp_path}/out"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert match.format(missing=missing) in r.stderr
    assert "Traceback" not in r.stderr


def test_deepspeed_key_names_the_config_and_ds_wins(tmp_path):
    from livr_ds.config import ConfigError, resolve_deepspeed_config

    cfg = load_config(os.path.join(ROOT, "configs", "livr_qwen2_5_vl_72b.yaml"))
    assert resolve_deepspeed_config(cfg).endswith(os.path.join("ds_configs", "zero3.json"))
    assert resolve_deepspeed_config(load_config(None)).endswith(os.path.join("ds_configs", "zero2.json"))
    assert resolve_deepspeed_config(cfg, "ds_configs/zero3_offload.json").endswith("zero3_offload.json")
    with pytest.raises(ConfigError, match="deepspeed: no DeepSpeed config at 'nope.json'"):
        resolve_deepspeed_config(load_config(None, ["deepspeed=nope.json"]))
    with pytest.raises(ConfigError, match="--ds: no DeepSpeed config"):
        resolve_deepspeed_config(cfg, str(tmp_path / "missing.json"))
