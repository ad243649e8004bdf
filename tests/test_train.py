"""The training job through its real entry point: DeepSpeed ZeRO-2 on gloo at 1, 2 and 4 ranks,
demo shards, tiny Qwen2.5-VL and Qwen3-VL models (the paper-recipe and world-size runs use the
tied-embedding tiny models, with spare embedding rows and the default system prompt, as the
released 3B/4B checkpoints have). Each test launches `torchrun ... launch/train.py` like a user."""

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

# The paper's recipe shape: micro batch 1, global batch 8. 10 training samples (5 per task) make
# every epoch end on a short step at every world size: 4 ranks x accumulation 2 -> 3 micro-batches
# per rank (2 padded samples), steps of 2 + 1; 2 ranks x 4 -> 5, steps of 4 + 1; 1 rank x 8 -> 10,
# steps of 8 + 2. Always 2 optimizer steps per epoch holding the same samples, 3 epochs = 6 steps.
RECIPE = ["optim.micro_batch_size=1", "optim.global_batch_size=8", "schedule.stage1_epochs=3",
          "output.save_every_steps=1", "output.keep_last=10", "output.save_every_minutes=0"]
STEPS = 6


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_demo_shards(tmp_path_factory.mktemp("demo_data"), n_train=5)


def write_demo_shards(out, n_train: int, n_val: int = 2) -> str:
    """Demo shards of the counting and localization tasks: 2 x n_train training samples."""
    subprocess.run([sys.executable, "-m", "livr_ds.cli", "shards", "demo", "--out", str(out), "--n-train", str(n_train),
                    "--n-val", str(n_val), "--n-test", "2", "--tasks", "counting", "localization", "--no-progress"],
                   check=True, capture_output=True)
    return str(out)


def overrides(out, demo_data, model_path, sets=()):
    return [f"model.path={model_path}", f"data.train=[{demo_data}]", f"data.val=[{demo_data}]",
            f"output.dir={out}", "logging.wandb=disabled", "logging.every_steps=1", "logging.progress_bar=false",
            "schedule.stage1_epochs=2", "schedule.stage2_epochs=1", "data.num_workers=1", "data.val_max_samples=4",
            "optim.micro_batch_size=2", "optim.global_batch_size=4", *sets]


def launch(script_args, nproc, env=None, timeout=600):
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
            str(29600 + abs(hash(tuple(script_args))) % 300), *script_args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def ds_path(ds) -> str:
    """A DeepSpeed config: a name under ds_configs/ or a path."""
    return str(ds) if str(ds).endswith(".json") else os.path.join(ROOT, "ds_configs", f"{ds}.json")


def train(tmp_path, name, demo_data, model_path, nproc=2, sets=(), env=None, stage="1", extra=(), check=True,
          ds="zero2", script="launch/train.py"):
    out = tmp_path / name
    args = [os.path.join(ROOT, script), "--ds", ds_path(ds),
            "--config", os.path.join(ROOT, "configs", "demo.yaml"), "--stage", stage]
    for s in overrides(out, demo_data, model_path, sets):
        args += ["--set", s]
    r = launch(args + list(extra), nproc, env)
    if check and r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return out, r


def probe(tmp_path, name, demo_data, model_path, nproc, sets=(), env=None, ds="zero2", script="resume_probe.py"):
    """tests/resume_probe.py: resume `name` at nproc ranks, report what the engine holds, train on.
    tests/frozen_probe.py: train `name` from scratch, report which parameters changed."""
    out = tmp_path / name
    report = tmp_path / f"{name}-probe-{nproc}.json"
    args = [os.path.join(ROOT, "tests", script), "--report", str(report),
            "--ds", ds_path(ds), "--config", os.path.join(ROOT, "configs", "demo.yaml")]
    for s in overrides(out, demo_data, model_path, sets):
        args += ["--set", s]
    r = launch(args, nproc, env)
    assert report.exists(), f"probe wrote no report ({r.returncode}):\n{r.stderr[-6000:]}"
    return json.loads(report.read_text()), r


def metrics(stage_dir):
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def curve(stage_dir):
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in metrics(stage_dir) if "loss" in r]


def assert_each_step_once(stage_dir, steps=STEPS, epochs=3):
    rows = metrics(stage_dir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    assert [r["epoch"] for r in rows if "val_accuracy" in r] == list(range(1, epochs + 1))


def assert_close_curves(got, want, rel):
    assert [s for s, *_ in got] == [s for s, *_ in want]
    for (s, loss, lr, gn), (_, loss2, lr2, gn2) in zip(got, want):
        assert lr == pytest.approx(lr2, rel=1e-12), s
        assert loss == pytest.approx(loss2, rel=rel), s
        assert gn == pytest.approx(gn2, rel=rel * 10), s


def adapter(stage_dir, which="final"):
    return load_file(os.path.join(stage_dir, "export", which, "adapter_model.safetensors"))


def ckpt_tensors(stage_dir, step):
    return load_file(os.path.join(stage_dir, "checkpoints", f"step-{step:08d}", "trainable.safetensors"))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def tags(stage_dir):
    return sorted(d for d in os.listdir(os.path.join(stage_dir, "checkpoints")) if d.startswith("step-"))


# ---- the paper recipe at 4 ranks: short steps, epoch-end checkpoints, bit-exact kill + resume ----

@pytest.fixture(scope="module")
def ref4(tmp_path_factory, demo_data, tiny_tied_dirs):
    out, r = train(tmp_path_factory.mktemp("ref4"), "run", demo_data, tiny_tied_dirs["qwen2_5_vl"], nproc=4,
                   sets=RECIPE)
    return out, r


def test_paper_recipe_at_four_ranks_applies_short_steps_and_saves_every_epoch(ref4):
    out, r = ref4
    stage = out / "stage1"
    log = r.stdout + r.stderr
    assert "global batch 8 = micro 1 x accumulation 2 x 4 ranks; 2 optimizer steps per epoch, the last of 1 " \
           "micro-batches x 3 epochs = 6 steps, 1 warmup" in log
    assert (stage / "DONE").read_text().strip() == str(STEPS)
    assert_each_step_once(stage)
    # The LR each step applied: 1 warmup step (5% of 6, rounded up), then cosine to 0 over exactly
    # the 6 steps taken.
    from transformers import get_cosine_schedule_with_warmup

    sched = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=5e-4), 1, STEPS)
    want = []
    for _ in range(STEPS):
        want.append(sched.get_last_lr()[0])
        sched.step()
    assert [lr for _, _, lr, _ in curve(stage)] == want and sched.get_last_lr()[0] == 0.0
    # A checkpoint at every epoch end (steps 2, 4, 6) besides the per-step ones.
    assert tags(stage) == [f"step-{s:08d}" for s in range(1, STEPS + 1)]
    for step, epoch in ((2, 1), (4, 2), (6, 3)):
        state = json.loads((stage / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())
        assert (state["epoch"], state["loader"]["epoch"], state["loader"]["batches_consumed"]) == (epoch, epoch, 0)
    # Each epoch's short step was applied: it changed the weights.
    for short in (2, 4, 6):
        before, after = ckpt_tensors(stage, short - 1), ckpt_tensors(stage, short)
        assert any(not torch.equal(before[k], after[k]) for k in after)
    # A resume checkpoint holds what trains and nothing else (no frozen table, no pickle).
    step_dir = stage / "checkpoints" / f"step-{STEPS:08d}"
    assert sorted(os.listdir(step_dir)) == ["files.json", "optimizer.safetensors", "rng_rank0.json", "rng_rank1.json",
                                            "rng_rank2.json", "rng_rank3.json", "trainable.safetensors",
                                            "trainer_state.json"]
    final = ckpt_tensors(stage, STEPS)
    assert final and all("lora_" in k or k == "latent_rows.weight" for k in final)
    moments = load_file(str(step_dir / "optimizer.safetensors"))
    assert sorted(moments) == sorted(f"{k}/{m}" for k in final for m in ("exp_avg", "exp_avg_sq"))
    # The export is the final step's weights.
    lora = {k: v for k, v in final.items() if "lora_B" in k}
    assert lora and all(any(torch.equal(v, a) for a in adapter(stage).values()) for v in lora.values())


def test_sigkill_mid_epoch_then_resume_auto_is_bit_exact_at_four_ranks(ref4, tmp_path, demo_data, tiny_tied_dirs):
    ref, _ = ref4
    model = tiny_tied_dirs["qwen2_5_vl"]
    out, r = train(tmp_path, "killed", demo_data, model, nproc=4, sets=RECIPE,
                   env={"LIVR_DS_FAULT": "after_step:4"}, check=False)
    assert r.returncode != 0
    stage = out / "stage1"
    assert not (stage / "DONE").exists() and tags(stage)[-1] == "step-00000003"  # mid-epoch 2
    _, r = train(tmp_path, "killed", demo_data, model, nproc=4, sets=RECIPE, extra=["--resume", "auto"])
    assert f"resumed from {stage / 'checkpoints' / 'step-00000003'}" in r.stderr + r.stdout
    assert curve(stage) == curve(ref / "stage1")  # loss, lr, grad norm: bit for bit
    assert_each_step_once(stage)
    assert_same_tensors(adapter(stage), adapter(ref / "stage1"))
    assert_same_tensors(ckpt_tensors(stage, STEPS), ckpt_tensors(ref / "stage1", STEPS))


# ---- ZeRO-3: the same recipe, parameters partitioned -------------------------------------------
#
# At 4 ranks and micro batch 1 the 10 samples leave ranks 2 and 3 a third micro-batch of padding
# alone in every epoch (no answer token, one image); those ranks must still enter every
# partitioned module (LM head included) or the others' all-gathers wait forever: the run
# finishing inside the test's timeout is the no-hang proof. Validation (greedy decoding, a
# different number of tokens per rank) runs in lockstep across the ranks.

@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    """ds_configs/zero3.json with every parameter partitioned and gathered only by the module that
    uses it. By default ZeRO-3 keeps parameters under 100k elements whole on every rank
    (stage3_param_persistence_threshold), which is every tensor of a tiny model, so nothing would
    be gathered; and it prefetches the next modules' parameters by the recorded trace, which on
    gloo covered for a rank that skipped the LM head (measured: the run finished, same losses).
    With neither, a rank that skips a module desynchronises the all-gathers: the code before the
    lockstep fixes aborted in step 2 of this recipe (gloo: "Connection reset by peer")."""
    with open(ds_path("zero3")) as f:
        ds = json.load(f)
    ds["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0,
                                   stage3_max_live_parameters=0, stage3_max_reuse_distance=0)
    path = tmp_path_factory.mktemp("ds") / "zero3_all_partitioned.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.fixture(scope="module")
def zero3_4(tmp_path_factory, demo_data, tiny_tied_dirs, zero3):
    """The paper-recipe run of ref4 under ZeRO-3, trained by tests/frozen_probe.py, which then
    compares every gathered parameter with a fresh backbone."""
    tmp = tmp_path_factory.mktemp("zero3_4")
    rep, r = probe(tmp, "run", demo_data, tiny_tied_dirs["qwen2_5_vl"], 4, sets=RECIPE, ds=zero3,
                   script="frozen_probe.py")
    assert r.returncode == 0, r.stderr[-6000:]
    return tmp / "run", rep, r


def test_zero3_equals_zero2_and_trains_only_lora_and_latent_rows(zero3_4, ref4):
    out, rep, r = zero3_4
    stage, ref = out / "stage1", ref4[0] / "stage1"
    assert rep["partitioned"] and "latent_rows.weight" in rep["partitioned"]  # really ZeRO-3
    # Built partitioned (deepspeed.zero.Init inside from_pretrained): before the engine existed,
    # rank 0 held a quarter of each loaded tensor. Only the embedding table is whole until the
    # engine starts (transformers' resize builds the grown table unpartitioned; the tiny model has
    # fewer spare rows than latents, the released checkpoints have hundreds and never resize).
    held, total = re.search(r"this rank holds ([\d.]+)% of its (\d+) frozen parameters", r.stderr).groups()
    assert float(held) < 50 and int(total) > 10**5
    # Loss, LR and gradient norm of every step as ZeRO-2 computed them, up to the order of
    # floating-point sums in the partitioned reductions (measured: 1e-7 relative on the loss).
    assert_close_curves(curve(stage), curve(ref), rel=1e-6)
    assert_each_step_once(stage)
    # Frozen weights bit-identical to the base model (all of them gathered and compared); the
    # effective embedding table moved exactly at the latent rows.
    assert sorted(rep["changed"]) == rep["trainable"] and rep["frozen_checked"] > 50
    assert all("lora_" in n or n == "latent_rows.weight" for n in rep["changed"])
    assert rep["moved_rows"] == rep["latent_ids"]
    # The same checkpoint and export format as ZeRO-2: same tensors, same names, close values.
    z2, z3 = ckpt_tensors(ref, STEPS), ckpt_tensors(stage, STEPS)
    assert z2.keys() == z3.keys()
    a2, a3 = adapter(ref), adapter(stage)
    assert a2.keys() == a3.keys()
    for k in a2:
        torch.testing.assert_close(a3[k], a2[k], rtol=1e-4, atol=1e-6)


def test_zero3_exports_reload_with_the_logits_of_zero2(zero3_4, ref4, demo_data, tiny_tied_dirs):
    from livr_ds.data.collate import LivrCollator
    from livr_ds.data.loader import LivrLoader
    from livr_ds.data.sources import ShardSource
    from livr_ds.export import load_export

    from livr_ds import segments

    loaded = {name: load_export(str(d / "stage1")) for name, d in (("z2", ref4[0]), ("z3", zero3_4[0]))}
    bb = loaded["z2"]
    samples = next(iter(LivrLoader([ShardSource(demo_data, split="val")], 0, 1, batch_size=4, seed=0)))
    batch = LivrCollator(bb.adapter, bb.processor, bb.latent_ids)(samples)
    with torch.no_grad():
        logits = {name: b.model.logits(batch, "bottleneck") for name, b in loaded.items()}
    real = batch["segment_ids"] != segments.PAD
    assert real.any()
    torch.testing.assert_close(logits["z3"][real], logits["z2"][real], rtol=1e-4, atol=1e-5)


def test_zero3_sigkill_resume_is_bit_exact_and_moves_to_another_world_size(zero3_4, tmp_path, demo_data,
                                                                          tiny_tied_dirs, zero3):
    import shutil

    ref = zero3_4[0] / "stage1"
    model = tiny_tied_dirs["qwen2_5_vl"]
    out, r = train(tmp_path, "killed", demo_data, model, nproc=4, sets=RECIPE, ds=zero3,
                   env={"LIVR_DS_FAULT": "after_step:4"}, check=False)
    assert r.returncode != 0
    stage = out / "stage1"
    assert tags(stage)[-1] == "step-00000003"
    shutil.copytree(out, tmp_path / "moved")  # the same checkpoint, resumed at 2 ranks below
    _, r = train(tmp_path, "killed", demo_data, model, nproc=4, sets=RECIPE, ds=zero3, extra=["--resume", "auto"])
    assert f"resumed from {stage / 'checkpoints' / 'step-00000003'}" in r.stderr + r.stdout
    assert curve(stage) == curve(ref)  # loss, lr, grad norm: bit for bit
    assert_same_tensors(adapter(stage), adapter(ref))
    assert_same_tensors(ckpt_tensors(stage, STEPS), ckpt_tensors(ref, STEPS))
    # 4 -> 2 ranks (accumulation 2 -> 4): every trainable tensor and Adam moment gathered back
    # from the new partitions equals the checkpoint's; step, LR and data position go on.
    rep, r = probe(tmp_path, "moved", demo_data, model, 2, sets=RECIPE, ds=zero3)
    assert r.returncode == 0, r.stderr[-6000:]
    assert rep["resumed_from"].endswith("step-00000003") and rep["world_size"] == 2
    assert rep["weights_exact"] and rep["moments_exact"] and rep["n_moments"] == 2 * rep["n_tensors"] > 0
    assert rep["optimizer_step"] == 3 and rep["global_step"] == 3
    assert rep["next_lr"] == [row for row in curve(ref) if row[0] == 4][0][2]
    assert_each_step_once(tmp_path / "moved" / "stage1")


def test_zero3_and_offload_stage2_from_stage1_equal_zero2(zero3_4, ref4, tmp_path, demo_data, tiny_tied_dirs, zero3):
    """Stage 2 under both stages from their Stage 1 exports (2 ranks: --init-from across world
    sizes), and ZeRO-3 with parameters and optimizer offloaded to CPU (ds_configs/zero3_offload.json)."""
    model = tiny_tied_dirs["qwen2_5_vl"]
    curves = {}
    # The ZeRO-3 run with gradient checkpointing, as the 32B/72B configs train: layers recomputed
    # in backward gather their shards again.
    for name, ds, first, sets in (("z2", "zero2", ref4[0], []),
                                  ("z3", zero3, zero3_4[0], ["model.gradient_checkpointing=true"]),
                                  ("z3_offload", "zero3_offload", zero3_4[0], [])):
        out, _ = train(tmp_path, name, demo_data, model, nproc=2, sets=RECIPE + sets, ds=ds, stage="2",
                       extra=["--init-from", str(first / "stage1")])
        assert (out / "stage2" / "DONE").exists()
        curves[name] = curve(out / "stage2")
    assert len(curves["z3"]) == 2  # schedule.stage2_epochs=1: 10 samples, global batch 8
    assert_close_curves(curves["z3"], curves["z2"], rel=1e-5)
    assert_close_curves(curves["z3_offload"], curves["z2"], rel=1e-5)


# ---- world-size changes: 2 -> 1 -> 2 ranks, the same recipe ------------------------------------

NO_DROPOUT = RECIPE + ["lora.dropout=0.0"]  # so runs at different world sizes are comparable
QWEN3 = NO_DROPOUT + ["model.family=qwen3_vl"]


@pytest.fixture(scope="module")
def ref2(tmp_path_factory, demo_data, tiny_tied_dirs):
    out, _ = train(tmp_path_factory.mktemp("ref2"), "run", demo_data, tiny_tied_dirs["qwen3_vl"], nproc=2, sets=QWEN3)
    return out / "stage1"


def test_one_rank_with_accumulation_equals_two_ranks(ref2, tmp_path, demo_data, tiny_tied_dirs):
    one, _ = train(tmp_path, "w1", demo_data, tiny_tied_dirs["qwen3_vl"], nproc=1, sets=QWEN3)
    # Same samples in each step, the loss a mean over the step's answer tokens: only the order
    # of floating-point sums differs.
    assert_close_curves(curve(one / "stage1"), curve(ref2), rel=1e-5)
    a1, a2 = adapter(one / "stage1"), adapter(ref2)
    for k in a2:
        torch.testing.assert_close(a1[k], a2[k], rtol=1e-4, atol=1e-6)


def test_resume_at_another_world_size_restores_weights_moments_and_position(ref2, tmp_path, demo_data, tiny_tied_dirs):
    model = tiny_tied_dirs["qwen3_vl"]
    # Preempted at 2 ranks: SIGTERM to rank 0 alone during step 3 (mid-epoch 2); the ranks agree
    # on it in the step's collective, finish the step and save.
    out, r = train(tmp_path, "moving", demo_data, model, nproc=2, sets=QWEN3 + ["output.save_every_steps=0"],
                   env={"LIVR_DS_FAULT": "before_step_sync:3:TERM"})
    stage = out / "stage1"
    assert r.returncode == 0 and "stopped on signal at step 3" in r.stderr + r.stdout
    assert tags(stage) == ["step-00000002", "step-00000003"]
    # 2 -> 1: every trainable tensor and Adam moment as saved, bit for bit; step, LR and data position go on.
    rep, r = probe(tmp_path, "moving", demo_data, model, 1, sets=QWEN3, env={"LIVR_DS_FAULT": "after_step:2"})
    assert rep["resumed_from"].endswith("step-00000003") and rep["world_size"] == 1
    assert rep["weights_exact"] and rep["moments_exact"] and rep["n_moments"] == 2 * rep["n_tensors"] > 0
    assert rep["optimizer_step"] == 3 and rep["global_step"] == 3
    assert rep["next_lr"] == [row for row in curve(ref2) if row[0] == 4][0][2]
    assert rep["loader"]["epoch"] == 1 and rep["loader"]["batches_consumed"] == 8  # 8 of 10 samples, 1 rank
    assert "re-initialised" not in r.stderr
    assert r.returncode != 0 and tags(stage)[-1] == "step-00000004"  # killed at step 5, after step 4's save
    # 1 -> 2, from the checkpoint the 1-rank run wrote.
    rep, r = probe(tmp_path, "moving", demo_data, model, 2, sets=QWEN3)
    assert rep["resumed_from"].endswith("step-00000004") and rep["world_size"] == 2
    assert rep["weights_exact"] and rep["moments_exact"] and rep["optimizer_step"] == 4
    assert r.returncode == 0 and (stage / "DONE").exists()
    # The stage as a whole: each step once, and the curve of an uninterrupted 2-rank run within
    # float-summation tolerance (exactly equal up to the first resume).
    assert_each_step_once(stage)
    got, want = curve(stage), curve(ref2)
    assert got[:3] == want[:3]
    assert_close_curves(got, want, rel=1e-5)


# ---- faults at every point: metrics.jsonl exact, damaged checkpoints skipped ---------------------

def test_kills_at_each_fault_point_keep_metrics_exact_and_skip_damaged_checkpoints(tmp_path, demo_data, tiny_dirs):
    model = tiny_dirs["qwen2_5_vl"]
    sets = NO_DROPOUT + ["output.keep_last=3"]
    ref, _ = train(tmp_path, "ref1", demo_data, model, nproc=1, sets=sets)
    run = lambda fault, resume, more=(): train(tmp_path, "faults", demo_data, model, nproc=1,  # noqa: E731
                                               sets=sets + list(more), env={"LIVR_DS_FAULT": fault} if fault else {},
                                               check=not fault, extra=["--resume", "auto"] if resume else [])
    stage = tmp_path / "faults" / "stage1"
    # 1. Killed before the first checkpoint (step 1 logged): the next start is a fresh one.
    _, r = run("after_step:2", False, ["output.save_every_steps=0"])
    assert r.returncode != 0 and not (stage / "checkpoints").exists() and len(metrics(stage)) == 1
    # 2. Killed during epoch 2's validation (steps 1-4 and epoch 1's row logged).
    _, r = run("validation:2", True)
    assert "no usable checkpoint" in r.stderr and r.returncode != 0
    assert list(tmp_path.glob("faults/stage1.replaced-*"))  # the first attempt was set aside, not lost
    assert tags(stage) == ["step-00000001", "step-00000002", "step-00000003"]
    # 3. Resumed from step 3, then killed while saving step 5 (step 4 saved after validation).
    _, r = run("checkpoint_mid_save:2", True)
    assert r.returncode != 0 and "resumed from" in r.stderr
    assert tags(stage) == ["step-00000002", "step-00000003", "step-00000004"]
    assert (stage / "checkpoints" / ".tmp-step-00000005").exists()  # the half-written one, never chosen
    # 4. The newest complete checkpoint is damaged (truncated): resume skips it, says why, falls back.
    damaged = stage / "checkpoints" / "step-00000004" / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    _, r = run(None, True)
    assert f"skipping checkpoint {damaged.parent}" in r.stderr and "damaged" in r.stderr
    assert f"resumed from {stage / 'checkpoints' / 'step-00000003'}" in r.stderr
    # After all that: each step and each validation once, and the uninterrupted run's numbers exactly.
    assert_each_step_once(stage)
    assert [m for m in metrics(stage) if "val_accuracy" in m] == [m for m in metrics(ref / "stage1") if "val_accuracy" in m]
    assert curve(stage) == curve(ref / "stage1")
    assert_same_tensors(adapter(stage), adapter(ref / "stage1"))
    # An explicit --resume of a damaged checkpoint stops with the file named, exit 2.
    damaged = stage / "checkpoints" / f"step-{STEPS:08d}" / "optimizer.safetensors"
    damaged.write_bytes(b"")
    _, r = train(tmp_path, "faults", demo_data, model, nproc=1, sets=sets, check=False,
                 extra=["--resume", str(damaged.parent)])
    assert r.returncode != 0 and f"{damaged} has 0 bytes" in r.stderr


def test_stage2_init_from_stage1_and_exports(tmp_path, demo_data, tiny_tied_dirs, ref4):
    from livr_ds.config import load_config
    from livr_ds.data.collate import LivrCollator
    from livr_ds.data.loader import LivrLoader
    from livr_ds.data.sources import ShardSource
    from livr_ds import export
    from livr_ds.export import load_export
    from livr_ds.modeling import build_backbone
    from livr_ds.train import checkpoint

    stage1 = str(ref4[0] / "stage1")
    base = [f"model.path={tiny_tied_dirs['qwen2_5_vl']}", "latents.num=4", "stage=2"]
    # Stage 2 starts from Stage 1's exact adapter and latent rows.
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), base)
    bb = build_backbone(cfg, policy="standard")
    fresh = export.trainable_state(bb.model)
    export.init_from_export(bb, cfg, stage1)
    loaded = export.trainable_state(bb.model)
    assert_same_tensors(loaded, adapter(stage1))
    assert not all(torch.equal(fresh[k], loaded[k]) for k in fresh)  # it really changed something
    # A different K is refused, naming it.
    bad = load_config(os.path.join(ROOT, "configs", "demo.yaml"), base[:1] + ["latents.num=2", "stage=2"])
    with pytest.raises(ValueError, match=r"latents.num is 4 there, 2 here"):
        export.init_from_export(build_backbone(bad, policy="standard"), bad, stage1)

    # The export reloads with transformers + PEFT alone and gives the engine's logits: the
    # engine's final weights are the last resume checkpoint's trainable tensors.
    engine_like = build_backbone(cfg, policy="standard")
    last = checkpoint.latest_checkpoint(os.path.join(stage1, "checkpoints"))
    checkpoint.load_resume_weights(engine_like.model, last)
    exported = load_export(stage1)
    assert exported.latent_ids == engine_like.latent_ids
    samples = next(iter(LivrLoader([ShardSource(demo_data, split="val")], 0, 1, batch_size=2, seed=0)))
    batch = LivrCollator(exported.adapter, exported.processor, exported.latent_ids)(samples)
    with torch.no_grad():
        ref = engine_like.model.eval().logits(batch, "standard")
        got = exported.model.eval().logits(batch, "standard")
    # Bit-equal, but for the latent tokens' logits of this tied head: PEFT computes them in its one
    # matmul with the merged table, training in its own (x @ rows.T); float rounding apart.
    latents = sorted(set(exported.latent_ids))
    others = [i for i in range(got.shape[-1]) if i not in latents]
    assert torch.equal(ref[..., others], got[..., others])
    torch.testing.assert_close(ref[..., latents], got[..., latents], rtol=1e-6, atol=1e-6)

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
    out, r = train(tmp_path, "stage2", demo_data, tiny_tied_dirs["qwen2_5_vl"], stage="2", extra=["--init-from", stage1])
    assert (out / "stage2" / "DONE").exists()
    assert "initialised from" in r.stderr + r.stdout

    # Every export's card carries every validation of every stage so far, as metrics.jsonl has them.
    want1, want2 = validations(stage1, 1), validations(out / "stage2", 2)
    assert want1 and want2
    stage2_card_text = (out / "stage2" / "export" / "final" / "README.md").read_text()
    stage2_card = card_validations(stage2_card_text)
    assert stage2_card == {1: want1, 2: want2}
    assert card_validations((merged_dir / "README.md").read_text()) == {1: want1}
    best_dir = ref4[0] / "stage1" / "export" / "best"  # written when it was best: the validations until then
    best_epoch = json.loads((best_dir / "livr.json").read_text())["epoch"]
    assert card_validations((best_dir / "README.md").read_text()) == {1: [v for v in want1 if v[0] <= best_epoch]}
    # and the data it was trained on, with the manifests' counts
    manifest = json.load(open(os.path.join(demo_data, "manifest.json")))["splits"]
    for split in ("train", "val"):
        counts = manifest[split]["tasks"]
        line = f"- `{demo_data}` ({split}): {manifest[split]['total']} samples (" \
            + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())) + ")"
        assert stage2_card_text.count(line) == 2, line  # Stage 1's section and Stage 2's
    best = max(want1, key=lambda v: v[2])  # the first of the highest (max keeps the first)
    assert f"best {best[2]:.2f} at epoch {best[0]}, final {want1[-1][2]:.2f} at epoch {want1[-1][0]}" in \
        (merged_dir / "README.md").read_text()


def validations(stage_dir, stage):
    """metrics.jsonl's validation records as (epoch, step, mean, {task: accuracy}), rounded as a card prints."""
    out = []
    for line in open(os.path.join(stage_dir, "metrics.jsonl")):
        rec = json.loads(line)
        if "val_accuracy" in rec and rec["stage"] == stage:
            out.append((rec["epoch"], rec["step"], round(rec["val_accuracy"], 2),
                        {k[4:]: round(v, 2) for k, v in rec.items() if k.startswith("val_") and k != "val_accuracy"}))
    return out


def card_validations(card):
    """The card's validation tables, per stage, in the shape of `validations`."""
    tables, stage, tasks = {}, None, None
    for line in card.splitlines():
        if line.startswith("### Stage "):
            stage = int(line.split()[2])
        elif line.startswith("| epoch | step | mean |"):
            tasks = [c.strip() for c in line.strip("|").split("|")][3:]
            tables[stage] = []
        elif line.startswith("| ") and tasks is not None and stage in tables and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[stage].append((int(cells[0]), int(cells[1]), float(cells[2]),
                                  {t: float(c) for t, c in zip(tasks, cells[3:]) if c != "-"}))
        elif not line.startswith("|"):
            tasks = None
    return tables


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, demo_data, tiny_dirs):
    out, r = train(tmp_path, "nan", demo_data, tiny_dirs["qwen2_5_vl"], nproc=1,
                   sets=["optim.lr=1.0e30", "optim.warmup_ratio=0.0", "output.save_every_steps=1"], check=False)
    assert r.returncode != 0
    assert re.search(r"exitcode\s*:\s*3", r.stderr)  # the trainer's own exit code, via torchrun
    assert "non-finite loss" in r.stderr and "stopping before the update" in r.stderr
    stage = out / "stage1"
    assert tags(stage) and not (stage / "DONE").exists()
    # The last checkpoint holds finite weights: the non-finite step was never applied.
    assert all(torch.isfinite(v).all() for v in ckpt_tensors(stage, int(tags(stage)[-1][5:])).values())


def test_ds_config_auto_fields_and_inconsistent_batches(tmp_path):
    from livr_ds.config import ConfigError, load_config
    from livr_ds.train.ds_config import build_ds_config

    cfg = load_config(None, ["optim.micro_batch_size=2", "optim.global_batch_size=16", "optim.lr=3e-4"])
    ds = build_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"), cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 4)
    assert ds["managed_gradient_accumulation"] is False  # the trainer decides when to step
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["bf16"]["enabled"] is False
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"inconsistent batch sizes: train_batch_size=32 .* = 16"):
        build_ds_config(str(bad), cfg, world_size=2)
    offload = build_ds_config(os.path.join(ROOT, "ds_configs", "zero2_offload.json"), cfg, world_size=2)
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    z3 = build_ds_config(os.path.join(ROOT, "ds_configs", "zero3_offload.json"), cfg, world_size=2)
    assert z3["zero_optimization"]["stage"] == 3 and z3["zero_optimization"]["offload_param"]["device"] == "cpu"
    full = load_config(None, ["model.trainable=lm"])
    with pytest.raises(ConfigError, match=r"model.trainable='lm' with ZeRO-3"):
        build_ds_config(os.path.join(ROOT, "ds_configs", "zero3.json"), full, world_size=2)
    stage4 = tmp_path / "stage4.json"
    stage4.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    with pytest.raises(ConfigError, match=r"zero_optimization.stage 0: livr-ds trains with ZeRO stage 1, 2 or 3"):
        build_ds_config(str(stage4), cfg, world_size=2)
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 2 in the DeepSpeed config"):
        build_ds_config(str(clash), cfg, world_size=2)


def test_full_model_export_round_trips_through_init_from(tmp_path, tiny_dirs):
    """model.trainable: all (tiny models from scratch) exports a whole transformers checkpoint."""
    from livr_ds.config import load_config
    from livr_ds import export
    from livr_ds.modeling import build_backbone

    sets = [f"model.path={tiny_dirs['qwen2_5_vl']}", "model.trainable=all", "latents.num=4"]
    cfg1 = load_config(None, sets + ["stage=1"])
    trained = build_backbone(cfg1, policy="bottleneck")
    with torch.no_grad():
        for p in trained.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    export.save_export(trained, cfg1, 1, str(tmp_path / "export"))
    cfg2 = load_config(None, sets + ["stage=2"])
    fresh = build_backbone(cfg2, policy="standard")
    export.init_from_export(fresh, cfg2, str(tmp_path / "export"))
    want = trained.model.hf_model.state_dict()
    got = fresh.model.hf_model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_global_batch_is_the_recipe_at_every_world_size():
    from livr_ds.config import ConfigError, load_config
    from livr_ds.train.schedule import resolve_accumulation, step_plan

    paper = load_config(os.path.join(ROOT, "configs", "livr_qwen2_5_vl_3b.yaml"))
    assert [resolve_accumulation(paper, w) for w in (1, 2, 4, 8)] == [(8, 8), (4, 8), (2, 8), (1, 8)]
    # 1,000 samples: the same 125 steps and 7 warmup steps (5%, rounded up) at 1 GPU and at 8.
    for w in (1, 2, 4, 8):
        plan = step_plan(paper, w, -(-1000 // w), epochs=4)
        assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (125, 500, 25)
    short = step_plan(paper, 4, 3, epochs=3)  # 10 samples at 4 ranks: steps of 2 + 1 micro-batches
    assert (short.steps_per_epoch, short.short_last_step, short.total_steps) == (2, 1, 6)
    with pytest.raises(ConfigError, match=r"global_batch_size 8 is not a multiple of micro batch 1 x 16 ranks = 16"):
        resolve_accumulation(paper, 16)
    clash = load_config(os.path.join(ROOT, "configs", "livr_qwen2_5_vl_3b.yaml"), ["optim.grad_accum=8"])
    assert resolve_accumulation(clash, 1) == (8, 8)
    with pytest.raises(ConfigError, match=r"optim.grad_accum 8 contradicts optim.global_batch_size 8 at 2 ranks"):
        resolve_accumulation(clash, 2)
    legacy = load_config(None, ["optim.global_batch_size=0", "optim.grad_accum=3", "optim.micro_batch_size=2"])
    assert resolve_accumulation(legacy, 4) == (3, 24)


def test_collectives_use_the_device_their_backend_needs():
    from livr_ds import distributed as dist

    assert dist.collective_device("nccl") == torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    assert dist.collective_device("gloo") == torch.device("cpu")
    assert dist.collective_device("cpu:gloo,cuda:nccl") == torch.device("cpu")
    # Without a process group the helpers answer locally (single-process evaluation, tools).
    assert dist.all_sum([1.0, 2.0]) == [1.0, 2.0] and dist.any_rank(True) is True
    # Every collective livr-ds issues goes through livr_ds/distributed.py: nothing else imports
    # torch.distributed under a name or calls a collective on it directly.
    import re as _re

    helper = os.path.join(ROOT, "livr_ds", "distributed.py")
    direct = _re.compile(r"import torch\.distributed as|from torch\.distributed import|"
                         r"torch\.distributed\.(all_reduce|all_gather\w*|broadcast\w*|reduce\w*|gather\w*|scatter\w*)\(")
    offenders = []
    for base, _, files in os.walk(os.path.join(ROOT, "livr_ds")):
        for name in files:
            path = os.path.join(base, name)
            if name.endswith(".py") and path != helper:
                offenders += [f"{path}: {m.group(0)}" for m in direct.finditer(open(path).read())]
    assert not offenders, offenders


def test_bad_samples_are_counted_over_all_ranks(tmp_path, demo_data, tiny_dirs):
    """data.on_error: skip at 2 ranks: the checkpoint and the log carry the bad samples of every
    rank, not rank 0's alone."""
    import glob
    import shutil

    from tests.conftest import damage_first_image

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    damaged = []
    for shard in sorted(glob.glob(str(data / "*" / "train-*.tar")))[:2]:  # one sample of each task
        damaged.append(damage_first_image(shard))
    sets = ["data.on_error=skip", "schedule.stage1_epochs=2", "data.val=[]", "output.save_every_steps=1"]
    out, r = train(tmp_path, "bad", str(data), tiny_dirs["qwen2_5_vl"], nproc=2, sets=sets)

    def last_state(stage_dir):
        return json.loads((stage_dir / "checkpoints" / tags(stage_dir)[-1] / "trainer_state.json").read_text())

    state = last_state(out / "stage1")
    assert len(damaged) == 2
    assert state["loader_stats"]["bad"] == state["bad_samples"] == 2 * len(damaged)  # each, once per epoch
    assert "4 bad samples skipped so far (all ranks" in r.stderr

    # Killed in epoch 2 and resumed: the counters carry on from the checkpoint, they do not restart.
    steps_per_epoch = state["global_step"] // 2
    killed, r = train(tmp_path, "bad-killed", str(data), tiny_dirs["qwen2_5_vl"], nproc=2, sets=sets,
                      env={"LIVR_DS_FAULT": f"after_step:{steps_per_epoch + 1}"}, check=False)
    assert r.returncode != 0 and not (killed / "stage1" / "DONE").exists()
    train(tmp_path, "bad-killed", str(data), tiny_dirs["qwen2_5_vl"], nproc=2, sets=sets, extra=["--resume", "auto"])
    resumed = last_state(killed / "stage1")
    assert resumed["global_step"] == state["global_step"]
    assert resumed["loader_stats"] == {**state["loader_stats"], "bad_keys_rank0": resumed["loader_stats"]["bad_keys_rank0"]}
    assert resumed["bad_samples"] == state["bad_samples"]


def test_a_sample_the_processor_refuses_stops_with_its_name_or_is_a_counted_skip(tmp_path, tiny_dirs):
    """A 4000 x 10 image in shards written elsewhere: the processor refuses it in the collate step,
    which ran outside the per-sample error handling (an uncaught ValueError stopped
    launch/train.py). on_error: raise stops with exit 2 naming shard:key and the reason; skip
    trains on with the sample replaced and counted, once per epoch."""
    from tests.conftest import REFUSED_KEY, write_shards_with_a_refused_image

    data = write_shards_with_a_refused_image(tmp_path / "data")
    sets = ["data.val=[]", "schedule.stage1_epochs=2"]
    out, r = train(tmp_path, "raise", data, tiny_dirs["qwen2_5_vl"], nproc=1, sets=sets, check=False)
    assert r.returncode != 0 and re.search(r"exitcode\s*:\s*2", r.stderr), r.stderr[-3000:]  # via torchrun
    assert "Traceback" not in r.stderr.split("failed (exitcode")[0]  # one line, not the worker's traceback
    assert re.search(rf"train-\d+\.tar:{REFUSED_KEY}: the processor refused the sample \(ValueError: [^)]*aspect ratio",
                     r.stderr), r.stderr[-3000:]
    assert not (out / "stage1" / "DONE").exists()
    out, r = train(tmp_path, "skip", data, tiny_dirs["qwen2_5_vl"], nproc=1, sets=[*sets, "data.on_error=skip"])
    stage = out / "stage1"
    state = json.loads((stage / "checkpoints" / tags(stage)[-1] / "trainer_state.json").read_text())
    assert state["bad_samples"] == 2 and state["loader_stats"]["bad_keys_rank0"] == [REFUSED_KEY] * 2
    assert [s for s, *_ in curve(stage)] == [1, 2, 3, 4]  # 7 samples at a global batch of 4: 2 steps an epoch
