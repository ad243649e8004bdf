"""slurm/ scripts against a real one-node SLURM (munged + slurmctld + slurmd on this host).

The cluster comes from tests/slurm_cluster.py; the tests skip (with the reason) only where this
machine cannot run the daemons (not root, packages absent and not installable). Every wait is
bounded. CPU use: one node, at most two tasks of one CPU each.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

import slurm_cluster as sc

ROOT = sc.REPO
SBATCH = os.path.join(ROOT, "slurm", "train.sbatch")
SUBMIT = os.path.join(ROOT, "slurm", "submit.sh")
DEMO = os.path.join(ROOT, "configs", "demo.yaml")

pytestmark = pytest.mark.timeout(600)  # every wait below is bounded too; this is the backstop


@pytest.fixture(scope="session")
def slurm():
    reason = sc.unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = sc.SlurmCluster.start(timeout=60)
    yield cluster
    cluster.stop()


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _submit(cluster, cwd, *args, env=None, timeout=60) -> dict[str, str]:
    proc = cluster.run(["bash", SUBMIT, *args], cwd=cwd, timeout=timeout, check=False,
                       env={"LIVR_PYTHON": sys.executable, **(env or {})})
    assert proc.returncode == 0, f"submit.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return dict(ln.split("=", 1) for ln in proc.stdout.splitlines() if "=" in ln)


def _ts(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value)


# ---- the cluster and the scripts, without the trainer -----------------------------------------

def test_cluster_runs_per_task_srun_steps(slurm, tmp_path):
    """srun starts one process per task and each sees its own SLURM_PROCID (evaluated in the
    task, not once in the batch shell)."""
    out = tmp_path / "job.out"
    job = slurm.sbatch(["--ntasks=2", "--cpus-per-task=1", f"--output={out}", "--wrap",
                        "srun bash -c 'echo task=$SLURM_PROCID/$SLURM_NTASKS local=$SLURM_LOCALID host=$(hostname)'"])
    info = slurm.wait_job(job, timeout=60)
    text = _read(out)
    assert info["JobState"] == "COMPLETED", text
    assert sorted(re.findall(r"task=(\d)/2", text)) == ["0", "1"], text


def test_train_sbatch_and_submit_parse(slurm, tmp_path):
    assert subprocess.run(["bash", "-n", SBATCH]).returncode == 0
    for script in ("submit.sh", "sweep.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(ROOT, "slurm", script)]).returncode == 0
    # sbatch reads the #SBATCH directives and would schedule the job (without submitting it).
    proc = slurm.run(["sbatch", "--test-only", "--ntasks-per-node=2", f"--output={tmp_path}/x-%j.out",
                      SBATCH, "--config", DEMO, "--stage", "1"], check=False)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr
    head = _read(SBATCH)
    for directive in ("--requeue", "--open-mode=append", "--signal=B:USR1@"):
        assert re.search(rf"^#SBATCH {re.escape(directive)}", head, re.M), directive


def test_submit_dry_run_and_stage1_skip(tmp_path):
    """No cluster needed: the chain submit.sh would build."""
    env = {**os.environ, "LIVR_PYTHON": sys.executable}
    proc = subprocess.run(["bash", SUBMIT, "--config", DEMO, "--dry-run", "--set", "output.dir=" + str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "stage1=" in proc.stdout and "stage2=" in proc.stdout
    s2 = [ln for ln in proc.stderr.splitlines() if "--stage 2" in ln][0]
    assert "--dependency=afterok:" in s2 and f"--init-from {tmp_path}/r/stage1" in s2
    proc = subprocess.run(["bash", SUBMIT, "--config", DEMO, "--dry-run", "--set", "schedule.stage1_epochs=0",
                           "--set", "latents.num=0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "stage1=" not in proc.stdout and "stage2=" in proc.stdout
    assert "--dependency" not in proc.stderr and "--init-from" not in proc.stderr
    proc = subprocess.run(["bash", SUBMIT, "--config", DEMO, "--dry-run", "--set", "optim.lr=-1"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "optim.lr" in proc.stderr


STUB = r'''#!{python}
"""Stands in for python under train.sbatch: `-` (the config probe) goes to the real Python;
launch/train.py is emulated: record the rank environment, stop on SIGUSR1 like the trainer
(exit 0, no DONE) or finish (DONE) on the run after a restart."""
import os, signal, sys, time, json
if sys.argv[1] == "-":
    os.execv({python!r}, [{python!r}] + sys.argv[1:])
args = sys.argv[2:]
stage = args[args.index("--stage") + 1]
out = os.path.join(os.environ["STUB_OUT"], "stage" + stage)
os.makedirs(out, exist_ok=True)
rank = os.environ["SLURM_PROCID"]
env = {{k: os.environ.get(k) for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR",
                                      "MASTER_PORT", "SLURM_RESTART_COUNT", "OMP_NUM_THREADS")}}
with open(os.path.join(out, f"env-{{rank}}-{{env['SLURM_RESTART_COUNT'] or 0}}.json"), "w") as f:
    json.dump({{"env": env, "argv": args}}, f)
stop = []
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
restarted = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
print(f"rank {{rank}} started (restart {{restarted}}) argv {{args}}", flush=True)
open(os.path.join(out, f"running-{{rank}}"), "w").close()
deadline = time.time() + (90 if stage == "1" and not restarted else 1)
while time.time() < deadline and not stop:
    time.sleep(0.1)
if stop:
    print(f"rank {{rank}} got SIGUSR1: saved, exiting 0", flush=True)
    sys.exit(0)
if rank == "0":
    open(os.path.join(out, "DONE"), "w").close()
print(f"rank {{rank}} finished", flush=True)
'''


def test_usr1_to_batch_shell_is_forwarded_and_requeues(slurm, tmp_path):
    """The preemption path with a stub trainer: SIGUSR1 to the batch shell only (what
    --signal=B:USR1@T does) reaches every task through srun; the tasks exit 0 without DONE; the
    job requeues itself, runs again under the same id with --resume auto, and finishes."""
    stub = tmp_path / "python-stub"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"base: {DEMO}\noutput: {{dir: {out}}}\n")
    ids = _submit(slurm, tmp_path, "--config", str(cfg), "--tasks-per-node", "2", "--cpus-per-task", "1",
                  env={"LIVR_PYTHON": str(stub), "STUB_OUT": str(out)})
    job = int(ids["stage1"])
    deadline = time.time() + 60
    while not (os.path.exists(out / "stage1" / "running-0") and os.path.exists(out / "stage1" / "running-1")):
        assert time.time() < deadline, slurm.job(job)
        time.sleep(0.3)
    os.remove(out / "stage1" / "running-0")
    slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
    info = slurm.wait_job(job, timeout=120, states=("COMPLETED", "FAILED", "CANCELLED"))
    log = _read(glob.glob(str(out / "logs" / f"*-{job}.out"))[0])
    assert info["JobState"] == "COMPLETED", log
    assert "got SIGUSR1: forwarding" in log and "requeueing job" in log, log
    assert log.count("rank 0 got SIGUSR1") == 1 and log.count("rank 1 got SIGUSR1") == 1, log
    assert int(info.get("Restarts", "1")) == 1, info
    assert os.path.exists(out / "stage1" / "DONE")
    runs = {}
    for path in glob.glob(str(out / "stage1" / "env-*.json")):
        rec = json.loads(_read(path))
        runs[os.path.basename(path)] = rec
    assert sorted(runs) == ["env-0-0.json", "env-0-1.json", "env-1-0.json", "env-1-1.json"], sorted(runs)
    for name, rec in runs.items():
        e = rec["env"]
        assert e["SLURM_PROCID"] == name.split("-")[1] and e["SLURM_NTASKS"] == "2"
        assert e["MASTER_ADDR"] == slurm.host and e["MASTER_PORT"] == str(20000 + job % 20000)
        assert e["OMP_NUM_THREADS"] == "1"
        assert rec["argv"][-2:] == ["--resume", "auto"] and "--ds" in rec["argv"]
    # Stage 2 waited for the requeued Stage 1 (afterok is met only by its final completion).
    s2 = slurm.wait_job(int(ids["stage2"]), timeout=60)
    assert s2["JobState"] == "COMPLETED"
    s2_argv = json.loads(_read(out / "stage2" / "env-0-0.json"))["argv"]
    assert s2_argv[s2_argv.index("--init-from") + 1] == str(out / "stage1")
    s1_end = max(_ts(r["EndTime"]) for r in slurm.completions(job))
    assert _ts(s2["StartTime"]) >= s1_end


# ---- the real trainer -------------------------------------------------------------------------

def _train_overrides(tmp: str, data: str) -> list[str]:
    sets = {
        "model.path": f"tiny:{tmp}/tiny-model",
        "data.train": f"[{data}]",
        "data.val": f"[{data}]",
        "data.num_workers": "1",
        "data.val_max_samples": "8",
        "schedule.stage1_epochs": "2",
        "schedule.stage2_epochs": "2",
        "optim.micro_batch_size": "1",
        "optim.global_batch_size": "2",  # 2 tasks x micro batch 1
        "logging.every_steps": "1",
        "logging.wandb": "disabled",
        "logging.progress_bar": "false",
        "output.save_every_steps": "0",
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def train_setup(slurm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm-train")
    data = tmp / "demo_data"
    proc = subprocess.run([sys.executable, "-m", "livr_ds.cli", "shards", "demo", "--out", str(data), "--n-train", "16",
                           "--n-val", "4", "--n-test", "4", "--tasks", "counting", "localization", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    # Written here, once: the jobs' ranks then only read it (tiny:<dir> uses an existing copy).
    proc = subprocess.run([sys.executable, "-m", "livr_ds.cli", "tiny-model", "--family", "qwen2_5_vl",
                           "--out", str(tmp / "tiny-model")], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return tmp, _train_overrides(str(tmp), str(data))


def _run_chain(slurm, tmp, overrides, out_dir, interrupt=None, timeout=300) -> dict:
    ids = _submit(slurm, tmp, "--config", DEMO, "--tasks-per-node", "2", "--cpus-per-task", "1",
                  *overrides, "--set", f"output.dir={out_dir}")
    s1, s2 = int(ids["stage1"]), int(ids["stage2"])
    pending = slurm.job(s2)
    assert pending.get("JobState") == "PENDING" and f"afterok:{s1}" in pending.get("Dependency", ""), pending
    if interrupt:
        interrupt(s1, s2)
    deadline = time.time() + timeout
    i1 = slurm.wait_job(s1, timeout=max(1, deadline - time.time()))
    i2 = slurm.wait_job(s2, timeout=max(1, deadline - time.time())) if i1["JobState"] == "COMPLETED" else {}
    logs = {n: _read(p) for n, p in [(n, (glob.glob(os.path.join(out_dir, "logs", f"*-{j}.out")) or [None])[0])
                                     for n, j in (("stage1", s1), ("stage2", s2))] if p}
    return {"ids": (s1, s2), "info": (i1, i2), "logs": logs}


@pytest.fixture(scope="module")
def reference_chain(slurm, train_setup):
    tmp, overrides = train_setup
    t0 = time.time()
    res = _run_chain(slurm, tmp, overrides, str(tmp / "ref"))
    res["seconds"] = time.time() - t0
    res["steps"] = {s: int(_read(tmp / "ref" / s / "DONE").strip() or 0) if os.path.exists(tmp / "ref" / s / "DONE")
                    else 0 for s in ("stage1", "stage2")}
    return res


def test_submit_runs_stage1_then_stage2(slurm, train_setup, reference_chain):
    tmp, _ = train_setup
    res = reference_chain
    (i1, i2), logs = res["info"], res["logs"]
    assert i1["JobState"] == "COMPLETED", logs.get("stage1")
    assert i2 and i2["JobState"] == "COMPLETED", logs.get("stage2")
    for stage in (1, 2):
        assert os.path.exists(tmp / "ref" / f"stage{stage}" / "DONE")
        assert os.path.exists(tmp / "ref" / f"stage{stage}" / "export" / "final" / "adapter_model.safetensors")
    s1 = [r for r in slurm.completions(res["ids"][0])]
    s2 = [r for r in slurm.completions(res["ids"][1])]
    assert s1 and s2
    assert _ts(s2[-1]["StartTime"]) >= _ts(s1[-1]["EndTime"])  # the dependency held
    assert os.path.getmtime(tmp / "ref" / "stage1" / "DONE") <= _ts(s2[-1]["StartTime"]).timestamp() + 1
    assert f"initialised from {tmp / 'ref' / 'stage1'}" in logs["stage2"], logs["stage2"]
    assert "resumed from" not in logs["stage1"] + logs["stage2"]


def _load_adapter(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "export", "final", "adapter_model.safetensors"))


def _wait_for_steps(slurm, metrics: str, job: int, n: int, timeout: float = 150) -> int:
    """Block until training has logged optimizer step `n` (so every rank has its handlers)."""
    deadline = time.time() + timeout
    while True:
        steps = [json.loads(ln).get("step") or 0 for ln in _read(metrics).splitlines() if ln.strip()] \
            if os.path.exists(metrics) else []
        if steps and max(steps) >= n:
            return max(steps)
        state = slurm.job(job).get("JobState")
        assert time.time() < deadline and state in ("PENDING", "RUNNING"), f"job {job} {state}, steps {steps}"
        time.sleep(0.1)


def test_interrupted_chain_resumes_bitwise(slurm, train_setup, reference_chain):
    """Stage 1: SIGUSR1 to the batch shell mid-epoch (what --signal=B:USR1@T sends): every rank
    saves and exits 0, the job requeues itself and resumes. Stage 2: `scontrol requeue` from
    outside (what a preempting controller does): SIGTERM, save within KillWait, requeued by SLURM,
    resumed. Both stages end with weights bitwise equal to the uninterrupted chain's."""
    tmp, overrides = train_setup
    out = tmp / "interrupted"
    sent = {}

    def interrupt(s1, s2):
        sent["stage1"] = _wait_for_steps(slurm, str(out / "stage1" / "metrics.jsonl"), s1, 2)
        slurm.run(["scancel", "--batch", "--signal=USR1", str(s1)])
        sent["stage2"] = _wait_for_steps(slurm, str(out / "stage2" / "metrics.jsonl"), s2, 2, timeout=240)
        slurm.run(["scontrol", "requeue", str(s2)])

    res = _run_chain(slurm, tmp, overrides, str(out), interrupt=interrupt)
    (i1, i2), logs = res["info"], res["logs"]
    log1, log2 = logs.get("stage1", ""), logs.get("stage2", "")
    problems = []  # every check, so one run reports all that is wrong

    def check(ok, what):
        if not ok:
            problems.append(what)

    check(i1["JobState"] == "COMPLETED" and int(i1.get("Restarts", 1)) == 1,
          f"stage 1: {i1.get('JobState')}, {i1.get('Restarts')} restarts")
    check("got SIGUSR1: forwarding" in log1 and "requeueing job" in log1, "stage 1 did not requeue itself")
    check(bool(i2) and i2.get("JobState") == "COMPLETED" and int(i2.get("Restarts", 1)) == 1,
          f"stage 2: {i2.get('JobState')}, {i2.get('Restarts')} restarts")
    check("got SIGTERM" in log2 and "not requeued here" in log2, "stage 2 shell did not see the controller's SIGTERM")
    for stage, text in (("stage1", log1), ("stage2", log2)):
        m = re.search(r"resumed from \S*step-0*(\d+)", text)
        check(m is not None, f"{stage}: no 'resumed from' after the interruption at step {sent.get(stage)}")
        if m:
            total = reference_chain["steps"][stage]
            check(sent[stage] <= int(m.group(1)) < total,
                  f"{stage}: resumed from step {m.group(1)}, interrupted at {sent[stage]} of {total}")
    for stage in ("stage1", "stage2"):
        if not os.path.exists(out / stage / "export" / "final" / "adapter_model.safetensors"):
            problems.append(f"{stage}: no export/final")
            continue
        ref, got = _load_adapter(tmp / "ref" / stage), _load_adapter(out / stage)
        diff = sorted(k for k in ref if k not in got or not torch_equal(ref[k], got[k]))
        check(ref.keys() == got.keys() and not diff,
              f"{stage}: {len(diff)} of {len(ref)} tensors differ from the uninterrupted run, e.g. {diff[:2]}")
    tails = "\n".join(f"--- {n} log (last 60 lines)\n" + "\n".join(t.splitlines()[-60:]) for n, t in logs.items())
    assert not problems, "\n".join(problems) + "\n" + tails


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
