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
import shlex
import shutil
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


# The one-node cluster (`slurm`), the demo data (`train_setup`) and the uninterrupted reference
# chain (`reference_chain`) are session fixtures in conftest.py: tests/test_multinode.py compares
# its multi-node runs with the same reference run.


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


# ---- the fixture does not depend on the host's own SLURM set-up ---------------------------------

def test_cgroup_conf_by_version_and_plugins(tmp_path):
    """No cluster needed: cgroup.conf never names what the installed SLURM lacks."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "cgroup_v1.so").touch()

    def body(version, host_plugin):
        text = sc.cgroup_conf(version, str(plugins), host_plugin)
        return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]

    assert body((23, 2, 0), "cgroup/v1") == body((24, 11, 1), None) == ["CgroupPlugin=disabled"]
    assert body((22, 5, 8), "cgroup/v1") == ["CgroupPlugin=cgroup/v1"]  # 22.05 has no "disabled"
    assert body((22, 5, 8), "cgroup/v2") == ["CgroupPlugin=autodetect"]  # cgroup_v2.so not installed
    assert body((21, 8, 8), None) == ["CgroupPlugin=autodetect"]
    assert body((20, 11, 9), "cgroup/v1") == body(None, "cgroup/v1") == []  # defaults: valid everywhere
    mounts = tmp_path / "mounts"
    for lines, want in ((["cgroup2 /sys/fs/cgroup cgroup2 rw 0 0"], "cgroup/v2"),
                        (["tmpfs /sys/fs/cgroup tmpfs ro 0 0", "cgroup /sys/fs/cgroup/systemd cgroup rw 0 0",
                          "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0"], "cgroup/v1"),
                        (["tmpfs /sys/fs/cgroup tmpfs ro 0 0", "cgroup2 /sys/fs/cgroup/systemd cgroup2 rw 0 0"],
                         "cgroup/v2"),
                        (["proc /proc proc rw 0 0"], None)):
        mounts.write_text("\n".join(lines) + "\n")
        assert sc._host_cgroup_plugin(str(mounts)) == want, lines


def test_installed_version_is_read_without_a_config():
    """slurmd -V answers at once with no usable slurm.conf (the clients' --version would read
    one, or wait 60 s for one); the cgroup.conf for it names only installed plugins."""
    if sc.missing_binaries():
        pytest.skip(f"SLURM not installed: {sc.missing_binaries()}")
    t0 = time.time()
    version = sc.slurm_version()
    assert version and version >= (17, 0, 0) and time.time() - t0 < 5, version
    if shutil.which("dpkg-query"):
        pkg = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "slurmd"], capture_output=True, text=True)
        if pkg.returncode == 0 and pkg.stdout:
            assert sc._parse_version(pkg.stdout) == version, (pkg.stdout, version)
    text = sc.cgroup_conf(version, sc.plugin_dir())
    named = re.findall(r"^CgroupPlugin=(\S+)", text, re.M)
    if version[:2] < (23, 2):
        assert "disabled" not in named, text
    for plugin in named:
        assert plugin in ("disabled", "autodetect") or os.path.exists(
            os.path.join(sc.plugin_dir(), plugin.replace("/", "_") + ".so")), text


# A host that is a node of a real cluster: its /etc/slurm has a slurm.conf (whose controller this
# machine cannot reach), a cgroup.conf and a plugstack.conf that would each break our cluster.
HOST_SLURM_CONF = """\
ClusterName=hostcluster
SlurmctldHost=ctl-that-does-not-exist(192.0.2.1)
AuthType=auth/munge
NodeName=node-that-does-not-exist CPUs=1 State=UNKNOWN
PartitionName=hostpart Nodes=node-that-does-not-exist Default=YES State=UP
"""
HOST_CGROUP_CONF = "CgroupPlugin=cgroup/does-not-exist\n"
HOST_PLUGSTACK_CONF = "required /nonexistent/livr-host-spank.so\n"

# Runs inside the private mount namespace: the fixture's detection and config, a cluster, a job.
HOST_PROBE = r"""
import json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import slurm_cluster as sc
rec = {"etc_slurm": sorted(os.listdir("/etc/slurm"))}
if os.path.exists("/etc/slurm/slurm.conf"):  # what a client without SLURM_CONF meets here
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    t0 = time.time()
    p = subprocess.run(["sbatch", "--version"], env=env, capture_output=True, text=True, timeout=30)
    rec["host_sbatch"] = {"rc": p.returncode, "err": p.stderr[-2000:], "s": time.time() - t0}
t0 = time.time()
cluster = sc.SlurmCluster.start(timeout=60)
try:
    rec["start_s"] = round(time.time() - t0, 1)
    rec["version"] = cluster.version
    rec["cgroup_conf"] = cluster.cgroup_conf_text
    rec["conf"] = cluster.conf
    job = cluster.sbatch(["--ntasks=1", "--output=" + sys.argv[2], "--wrap", "srun bash -c 'echo conf=$SLURM_CONF'"])
    rec["job"] = cluster.wait_job(job, timeout=60).get("JobState")
finally:
    cluster.stop()
print("RESULT " + json.dumps(rec))
"""


@pytest.mark.parametrize("host", ["no-host-config", "host-config-dead-controller"])
def test_fixture_ignores_host_slurm_config(host, tmp_path):
    """The fixture under both host set-ups, simulated in a private mount namespace (a temp dir
    bind-mounted over /etc/slurm; nothing outside the namespace changes): no slurm.conf at all,
    and a cluster node's /etc/slurm (slurm.conf naming an unreachable controller, a cgroup.conf
    and plugstack.conf that would break slurmd/srun if read). Either way: the same version and
    cgroup.conf as here, the cluster starts without waiting on a controller, a job step runs."""
    reason = sc.unavailable_reason()
    if reason:
        pytest.skip(reason)
    if not os.path.isdir("/etc/slurm") or not shutil.which("unshare"):
        pytest.skip("needs /etc/slurm (as a mount point) and unshare")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.strip()}")
    etc = tmp_path / "etc-slurm"
    etc.mkdir()
    if host == "host-config-dead-controller":
        (etc / "slurm.conf").write_text(HOST_SLURM_CONF)
        (etc / "cgroup.conf").write_text(HOST_CGROUP_CONF)
        (etc / "plugstack.conf").write_text(HOST_PLUGSTACK_CONF)
    script = tmp_path / "probe.py"
    script.write_text(HOST_PROBE)
    out = tmp_path / "job.out"
    inner = (f"mount --bind {shlex.quote(str(etc))} /etc/slurm && exec {shlex.quote(sys.executable)} "
             f"{shlex.quote(str(script))} {shlex.quote(os.path.dirname(sc.__file__))} {shlex.quote(str(out))}")
    try:
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
                              capture_output=True, text=True, timeout=150)
    finally:
        sc.cleanup_stale()  # a probe that died or timed out leaves its cluster to us
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rec = json.loads(lines[-1][len("RESULT "):])
    if host == "no-host-config":
        assert rec["etc_slurm"] == [], rec
    else:  # the simulation is real: a client without SLURM_CONF reads the host's files (and
        # fails on its plugstack.conf at once, instead of searching 60 s for a config)
        assert rec["etc_slurm"] == ["cgroup.conf", "plugstack.conf", "slurm.conf"], rec
        host = rec["host_sbatch"]
        assert host["rc"] != 0 and "/etc/slurm/plugstack.conf" in host["err"] and host["s"] < 20, host
    version = sc.slurm_version()
    assert tuple(rec["version"]) == version, rec
    assert rec["cgroup_conf"] == sc.cgroup_conf(version, sc.plugin_dir()), rec
    if version[:2] < (23, 2):
        assert "disabled" not in rec["cgroup_conf"], rec
    assert rec["job"] == "COMPLETED", rec
    assert _read(out).split() == [f"conf={rec['conf']}"], _read(out)
    assert rec["start_s"] < 30, rec  # no wait for a config or a controller


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
        assert rec["argv"][-2:] == ["--resume", "auto"] and "--ds" not in rec["argv"]  # the YAML's `deepspeed` key decides
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


def make_train_data(tmp) -> list[str]:
    """Demo shards and a tiny model under `tmp`; returns the --set overrides that train on them."""
    data = tmp / "demo_data"
    proc = subprocess.run([sys.executable, "-m", "livr_ds.cli", "shards", "demo", "--out", str(data), "--n-train", "16",
                           "--n-val", "4", "--n-test", "4", "--tasks", "counting", "localization", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    # Written here, once: the jobs' ranks then only read it (tiny:<dir> uses an existing copy).
    proc = subprocess.run([sys.executable, "-m", "livr_ds.cli", "tiny-model", "--family", "qwen2_5_vl",
                           "--out", str(tmp / "tiny-model")], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return _train_overrides(str(tmp), str(data))


def _run_chain(slurm, tmp, overrides, out_dir, interrupt=None, timeout=300,
               layout=("--tasks-per-node", "2", "--cpus-per-task", "1"), env=None) -> dict:
    ids = _submit(slurm, tmp, "--config", DEMO, *layout, *overrides, "--set", f"output.dir={out_dir}", env=env)
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
