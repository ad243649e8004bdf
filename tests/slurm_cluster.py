"""A throw-away one-node SLURM cluster on this host, for tests of the slurm/ scripts.

    cluster = SlurmCluster.start()          # munged + slurmctld + slurmd, node idle
    job = cluster.sbatch(["--wrap", "srun hostname"])
    cluster.wait_job(job, timeout=60)       # -> final job record (JobState, StartTime, ...)
    cluster.stop()

Everything lives under one private directory (/tmp/livr-ds-slurm-XXXX): slurm.conf, the munge
key and socket, spool and state directories, pid and log files. Clients find the cluster through
the ``SLURM_CONF`` environment variable (``cluster.env``), so nothing global (/etc/slurm,
/run/munge, the default ports) is touched and a system SLURM, if any, is left alone. The host's
own SLURM set-up is never read either: every SLURM command here (the daemons, ``slurmd -C``/``-V``,
the clients) runs with ``SLURM_CONF`` pointing at this cluster's file, and the installed version
(which decides what cgroup.conf may say) comes from ``slurmd -V``, which reads no config. Several
sessions can run side by side; a session that died without tearing down is cleaned up by the
next one (its daemons and job processes are found by pid file and by the SLURM_CONF in their
environment, never by process name).

Needs root (slurmd must start job processes) and the Debian packages slurm-wlm + munge;
``.ci/setup_slurm.sh`` installs them. ``unavailable_reason()`` says why a cluster cannot start.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_SCRIPT = os.path.join(REPO, ".ci", "setup_slurm.sh")
PREFIX = "livr-ds-slurm-"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")


def make_cluster_dirs(root: str) -> str:
    """state/, spool/, log/ and munge/ (a fresh key) under a cluster's root; returns the munge
    socket path."""
    for d in ("state", "spool", "log", "munge"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "munge"), 0o700)
    key = os.path.join(root, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    return os.path.join(root, "munge", "munge.socket")


def shared_conf(root: str) -> str:
    """The slurm.conf lines every test cluster (one host, several namespaced hosts) shares: no
    cgroups, no accounting, a quick scheduler, requeue allowed."""
    return "\n".join(line.format(r=root) for line in (
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2",
        "MpiDefault=none", "PlugStackConfig={r}/plugstack.conf", "SwitchType=switch/none",
        "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/filetxt", "JobCompLoc={r}/log/jobcomp.txt", "JobRequeue=1", "ReturnToService=2",
        "KillWait=10"))


class ClusterError(RuntimeError):
    pass


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def unavailable_reason(install: bool = True) -> str | None:
    """None when a cluster can be started here, else why not. Installs the packages if allowed."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the SLURM tests start munged/slurmctld/slurmd and need root"
    if missing_binaries() and install and os.path.exists(SETUP_SCRIPT):
        proc = subprocess.run(["bash", SETUP_SCRIPT], capture_output=True, text=True, timeout=600)
        if proc.returncode:
            return f"slurm-wlm/munge are missing and {SETUP_SCRIPT} failed: {proc.stderr.strip()[-500:]}"
    missing = missing_binaries()
    if missing:
        return f"SLURM/munge binaries not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    return None


# ---- process helpers --------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is as good as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:
        return False


def _pids_with_env(entry: str) -> list[int]:
    """Processes whose environment holds `entry` (e.g. SLURM_CONF=/tmp/livr-ds-slurm-x/slurm.conf):
    the daemons and every job process of one cluster, and nothing else."""
    me = {os.getpid(), os.getppid()}
    raw = entry.encode()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in me and _environ_has(int(p), raw)]


def _kill(pids: list[int], wait: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `wait` seconds, each pid by id."""
    pids = [p for p in pids if _alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def cleanup_stale(tmp: str | None = None) -> list[str]:
    """Tear down clusters left behind by sessions that no longer run. Returns the dirs removed."""
    removed = []
    for root in glob.glob(os.path.join(tmp or tempfile.gettempdir(), PREFIX + "*")):
        owner = _read_pid(os.path.join(root, "owner.pid"))
        if owner and _alive(owner):
            continue  # a live session's cluster
        _teardown_dir(root)
        removed.append(root)
    return removed


def _teardown_dir(root: str) -> None:
    conf = os.path.join(root, "slurm.conf")
    pids = [_read_pid(os.path.join(root, f"{d}.pid")) for d in ("slurmctld", "slurmd", "munged")]
    pids = [p for p in pids if p and _alive(p) and _environ_has(p, f"SLURM_CONF={conf}".encode())]
    # Job processes first (they carry SLURM_CONF too), then the daemons.
    strays = [p for p in _pids_with_env(f"SLURM_CONF={conf}") if p not in pids]
    _kill(strays, wait=3)
    _kill(pids, wait=5)
    _kill(_pids_with_env(f"SLURM_CONF={conf}"), wait=2)
    _teardown_network(root)
    shutil.rmtree(root, ignore_errors=True)


def _teardown_network(root: str) -> None:
    """A multi-host cluster's links (tests/slurm_multihost.py), named in its network.json. Its
    node namespaces die with their processes (killed above: they carry SLURM_CONF); the veth
    host ends go with them, and are deleted here too in case one lingers; the bridge does not."""
    path = os.path.join(root, "network.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        rec = json.load(f)
    ip = _which("ip")
    if not ip:
        return
    for link in [*rec.get("links", []), rec.get("bridge")]:
        if link and subprocess.run([ip, "link", "show", link], capture_output=True, timeout=10).returncode == 0:
            subprocess.run([ip, "link", "del", link], capture_output=True, timeout=20)


# ---- the cluster ------------------------------------------------------------------------------

def _node_line(host: str, conf: str) -> str:
    """slurmd -C's view of this machine, so the node config matches what slurmd detects."""
    # SLURM_CONF: our (not yet written) file, so no host slurm.conf is consulted.
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30,
                         env=_private_env(conf)).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), "")
    fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
    cpus = fields.get("CPUs", str(os.cpu_count() or 1))
    mem = int(fields.get("RealMemory", "1024"))
    keep = " ".join(f"{k}={fields[k]}" for k in ("Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
                    if k in fields)
    # A little less memory than detected, so slurmd never finds "less than configured".
    return f"NodeName={host} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} {keep} RealMemory={max(mem - 256, 256)} State=UNKNOWN"


class SlurmCluster:
    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = _private_env(self.conf)

    # ---- lifecycle --------------------------------------------------------------------
    @classmethod
    def start(cls, timeout: float = 60.0, tmp: str | None = None, cred_expire: int = 5) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason:
            raise ClusterError(reason)
        cleanup_stale(tmp)
        root = tempfile.mkdtemp(prefix=PREFIX, dir=tmp)
        os.chmod(root, 0o755)  # job steps run as root, but slurmstepd checks the spool path
        with open(os.path.join(root, "owner.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")
        cluster = cls(root)
        try:
            cluster._write_config(cred_expire)
            cluster._start_daemons(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_config(self, cred_expire: int) -> None:
        r = self.root
        self.munge_socket = make_cluster_dirs(r)
        ctld_port, d_port = _free_ports(2)
        lines = f"""
            ClusterName=livrtest
            SlurmctldHost={self.host}(127.0.0.1)
            SlurmctldPort={ctld_port}
            SlurmdPort={d_port}
            SlurmUser=root
            SlurmdUser=root
            AuthType=auth/munge
            CredType=cred/munge
            # cred_expire is also how long a requeued job waits before it may start again
            # (120 s by default); short here so the requeue test is quick.
            AuthInfo=socket={self.munge_socket},cred_expire={cred_expire}
            StateSaveLocation={r}/state
            SlurmdSpoolDir={r}/spool
            SlurmctldPidFile={r}/slurmctld.pid
            SlurmdPidFile={r}/slurmd.pid
            SlurmctldLogFile={r}/log/slurmctld.log
            SlurmdLogFile={r}/log/slurmd.log
            SlurmctldDebug=info
            SlurmdDebug=info
            {shared_conf(r)}
            MinJobAge=120
            SlurmctldTimeout=30
            SlurmdTimeout=60
            InactiveLimit=0
            Waittime=0
            {_node_line(self.host, self.conf)}
            PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
        """
        with open(self.conf, "w") as f:
            f.write("\n".join(ln.strip() for ln in lines.strip().splitlines()) + "\n")
        # Our own (empty) SPANK stack, so no plugin of a host's plugstack.conf is loaded.
        open(os.path.join(r, "plugstack.conf"), "w").close()
        # cgroup.conf always exists here (SLURM reads it next to SLURM_CONF, never the host's);
        # what it may say depends on the installed version, see cgroup_conf().
        self.version = slurm_version(self.conf)
        self.cgroup_conf_text = cgroup_conf(self.version, plugin_dir())
        with open(os.path.join(r, "cgroup.conf"), "w") as f:
            f.write(self.cgroup_conf_text)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(os.path.join(self.root, "log", f"{name}.out"), "ab")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        log.close()
        with open(os.path.join(self.root, f"{name}.pid"), "w") as f:  # for cleanup_stale
            f.write(f"{self.procs[name].pid}\n")

    def _start_daemons(self, timeout: float) -> None:
        r = self.root
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={r}/munge/munge.key", f"--pid-file={r}/munge/munged.pid",
                               f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"])
        self._wait(lambda: os.path.exists(self.munge_socket), 15, "munged to create its socket", "munged")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-i", "-f", self.conf])
        self._wait(lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") > 0, 30,
                   "slurmctld to answer `scontrol ping`", "slurmctld")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", self.conf, "-N", self.host])
        self._wait(lambda: self.node_state() == "idle", timeout, f"node {self.host} to be idle in sinfo", "slurmd")

    def _wait(self, ok, timeout: float, what: str, daemon: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            proc = self.procs.get(daemon)
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"{daemon} exited with {proc.returncode} while waiting for {what}:\n"
                                   + self.logs(daemon))
            time.sleep(0.3)
        raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}; node state "
                           f"{self.node_state()!r}:\n{self.logs(daemon)}")

    def logs(self, *daemons: str, tail: int = 40) -> str:
        out = []
        for d in daemons or ("munged", "slurmctld", "slurmd"):
            for path in (os.path.join(self.root, "log", f"{d}.log"), os.path.join(self.root, "log", f"{d}.out")):
                if os.path.exists(path):
                    with open(path, errors="replace") as f:
                        lines = f.read().splitlines()[-tail:]
                    out.append(f"--- {path}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, kill stragglers, remove the directory."""
        if os.path.exists(self.conf) and self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--signal=KILL", "--user=root"], check=False, timeout=15)
            self.run(["scancel", "--user=root"], check=False, timeout=15)
            deadline = time.time() + 15
            while time.time() < deadline and self.run(["squeue", "-h", "-t", "R,CG,PD"], check=False,
                                                       timeout=10).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):  # by the pids we started
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                _kill([proc.pid], wait=8)
                proc.wait(timeout=5)
        _teardown_dir(self.root)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ---- clients ----------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        env = {**self.env, **kw.pop("env", {})}
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode:
            raise ClusterError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def node_state(self) -> str:
        try:
            out = self.run(["sinfo", "-h", "-N", "-o", "%T", "-n", self.host], check=False, timeout=10).stdout
        except subprocess.TimeoutExpired:
            return "timeout"
        return out.strip().rstrip("*~#!%$@^-")

    def sbatch(self, args: list[str], **kw) -> int:
        out = self.run(["sbatch", "--parsable", *args], **kw).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the job has aged out of the controller)."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False, timeout=10)
        return _fields(proc.stdout) if proc.returncode == 0 else {}

    def completions(self, job_id: int | None = None) -> list[dict[str, str]]:
        """Job completion records (jobcomp/filetxt): one per finished run, requeues included."""
        path = os.path.join(self.root, "log", "jobcomp.txt")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            recs = [_fields(ln) for ln in f if ln.strip()]
        return [r for r in recs if job_id is None or r.get("JobId") == str(job_id)]

    def wait_job(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                            "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> dict:
        """Wait until the job reaches one of `states`; returns its scontrol record."""
        deadline = time.time() + timeout
        info: dict = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if not info:  # aged out: the completion log has the final state
                done = self.completions(job_id)
                if done and done[-1].get("JobState") in states:
                    return done[-1]
            time.sleep(1)
        raise ClusterError(f"job {job_id} not in {states} after {timeout:.0f}s: {info}\n"
                           f"{self.run(['squeue'], check=False).stdout}\n{self.logs('slurmctld', tail=15)}")


def _fields(line: str) -> dict[str, str]:
    """KEY=VALUE pairs of one scontrol -o / jobcomp line (values may not contain spaces here)."""
    return dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", line))


# ---- the installed SLURM, without reading any slurm.conf -----------------------------------------

_CLIENT_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_", "SCANCEL_")


def _private_env(conf: str) -> dict[str, str]:
    """os.environ with SLURM_CONF=conf and no other SLURM client variable (running inside a real
    allocation, or a user's SQUEUE_FORMAT, must not leak into this cluster)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLIENT_PREFIXES)}
    env["SLURM_CONF"] = conf
    return env


def _parse_version(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def slurm_version(conf: str | None = None) -> tuple[int, int, int] | None:
    """The installed SLURM as (major, minor, micro), e.g. (22, 5, 8); None if unknown.

    `slurmd -V` / `slurmctld -V` print the version and exit before reading any config (unlike the
    clients: `sbatch --version` loads slurm.conf and plugstack.conf first, so it answers from a
    host's /etc/slurm, or, with none, falls back to a DNS SRV lookup that may retry for 60 s); they
    run with SLURM_CONF at `conf` (our own, possibly not yet written, file) all the same. The
    Debian package version is the fallback."""
    env = _private_env(conf or os.devnull)
    for daemon in ("slurmd", "slurmctld"):
        path = _which(daemon)
        if not path:
            continue
        try:
            proc = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=10, env=env,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = _parse_version(proc.stdout + proc.stderr) if proc.returncode == 0 else None
        if version:
            return version
    if shutil.which("dpkg-query"):
        for pkg in ("slurmd", "slurm-wlm"):
            proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True,
                                  timeout=10)
            version = _parse_version(proc.stdout) if proc.returncode == 0 else None
            if version:
                return version
    return None


def plugin_dir() -> str | None:
    """Where the installed SLURM's plugins are (the compiled-in PluginDir; found on disk, since
    asking SLURM would mean reading a config). Debian: /usr/lib/<triplet>/slurm-wlm."""
    daemon = _which("slurmd") or _which("slurmctld")
    prefixes = [os.path.dirname(os.path.dirname(os.path.realpath(daemon)))] if daemon else []
    prefixes += [p for p in ("/usr", "/usr/local", "/opt/slurm") if p not in prefixes]
    for prefix in prefixes:
        for pattern in ("lib/*/slurm-wlm", "lib/*/slurm", "lib64/slurm", "lib/slurm", "lib/slurm-wlm"):
            for d in sorted(glob.glob(os.path.join(prefix, pattern))):
                if os.path.exists(os.path.join(d, "proctrack_linuxproc.so")):
                    return d
    return None


def _host_cgroup_plugin(mounts: str = "/proc/self/mounts") -> str | None:
    """What CgroupPlugin=autodetect would pick on this host (SLURM's own rule): cgroup/v2 on a
    unified (cgroup2) /sys/fs/cgroup, cgroup/v1 on a tmpfs one whose systemd hierarchy is v1."""
    types = {}
    try:
        with open(mounts) as f:
            for line in f:  # later mounts hide earlier ones at the same point
                fields = line.split()
                if len(fields) > 2:
                    types[fields[1]] = fields[2]
    except OSError:
        return None
    top = types.get("/sys/fs/cgroup")
    if top == "cgroup2":
        return "cgroup/v2"
    if top == "tmpfs":
        return {"cgroup": "cgroup/v1", "cgroup2": "cgroup/v2"}.get(types.get("/sys/fs/cgroup/systemd", ""))
    return None


_DETECT = object()


def cgroup_conf(version: tuple[int, ...] | None, plugins: str | None, host_plugin=_DETECT) -> str:
    """A cgroup.conf the installed SLURM accepts. Nothing in this cluster uses cgroups
    (proctrack/linuxproc, task/none, jobacct_gather/none), so: no cgroup at all where the
    version has that (`CgroupPlugin=disabled`, SLURM >= 23.02), else the plugin SLURM's
    autodetection would load, named only if it is installed in `plugins` (22.05 has only
    cgroup/v1, cgroup/v2 and autodetect: `disabled` is a fatal "cannot find cgroup plugin"),
    else `autodetect`. Before 21.08 (no CgroupPlugin key) or for an unknown version: no
    settings at all, SLURM's defaults, which every version accepts."""
    shown = "%d.%02d.%d" % (tuple(version) + (0, 0, 0))[:3] if version else "(version unknown)"
    head = f"# written by tests/slurm_cluster.py for SLURM {shown}\n"
    if version is None or tuple(version[:2]) < (21, 8):
        return head
    if tuple(version[:2]) >= (23, 2):
        return head + "CgroupPlugin=disabled\n"
    if host_plugin is _DETECT:
        host_plugin = _host_cgroup_plugin()
    so = host_plugin and os.path.join(plugins or "", host_plugin.replace("/", "_") + ".so")
    if so and plugins and os.path.exists(so):
        return head + f"CgroupPlugin={host_plugin}\n"
    return head + "CgroupPlugin=autodetect\n"
