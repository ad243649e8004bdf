"""slurm/ scripts across several hosts: a two-node SLURM cluster made of network/UTS/mount
namespaces on this machine (tests/slurm_multihost.py), and the demo's training jobs spanning it.

What runs (tiny demo sizes; each run is shared by the tests that check it):

* the session's reference chain (conftest.py `reference_chain`, on the one-node cluster of
  tests/slurm_cluster.py): one node x 2 tasks, Stage 1 -> Stage 2, the reference at world size 2;
* ref4  - one node x 4 tasks, Stage 1 -> Stage 2: the reference at world size 4;
* span4 - two nodes x 2 tasks (srun), the chain: must equal ref4 bit for bit;
* torch4 - two nodes, one `torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d` each,
  Stage 1: must equal ref4's Stage 1 bit for bit;
* elastic - two nodes x 1 task, the chain: Stage 1 requeued by `scontrol requeue` while it runs
  on both nodes (resumes bit-exactly, equals the reference); Stage 2 interrupted the same way
  after node 2 was drained, resized to the one node left and resumed there at world size 1 from
  the world-2 checkpoint (same global batch, same schedule);
* crash - two nodes x 1 task, Stage 1: node 2 dies mid-run (slurmd and job processes SIGKILLed);
  the job must end within the cluster's SlurmdTimeout with the node failure named, be requeued
  by SLURM, and resume from the last checkpoint once the node is back (equals the reference's
  Stage 1).

Every wait is bounded; the cluster is torn down by its fixture even when a test fails, and by
the next session if this one is killed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import slurm_cluster as sc
import slurm_multihost as mh
from test_slurm import DEMO, _load_adapter, _read, _run_chain, _submit, _train_overrides, _wait_for_steps, torch_equal

pytestmark = pytest.mark.timeout(900)  # the backstop; every wait below has its own bound

SLURMD_TIMEOUT = 10  # the cluster's: how long a dead node goes unnoticed (see test_node_death...)
RANK_LINE = re.compile(r"\[rank (\d+)/(\d+)\] host (\S+), local rank (\d+), master (\S+?):(\d+)")


@pytest.fixture(scope="module")
def cluster():
    reason = mh.unavailable_reason()
    if reason:
        pytest.skip(reason)
    c = mh.MultiHostCluster.start(nodes=2, slurmd_timeout=SLURMD_TIMEOUT)
    yield c
    c.stop()


# ---- the cluster itself -----------------------------------------------------------------------

PEER_CHECK = r"""
import os, socket, sys, time
rank, host = int(os.environ["SLURM_PROCID"]), socket.gethostname()
first = sys.argv[1]
if rank == 0:  # listen on the first node; the other node connects to it by name
    srv = socket.create_server(("0.0.0.0", int(sys.argv[2])))
    srv.settimeout(30)
    conn, (addr, _) = srv.accept()
    peer = conn.recv(100).decode()
    print(f"rank0 host={host} own={socket.gethostbyname(host)} peer={peer} from={addr}", flush=True)
else:
    deadline = time.time() + 30
    while True:
        try:
            s = socket.create_connection((first, int(sys.argv[2])), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    s.sendall(host.encode())
    print(f"rank{rank} host={host} own={socket.gethostbyname(host)} node={os.environ['SLURM_NODEID']}", flush=True)
"""


def test_nodes_are_separate_hosts(cluster, tmp_path):
    """Each node has its own hostname and address; names resolve on every node to the right
    address; a task on node 2 reaches node 1 by name over the veth link; the host's own name
    resolution is untouched (the node names do not resolve outside the cluster)."""
    n1, n2 = cluster.nodes
    script = tmp_path / "peer.py"
    script.write_text(PEER_CHECK)
    out = tmp_path / "job.out"
    job = cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", f"--output={out}", "--wrap",
                          f"srun {sys.executable} {script} $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) 23456"])
    info = cluster.wait_job(job, timeout=90)
    text = _read(out)
    assert info["JobState"] == "COMPLETED", text
    assert f"rank0 host={n1} own={cluster.addr[n1]} peer={n2} from={cluster.addr[n2]}" in text, text
    assert f"rank1 host={n2} own={cluster.addr[n2]} node=1" in text, text
    assert socket.gethostname() == cluster.host
    with pytest.raises(OSError):
        socket.gethostbyname(n1)  # only the nodes' private hosts file knows the test hosts
    with open("/etc/hosts") as f:
        assert n1 not in f.read()


def test_teardown_leaves_nothing(tmp_path):
    """A second cluster, stopped normally, and a third whose owner dies without stopping it
    (a killed test session): afterwards no daemon, job process, namespace holder, veth, bridge or
    directory of either is left (the second by stop(), the third by the next cleanup_stale)."""
    reason = mh.unavailable_reason()
    if reason:
        pytest.skip(reason)

    def leftovers(rec):
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        procs = [p for p in sc._pids_with_env(f"SLURM_CONF={rec['conf']}")]
        return {"links": [ln for ln in [rec["bridge"], *rec["links"]] if f" {ln}:" in links or f" {ln}@" in links],
                "procs": procs, "holders": [p for p in rec["holders"] if sc._alive(p)],
                "dir": os.path.exists(rec["root"])}

    c = mh.MultiHostCluster.start(nodes=2)
    rec = {"conf": c.conf, "root": c.root, "bridge": c.bridge, "holders": [p.pid for p in c.holder.values()],
           "links": json.loads(_read(os.path.join(c.root, "network.json")))["links"]}
    assert leftovers(rec)["links"] and leftovers(rec)["holders"]  # the check sees a live cluster
    c.stop()
    assert leftovers(rec) == {"links": [], "procs": [], "holders": [], "dir": False}

    # An owner killed with SIGKILL: nothing of its cluster goes away by itself...
    probe = tmp_path / "owner.py"
    probe.write_text(textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {os.path.dirname(mh.__file__)!r})
        import slurm_multihost as mh
        c = mh.MultiHostCluster.start(nodes=2)
        print(json.dumps({{"conf": c.conf, "root": c.root, "bridge": c.bridge,
                          "holders": [p.pid for p in c.holder.values()],
                          "links": json.load(open(c.root + "/network.json"))["links"]}}), flush=True)
        time.sleep(600)
    """))
    owner = subprocess.Popen([sys.executable, str(probe)], stdout=subprocess.PIPE, text=True)
    try:
        rec = json.loads(owner.stdout.readline())
    finally:
        owner.kill()
        owner.wait(timeout=10)
    left = leftovers(rec)
    assert left["links"] and left["procs"] and left["dir"], left
    # ...until the next session's start-up cleans up after it.
    assert rec["root"] in sc.cleanup_stale()
    assert leftovers(rec) == {"links": [], "procs": [], "holders": [], "dir": False}


# ---- training across nodes --------------------------------------------------------------------

def _ranks(log: str) -> set[tuple[int, int, str, int, str]]:
    """(rank, world, host, local rank, master) of every rank's start-up line."""
    return {(int(r), int(w), h, int(lr), m) for r, w, h, lr, m, _ in RANK_LINE.findall(log)}


def _metrics(stage_dir) -> list[dict]:
    path = os.path.join(stage_dir, "metrics.jsonl")
    return [json.loads(ln) for ln in _read(path).splitlines() if ln.strip()] if os.path.exists(path) else []


def _curve(stage_dir) -> list[tuple]:
    """Per optimizer step: (step, loss, lr, grad_norm), and validation results, exactly as logged."""
    out = []
    for r in _metrics(stage_dir):
        if "loss" in r:
            out.append((r["step"], r["loss"], r["lr"], r["grad_norm"]))
        elif "val_accuracy" in r:
            out.append(("val", r.get("epoch"), r["val_accuracy"]))
    return out


def _adapters_equal(a_dir, b_dir) -> list[str]:
    a, b = _load_adapter(a_dir), _load_adapter(b_dir)
    if a.keys() != b.keys():
        return ["different tensor names"]
    return sorted(k for k in a if not torch_equal(a[k], b[k]))


def _tail(logs: dict, n: int = 50) -> str:
    return "\n".join(f"--- {k} (last {n} lines)\n" + "\n".join(v.splitlines()[-n:]) for k, v in logs.items())


def _assert_chain_done(res, stages=("stage1", "stage2")):
    for i, stage in enumerate(stages):
        info = res["info"][i]
        assert info and info.get("JobState") == "COMPLETED", f"{stage}: {info.get('JobState') if info else None}\n" \
                                                             + _tail(res["logs"])


def _overrides(tmp, *extra) -> list[str]:
    """The shared demo run's overrides (tests/test_slurm.py) plus `extra` key=value settings."""
    return [*_train_overrides(str(tmp), str(tmp / "demo_data")), *(a for kv in extra for a in ("--set", kv))]


def _start_chain(cluster, tmp, out, layout, sets=(), env=None) -> dict:
    ids = _submit(cluster, tmp, "--config", DEMO, *layout, *_overrides(tmp, *sets), "--set", f"output.dir={out}",
                  env=env)
    return {k: int(v) for k, v in ids.items() if k.startswith("stage")}


def _finish_chain(cluster, ids: dict, out, timeout: float) -> dict:
    """Wait for the chain's jobs (in order: Stage 2 cannot end before Stage 1); final records and logs."""
    deadline = time.time() + timeout
    info = {}
    for stage in sorted(ids):
        info[stage] = cluster.wait_job(ids[stage], timeout=max(1, deadline - time.time()))
        if info[stage]["JobState"] != "COMPLETED":
            break
    logs = {}
    for stage, job in ids.items():
        paths = glob.glob(os.path.join(out, "logs", f"*-{job}.out"))
        if paths:
            logs[stage] = _read(paths[0])
    return {"ids": ids, "info": info, "logs": logs}


def _assert_done(res):
    for stage in sorted(res["ids"]):
        state = res["info"].get(stage, {}).get("JobState")
        assert state == "COMPLETED", f"{stage}: {state}\n" + _tail(res["logs"])


WORLD4 = ("optim.global_batch_size=4",)  # 4 ranks x micro batch 1
FOUR = ("--tasks-per-node", "2", "--cpus-per-task", "1")


@pytest.fixture(scope="module")
def world4(cluster, train_setup):
    """Three runs of four ranks, one after the other (submitted together they take longer: twelve
    ranks in lockstep collectives on two cores): the one-node reference (ref4), the chain on two
    nodes x 2 tasks (span4), and Stage 1 under one torchrun per node (torch4)."""
    tmp, _ = train_setup
    layouts = {
        "ref4": (("--nodes", "1", "--tasks-per-node", "4", "--cpus-per-task", "1"), WORLD4),
        "span4": (("--nodes", "2", *FOUR), WORLD4),
        "torch4": (("--nodes", "2", *FOUR, "--launcher", "torchrun"), (*WORLD4, "schedule.stage2_epochs=0")),
    }
    runs = {}
    for name, (layout, sets) in layouts.items():
        ids = _start_chain(cluster, tmp, tmp / name, layout, sets)
        runs[name] = (tmp / name, _finish_chain(cluster, ids, str(tmp / name), timeout=300))
    return runs


def test_chain_two_nodes_two_tasks_equals_one_node(cluster, world4):
    """`submit.sh --nodes 2 --tasks-per-node 2`: four ranks, two per host, one group; both
    stages' loss curves, validations and exports equal the one-node run of four ranks bit for
    bit; each step logged once, each stage's export and DONE written once."""
    (ref, ref_res), (out, res) = world4["ref4"], world4["span4"]
    _assert_done(ref_res)
    _assert_done(res)
    n1, n2 = cluster.nodes
    for stage in ("stage1", "stage2"):
        ranks = _ranks(res["logs"][stage])
        assert ranks == {(0, 4, n1, 0, n1), (1, 4, n1, 1, n1), (2, 4, n2, 0, n1), (3, 4, n2, 1, n1)}, ranks
        assert {(r, w) for r, w, *_ in _ranks(ref_res["logs"][stage])} == {(0, 4), (1, 4), (2, 4), (3, 4)}
        ref_curve, curve = _curve(ref / stage), _curve(out / stage)
        assert len(ref_curve) > 4 and curve == ref_curve, (stage, curve[:3], ref_curve[:3])
        assert not _adapters_equal(ref / stage, out / stage), stage
        steps = [r[0] for r in curve if r[0] != "val"]
        assert steps == list(range(1, len(steps) + 1))  # every step logged once, by one rank
        assert _read(out / stage / "DONE").strip() == str(steps[-1])
        exports = set(os.listdir(out / stage / "export"))
        assert "final" in exports and exports <= {"best", "final"}, exports  # no second writer's temp dirs left


def test_torchrun_across_nodes(cluster, world4):
    """One `torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d` per node (train.sbatch
    with LIVR_LAUNCHER=torchrun): the agents meet at MASTER_ADDR, start two ranks each, and
    Stage 1 equals the one-node run of four ranks bit for bit."""
    (ref, ref_res), (out, res) = world4["ref4"], world4["torch4"]
    assert "stage2" not in res["ids"]
    _assert_done(ref_res)
    _assert_done(res)
    log = res["logs"]["stage1"]
    assert "(torchrun)" in log and "--rdzv-backend=c10d" in log, log[:3000]
    n1, n2 = cluster.nodes
    ranks = {(r, w, h, lr) for r, w, h, lr, _ in _ranks(log)}
    # c10d numbers the nodes in the order their agents arrive: either host may hold ranks 0-1.
    assert ranks in ({(0, 4, n1, 0), (1, 4, n1, 1), (2, 4, n2, 0), (3, 4, n2, 1)},
                     {(0, 4, n2, 0), (1, 4, n2, 1), (2, 4, n1, 0), (3, 4, n1, 1)}), ranks
    ref_curve, curve = _curve(ref / "stage1"), _curve(out / "stage1")
    assert len(ref_curve) > 4 and curve == ref_curve, (curve[:3], ref_curve[:3])
    assert not _adapters_equal(ref / "stage1", out / "stage1")


def _wait_state(cluster, job: int, states: tuple, timeout: float, restarts: int | None = None) -> dict:
    deadline = time.time() + timeout
    while True:
        info = cluster.job(job)
        if info.get("JobState") in states and (restarts is None or int(info.get("Restarts", 0)) >= restarts):
            return info
        assert time.time() < deadline, f"job {job} not {states} (restarts {restarts}) after {timeout}s: {info}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def elastic(cluster, train_setup, reference_chain):
    """The two-node x 1 task chain with both interruptions (see the module doc)."""
    tmp, _ = train_setup
    out = tmp / "elastic"
    n2 = cluster.nodes[1]
    seen = {}

    def interrupt(s1, s2):
        # Stage 1: requeued from outside while it runs on both nodes (what a preempting
        # controller does), then back on both nodes.
        seen["stage1"] = _wait_for_steps(cluster, str(out / "stage1" / "metrics.jsonl"), s1, 2)
        cluster.run(["scontrol", "requeue", str(s1)])
        # Stage 2: node 2 is drained, the stage requeued; it cannot start again on two nodes, so it
        # is resized to the node left (what an operator does; a resubmission with --nodes 1 is the same).
        seen["stage2"] = _wait_for_steps(cluster, str(out / "stage2" / "metrics.jsonl"), s2, 2, timeout=240)
        cluster.run(["scontrol", "update", f"NodeName={n2}", "State=DRAIN", "Reason=multinode-test"])
        cluster.run(["scontrol", "requeue", str(s2)])
        _wait_state(cluster, s2, ("PENDING",), 60, restarts=1)
        seen["pending_reason"] = cluster.job(s2).get("Reason")
        cluster.run(["scontrol", "update", f"JobId={s2}", "NumNodes=1", "NumTasks=1"])

    try:
        res = _run_chain(cluster, tmp, _overrides(tmp), str(out), interrupt=interrupt,
                         layout=("--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1"))
    finally:
        cluster.run(["scontrol", "update", f"NodeName={n2}", "State=RESUME"], check=False)
        cluster.wait_nodes("idle", timeout=60)
    res["seen"] = seen
    return out, res


def test_requeue_of_a_two_node_stage_resumes_bitwise(cluster, reference_chain, elastic):
    """`submit.sh --nodes 2 --tasks-per-node 1`: one rank per host; `scontrol requeue` of the
    running two-node Stage 1 resumes it (same job, both nodes again) from its checkpoint, and
    Stage 1's loss curve and export equal the one-node run of two ranks bit for bit."""
    out, res = elastic
    _assert_chain_done(res)
    n1, n2 = cluster.nodes
    log = res["logs"]["stage1"]
    assert _ranks(log) == {(0, 2, n1, 0, n1), (1, 2, n2, 0, n1)}, _ranks(log)
    assert int(res["info"][0].get("Restarts", 0)) == 1, res["info"][0]
    m = re.search(r"resumed from \S*step-0*(\d+)", log)
    assert m and res["seen"]["stage1"] <= int(m.group(1)) < int(_read(out / "stage1" / "DONE")), log[-4000:]
    ref_curve, curve = _curve(reference_chain["dir"] / "stage1"), _curve(out / "stage1")
    assert len(ref_curve) > 4 and curve == ref_curve, (curve[:3], ref_curve[:3])
    assert not _adapters_equal(reference_chain["dir"] / "stage1", out / "stage1")


def test_stage2_continues_on_one_node_at_half_the_world(cluster, reference_chain, elastic):
    """Node 2 drained and Stage 2 requeued: SLURM keeps it pending (two nodes asked, one left);
    resized to one node it resumes there at world size 1 from the world-2 checkpoint, with the
    same global batch (accumulation 2 instead of 2 ranks), so the same steps and LR schedule, the
    losses of the steps before the interruption unchanged and those after it close: the same
    samples in each step, but new RNG streams at a new world size (the trainer says so), so other
    LoRA dropout draws. (A step off in the data would show: neighbouring steps' losses differ
    by 2-60 % here.)"""
    out, res = elastic
    _assert_chain_done(res)
    n1, n2 = cluster.nodes
    log = res["logs"]["stage2"]
    assert res["seen"]["pending_reason"] in ("Resources", "ReqNodeNotAvail", "Nodes_required_for_job_are_DOWN,_"
                                             "DRAINED_and/or_reserved_for_jobs_in_higher_priority_partitions",
                                             "BeginTime", "Priority"), res["seen"]
    assert res["info"][1].get("NodeList") in (n1, None) or n2 not in res["info"][1].get("NodeList", ""), res["info"][1]
    assert (0, 1, n1, 0, n1) in _ranks(log) and {(0, 2, n1, 0, n1), (1, 2, n2, 0, n1)} <= _ranks(log), _ranks(log)
    assert "micro 1 x accumulation 2 x 1 ranks" in log, log[-4000:]
    m = re.search(r"resumed \S*step-0*(\d+) at world size 1 \(saved at 2\)", log)
    assert m, log[-4000:]
    resumed = int(m.group(1))
    ref, got = _curve(reference_chain["dir"] / "stage2"), _curve(out / "stage2")
    ref_steps, got_steps = [r for r in ref if r[0] != "val"], [r for r in got if r[0] != "val"]
    assert [r[0] for r in got_steps] == [r[0] for r in ref_steps]  # every step once, same count
    assert [r[2] for r in got_steps] == [r[2] for r in ref_steps]  # the LR schedule, exactly
    assert got_steps[:resumed] == ref_steps[:resumed]  # before the interruption: the 2-node run
    after = [(g[0], g[1], r[1]) for g, r in zip(got_steps[resumed:], ref_steps[resumed:])]
    assert after and all(abs(loss - ref_loss) <= 0.05 * abs(ref_loss) for _, loss, ref_loss in after), after
    assert os.path.exists(out / "stage2" / "export" / "final" / "adapter_model.safetensors")


def test_node_death_ends_the_job_and_the_requeued_job_resumes(cluster, train_setup, reference_chain):
    """Node 2 dies mid-run (SIGKILL to its slurmd and every job process on it). The job does not
    hang: within SlurmdTimeout (+ the controller's ping interval and KillWait) it ends with the
    node failure named in its log and is requeued by SLURM; it stays pending while node 2 is
    down; once the node is back it resumes from the last checkpoint written before the death
    and Stage 1 ends equal to the one-node run of two ranks, bit for bit."""
    tmp, _ = train_setup
    out = tmp / "crash"
    n1, n2 = cluster.nodes
    ids = _submit(cluster, tmp, "--config", DEMO, "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1",
                  *_overrides(tmp, "schedule.stage2_epochs=0", "output.save_every_steps=3"),
                  "--set", f"output.dir={out}")
    job = int(ids["stage1"])
    metrics = str(out / "stage1" / "metrics.jsonl")
    killed_at = _wait_for_steps(cluster, metrics, job, 5, timeout=240)
    assert glob.glob(str(out / "stage1" / "checkpoints" / "step-*")), "no checkpoint before the kill"
    t0 = time.time()
    killed = cluster.kill_node(n2)
    assert killed, "no process on node 2 to kill"
    # The run ends (NODE_FAIL, requeued by SLURM: PENDING again) instead of hanging.
    limit = SLURMD_TIMEOUT * 2 + 30
    info = _wait_state(cluster, job, ("PENDING",), limit, restarts=1)
    ended_after = time.time() - t0
    log_path = glob.glob(str(out / "logs" / f"*-{job}.out"))[0]
    log = _read(log_path)
    assert re.search(rf"(?i)node fail\w*.*{n2}|{n2}.*node fail", log) or "DUE TO NODE FAILURE" in log, log[-4000:]
    assert cluster.node_state(n2) == "down", cluster.node_states()
    time.sleep(3)
    assert cluster.job(job).get("JobState") == "PENDING"  # two nodes asked, one up: it waits
    cluster.restart_node(n2)
    done = cluster.wait_job(job, timeout=300)
    log = _read(log_path)
    assert done["JobState"] == "COMPLETED", log[-5000:]
    m = re.search(r"resumed from \S*step-0*(\d+)", log)
    assert m and 3 <= int(m.group(1)) <= killed_at + 3, (killed_at, log[-4000:])
    assert _ranks(log) >= {(0, 2, n1, 0, n1), (1, 2, n2, 0, n1)}
    ref_curve, curve = _curve(reference_chain["dir"] / "stage1"), _curve(out / "stage1")
    assert curve == ref_curve, (curve[:3], ref_curve[:3])
    assert not _adapters_equal(reference_chain["dir"] / "stage1", out / "stage1")
    print(f"node death: job ended {ended_after:.1f}s after the kill (SlurmdTimeout {SLURMD_TIMEOUT}s); {info.get('Reason')}")
