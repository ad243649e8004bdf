"""The training job through its real entry point: DeepSpeed ZeRO-2 on gloo, 2 ranks, tiny
Qwen2.5-VL, demo shards. Each test launches `torchrun ... launch/train.py` like a user would."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_data")
    subprocess.run([sys.executable, "-m", "livr_ds.cli", "shards", "demo", "--out", str(out), "--n-train", "8",
                    "--n-val", "4", "--n-test", "2", "--tasks", "counting", "localization", "--no-progress"],
                   check=True, capture_output=True)
    return str(out)


def train(tmp_path, name, demo_data, model_path, nproc=2, sets=(), env=None, stage="1", extra=(), check=True):
    out = tmp_path / name
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
            str(29600 + abs(hash(name)) % 300), os.path.join(ROOT, "launch", "train.py"),
            "--ds", os.path.join(ROOT, "ds_configs", "zero2.json"), "--config", os.path.join(ROOT, "configs", "demo.yaml"),
            "--stage", stage,
            "--set", f"model.path={model_path}", "--set", f"data.train=[{demo_data}]", "--set", f"data.val=[{demo_data}]",
            "--set", f"output.dir={out}", "--set", "logging.wandb=disabled", "--set", "logging.every_steps=1",
            "--set", "schedule.stage1_epochs=2", "--set", "schedule.stage2_epochs=1", "--set", "data.num_workers=1",
            "--set", "data.val_max_samples=4", "--set", "optim.micro_batch_size=2", "--set", "optim.grad_accum=1"]
    for s in sets:
        args += ["--set", s]
    args += list(extra)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    r = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return out, r


def curve(stage_dir):
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rows if "loss" in r]


def adapter(stage_dir, which="final"):
    return load_file(os.path.join(stage_dir, "export", which, "adapter_model.safetensors"))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_data, tiny_dirs):
    tmp = tmp_path_factory.mktemp("runs")
    out, _ = train(tmp, "straight", demo_data, tiny_dirs["qwen2_5_vl"], sets=["output.save_every_steps=2"])
    return out


def test_two_ranks_equal_one_rank_with_accumulation(tmp_path, demo_data, tiny_dirs):
    common = ["lora.dropout=0.0", "schedule.stage1_epochs=1"]
    two, _ = train(tmp_path, "w2", demo_data, tiny_dirs["qwen2_5_vl"], nproc=2, sets=common)
    one, _ = train(tmp_path, "w1", demo_data, tiny_dirs["qwen2_5_vl"], nproc=1,
                   sets=common + ["optim.grad_accum=2"])
    c2, c1 = curve(two / "stage1"), curve(one / "stage1")
    assert len(c2) == len(c1) == 4  # 16 samples / global batch 4
    for (s2, l2, lr2, g2), (s1, l1, lr1, g1) in zip(c2, c1):
        assert s2 == s1 and lr2 == lr1
        assert l2 == pytest.approx(l1, rel=1e-5, abs=1e-6)
        assert g2 == pytest.approx(g1, rel=1e-4)
    a2, a1 = adapter(two / "stage1"), adapter(one / "stage1")
    for k in a2:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-6)


def test_sigkill_then_resume_auto_is_bit_exact(tmp_path, demo_data, tiny_dirs, uninterrupted):
    sets = ["output.save_every_steps=2"]
    out, r = train(tmp_path, "killed", demo_data, tiny_dirs["qwen2_5_vl"], sets=sets,
                   env={"LIVR_DS_FAULT": "after_step:5"}, check=False)
    assert r.returncode != 0
    stage = out / "stage1"
    assert not (stage / "DONE").exists()
    assert json.load(open(stage / "checkpoints" / "latest"))["tag"] == "step-00000004"
    _, r = train(tmp_path, "killed", demo_data, tiny_dirs["qwen2_5_vl"], sets=sets, extra=["--resume", "auto"])
    assert "resumed from" in r.stderr + r.stdout
    assert curve(stage) == curve(uninterrupted / "stage1")  # loss, lr, grad norm: bit for bit
    assert_same_tensors(adapter(stage), adapter(uninterrupted / "stage1"))


def test_crash_during_save_keeps_latest_loadable(tmp_path, demo_data, tiny_dirs, uninterrupted):
    sets = ["output.save_every_steps=2"]
    out, r = train(tmp_path, "crash", demo_data, tiny_dirs["qwen2_5_vl"], sets=sets,
                   env={"LIVR_DS_FAULT": "checkpoint_mid_save:2"}, check=False)
    assert r.returncode != 0
    ckpts = out / "stage1" / "checkpoints"
    assert json.load(open(ckpts / "latest"))["tag"] == "step-00000002"
    assert (ckpts / ".tmp-step-00000004").exists()  # the half-written one, never pointed at
    assert not (ckpts / "step-00000004").exists()
    _, r = train(tmp_path, "crash", demo_data, tiny_dirs["qwen2_5_vl"], sets=sets, extra=["--resume", "auto"])
    assert_same_tensors(adapter(out / "stage1"), adapter(uninterrupted / "stage1"))


def test_stage2_init_from_stage1_and_exports(tmp_path, demo_data, tiny_dirs, uninterrupted):
    from livr_ds.config import load_config
    from livr_ds.data.collate import LivrCollator
    from livr_ds.data.reader import LivrLoader, ShardSource
    from livr_ds.export import load_export
    from livr_ds.modeling import build_backbone
    from livr_ds.train import checkpoint

    stage1 = str(uninterrupted / "stage1")
    base = [f"model.path={tiny_dirs['qwen2_5_vl']}", "latents.num=4", "stage=2"]
    # Stage 2 starts from Stage 1's exact adapter and latent rows.
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), base)
    bb = build_backbone(cfg, policy="standard")
    fresh = checkpoint.trainable_state(bb.model.peft_model)
    checkpoint.init_from_export(bb, cfg, stage1)
    loaded = checkpoint.trainable_state(bb.model.peft_model)
    assert_same_tensors(loaded, adapter(stage1))
    assert not all(torch.equal(fresh[k], loaded[k]) for k in fresh)  # it really changed something
    # A different K is refused, naming it.
    bad = load_config(os.path.join(ROOT, "configs", "demo.yaml"), base[:1] + ["latents.num=2", "stage=2"])
    with pytest.raises(ValueError, match=r"latents.num \(K\) 4 vs 2"):
        checkpoint.init_from_export(build_backbone(bad, policy="standard"), bad, stage1)

    # The export reloads with transformers + PEFT alone and gives the engine's logits: the
    # engine's final weights are the last resume checkpoint's trainable tensors.
    engine_like = build_backbone(cfg, policy="standard")
    last = checkpoint.latest_checkpoint(os.path.join(stage1, "checkpoints"))
    checkpoint.load_trainable_state(engine_like.model.peft_model, load_file(os.path.join(last, "trainable.safetensors")))
    exported = load_export(stage1)
    assert exported.latent_ids == engine_like.latent_ids
    samples = next(iter(LivrLoader([ShardSource(demo_data, split="val")], 0, 1, batch_size=2, seed=0)))
    batch = LivrCollator(exported.adapter, exported.processor, exported.latent_ids)(samples)
    with torch.no_grad():
        ref = engine_like.model.eval().logits(batch, "standard")
        got = exported.model.eval().logits(batch, "standard")
    assert torch.equal(ref, got)

    # `livr-ds export --merge` writes a checkpoint plain transformers loads, same logits.
    merged_dir = tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "livr_ds.cli", "export", "--ckpt", stage1, "--merge", "--out", str(merged_dir)],
                   check=True, capture_output=True, cwd=ROOT)
    from transformers import Qwen2_5_VLForConditionalGeneration

    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(merged_dir).eval()
    real = batch["segment_ids"] != 4
    vision = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    with torch.no_grad():
        plain_logits = plain(input_ids=batch["input_ids"], attention_mask=real.long(),
                             mm_token_type_ids=(batch["input_ids"] == exported.model.image_token_id).int(), **vision).logits
    torch.testing.assert_close(plain_logits[real], got[real], rtol=1e-4, atol=1e-4)

    # And a real Stage 2 launch from Stage 1 runs to the end.
    out, r = train(tmp_path, "stage2", demo_data, tiny_dirs["qwen2_5_vl"], stage="2", extra=["--init-from", stage1])
    assert (out / "stage2" / "DONE").exists()
    assert "initialised from" in r.stderr + r.stdout


def test_sigterm_on_one_rank_checkpoints_and_resumes(tmp_path, demo_data, tiny_dirs, uninterrupted):
    import shutil

    sets = ["output.save_every_steps=2"]
    out, r = train(tmp_path, "preempted", demo_data, tiny_dirs["qwen2_5_vl"], sets=sets,
                   env={"LIVR_DS_FAULT": "after_step:3:TERM"})  # only rank 0 gets the signal
    stage = out / "stage1"
    assert r.returncode == 0 and not (stage / "DONE").exists()
    assert "stopped on signal at step 3" in r.stderr + r.stdout
    assert json.load(open(stage / "checkpoints" / "latest"))["tag"] == "step-00000003"
    shutil.copytree(out, tmp_path / "other_world")
    _, r = train(tmp_path, "preempted", demo_data, tiny_dirs["qwen2_5_vl"], sets=sets, extra=["--resume", "auto"])
    assert curve(stage) == curve(uninterrupted / "stage1")
    assert_same_tensors(adapter(stage), adapter(uninterrupted / "stage1"))
    # The same checkpoint at another world size (1 rank, accumulation 2: the same global batch):
    # weights come back, the optimizer state cannot, and the log says so.
    _, r = train(tmp_path, "other_world", demo_data, tiny_dirs["qwen2_5_vl"], nproc=1,
                 sets=sets + ["optim.grad_accum=2"], extra=["--resume", "auto"])
    assert "optimizer moments and RNG re-initialised" in r.stderr + r.stdout
    assert (tmp_path / "other_world" / "stage1" / "DONE").exists()


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, demo_data, tiny_dirs):
    out, r = train(tmp_path, "nan", demo_data, tiny_dirs["qwen2_5_vl"], nproc=1,
                   sets=["optim.lr=1.0e30", "optim.warmup_ratio=0.0", "output.save_every_steps=1"], check=False)
    assert r.returncode != 0
    assert re.search(r"exitcode\s*:\s*3", r.stderr)  # the trainer's own exit code, via torchrun
    assert "non-finite loss" in r.stderr
    ckpts = out / "stage1" / "checkpoints"
    assert (ckpts / "latest").exists() and not (out / "stage1" / "DONE").exists()


def test_ds_config_auto_fields_and_inconsistent_batches(tmp_path):
    from livr_ds.config import ConfigError, load_config
    from livr_ds.train.ds_config import build_ds_config

    cfg = load_config(None, ["optim.micro_batch_size=2", "optim.grad_accum=4", "optim.lr=3e-4"])
    ds = build_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"), cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 4)
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["bf16"]["enabled"] is False
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"inconsistent batch sizes: train_batch_size=32 .* = 16"):
        build_ds_config(str(bad), cfg, world_size=2)
    with pytest.raises(ConfigError, match="ZeRO-3 is not supported yet"):
        build_ds_config(os.path.join(ROOT, "ds_configs", "zero3.json"), cfg, world_size=2)
    offload = build_ds_config(os.path.join(ROOT, "ds_configs", "zero2_offload.json"), cfg, world_size=2)
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 2 in the DeepSpeed config"):
        build_ds_config(str(clash), cfg, world_size=2)


def test_full_model_export_round_trips_through_init_from(tmp_path, tiny_dirs):
    """model.trainable: all (tiny models from scratch) exports a whole transformers checkpoint."""
    from livr_ds.config import load_config
    from livr_ds.modeling import build_backbone
    from livr_ds.train import checkpoint

    sets = [f"model.path={tiny_dirs['qwen2_5_vl']}", "model.trainable=all", "latents.num=4"]
    cfg1 = load_config(None, sets + ["stage=1"])
    trained = build_backbone(cfg1, policy="bottleneck")
    with torch.no_grad():
        for p in trained.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    checkpoint.save_export(trained, cfg1, 1, str(tmp_path / "export"))
    cfg2 = load_config(None, sets + ["stage=2"])
    fresh = build_backbone(cfg2, policy="standard")
    checkpoint.init_from_export(fresh, cfg2, str(tmp_path / "export"))
    want = trained.model.hf_model.state_dict()
    got = fresh.model.hf_model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
