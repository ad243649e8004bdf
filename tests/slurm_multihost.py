"""A throw-away multi-host SLURM cluster on this one machine, for multi-node tests of slurm/.

    cluster = MultiHostCluster.start(nodes=2)    # munged + slurmctld here, one slurmd per "host"
    cluster.nodes                                 # ['lvabc-n1', 'lvabc-n2']
    job = cluster.sbatch(["--nodes=2", "--wrap", "srun hostname"])
    cluster.kill_node("lvabc-n2"); cluster.restart_node("lvabc-n2")
    cluster.stop()

Each compute node is a host of its own as far as anything running on it can tell:

* its own network namespace, joined to a bridge in the root namespace by a veth pair, with its
  own address on a private /24 (10.X.Y.0/24, chosen so it collides with no address or route of
  this machine); loopback is up, and nothing is routed beyond the bridge, so the test traffic
  stays between these hosts;
* its own UTS namespace: `hostname` prints the node's name;
* its own mount namespace, with a private hosts file bind-mounted over /etc/hosts, so every node
  resolves every node's name (and the controller's) to its bridge address and nothing else. The
  host's /etc/hosts is never written.

slurmctld and munged run in the root namespaces: slurmctld listens on the bridge address, and
munge's socket is a path in the cluster's directory (a unix socket by path crosses network
namespaces). The slurmds reach the controller over their veth; srun, slurmstepd and the training
ranks they start inherit their node's namespaces, so ranks on node 2 really talk to node 1 over
the veth link, by name.

Why namespaces and not several `slurmd -N` on one host: Debian's SLURM (22.05) is built with
multiple-slurmd support (`scontrol show config`: MULTIPLE_SLURMD = Yes), so slurmds with a
`Port=` each would start and take jobs; but every "node" would share this machine's hostname,
addresses, port space and /etc/hosts. A MASTER_ADDR that resolves only on the first node, a port
chosen per node, ranks reporting their host, torchrun's c10d rendezvous (each agent decides from
its own addresses whether it hosts the store: on one host they all would) and a node dying under
a running job (peers' connections reset across a link) would then all behave as on one node.

Nothing system-wide is left behind: no /run/netns entries (each namespace is held by one
`sleep` process started with `unshare`, and dies with it, taking its veth end along), no
/etc/netns or /etc/hosts edits, no SLURM config outside the cluster's directory. The bridge (the
one object that outlives the processes) is named in the directory's network.json, so a session
that died without tearing down is cleaned up by the next one (slurm_cluster.cleanup_stale), as
are its daemons and jobs, which all carry the cluster's SLURM_CONF. Names carry a random suffix
and the subnet is picked free, so several sessions can run side by side.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import string
import subprocess
import tempfile
import time

import slurm_cluster as sc


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    proc = subprocess.run([_ip_path(), *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise sc.ClusterError(f"ip {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _ip_path() -> str:
    # Looked up at each use: .ci/setup_slurm.sh may install iproute2 after this module is imported.
    return sc._which("ip") or "ip"


def unavailable_reason(install: bool = True) -> str | None:
    """None when a multi-host cluster can start here, else why not."""
    reason = sc.unavailable_reason(install)
    if reason:
        return reason
    if not sc._which("ip") and install and os.path.exists(sc.SETUP_SCRIPT):  # installs iproute2
        subprocess.run(["bash", sc.SETUP_SCRIPT], capture_output=True, text=True, timeout=600)
    for tool in ("ip", "unshare", "nsenter"):
        if not sc._which(tool):
            return f"{tool} not installed (apt-get install iproute2 util-linux; .ci/setup_slurm.sh does)"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True, timeout=20)
    if probe.returncode:
        return f"this kernel/container forbids network/UTS/mount namespaces: {probe.stderr.strip()}"
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for args in (("-4", "-o", "addr", "show"), ("-4", "route", "show", "table", "all")):
        out = _ip(*args, check=False).stdout
        for tok in out.split():
            try:
                if "/" in tok or tok.count(".") == 3:
                    nets.append(ipaddress.ip_network(tok, strict=False))
            except ValueError:
                pass
    return nets


def _pick_subnet() -> ipaddress.IPv4Network:
    """A private /24 no address or route of this machine (or another session's cluster) uses."""
    used = _used_networks()
    rng = random.Random()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randint(200, 254)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise sc.ClusterError("no free 10.200-254.x.0/24 subnet for the test cluster")


def _netns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


class MultiHostCluster(sc.SlurmCluster):
    """munged + slurmctld in the root namespaces, one slurmd per node namespace (see the module doc)."""

    def __init__(self, root: str):
        super().__init__(root)
        # Letters only (SLURM's hostlists read trailing digits as a range); re-drawn while another
        # cluster's bridge has the name.
        while True:
            self.suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(3))
            if _ip("link", "show", f"lvb{self.suffix}", check=False).returncode:
                break
        self.subnet = _pick_subnet()
        hosts = list(self.subnet.hosts())
        self.ctld_addr = str(hosts[0])  # the bridge's address, in the root namespace
        self.bridge = f"lvb{self.suffix}"
        self.nodes: list[str] = []
        self.addr: dict[str, str] = {}  # node -> its address on the bridge
        self.holder: dict[str, subprocess.Popen] = {}  # node -> the process holding its namespaces
        self.hosts_file = os.path.join(root, "hosts")

    # ---- lifecycle --------------------------------------------------------------------
    @classmethod
    def start(cls, nodes: int = 2, timeout: float = 90.0, tmp: str | None = None, cred_expire: int = 5,
              cpus_per_node: int = 4, slurmd_timeout: int = 20) -> "MultiHostCluster":
        reason = unavailable_reason()
        if reason:
            raise sc.ClusterError(reason)
        sc.cleanup_stale(tmp)
        root = tempfile.mkdtemp(prefix=sc.PREFIX, dir=tmp)
        os.chmod(root, 0o755)
        with open(os.path.join(root, "owner.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")
        cluster = cls(root)
        cluster.nodes = [f"lv{cluster.suffix}-n{i}" for i in range(1, nodes + 1)]
        hosts = list(cluster.subnet.hosts())
        cluster.addr = {n: str(hosts[10 + i]) for i, n in enumerate(cluster.nodes)}
        try:
            cluster._write_network_record()
            cluster._write_multi_config(cred_expire, cpus_per_node, slurmd_timeout)
            cluster._make_network()
            cluster._start_multi_daemons(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_network_record(self) -> None:
        # Before anything is created: what teardown (ours or a later session's) must remove.
        with open(os.path.join(self.root, "network.json"), "w") as f:
            json.dump({"bridge": self.bridge, "subnet": str(self.subnet), "nodes": self.nodes,
                       "links": [f"lv{self.suffix}h{i}" for i in range(1, len(self.nodes) + 1)]}, f)

    def _write_multi_config(self, cred_expire: int, cpus: int, slurmd_timeout: int) -> None:
        r = self.root
        self.munge_socket = sc.make_cluster_dirs(r)
        # slurmctld listens in the root namespace; the slurmds each have a namespace (and port
        # space) of their own, so they can all use one SlurmdPort.
        ctld_port, d_port = sc._free_ports(2)
        mem = 2048
        node_lines = "\n".join(
            f"NodeName={n} NodeAddr={self.addr[n]} NodeHostname={n} CPUs={cpus} RealMemory={mem} State=UNKNOWN"
            for n in self.nodes)
        lines = f"""
            ClusterName=livrmulti
            SlurmctldHost={self.host}({self.ctld_addr})
            SlurmctldPort={ctld_port}
            SlurmdPort={d_port}
            SlurmUser=root
            SlurmdUser=root
            AuthType=auth/munge
            CredType=cred/munge
            AuthInfo=socket={self.munge_socket},cred_expire={cred_expire}
            StateSaveLocation={r}/state
            SlurmdSpoolDir={r}/spool/%n
            SlurmctldPidFile={r}/slurmctld.pid
            SlurmdPidFile={r}/slurmd-%n.pid
            SlurmctldLogFile={r}/log/slurmctld.log
            SlurmdLogFile={r}/log/slurmd-%n.log
            SlurmctldDebug=info
            SlurmdDebug=info
            # Nodes advertise {cpus} CPUs whatever this machine has (ranks share the real cores;
            # one task per CPU keeps the layouts the tests ask for schedulable).
            SlurmdParameters=config_overrides
            {sc.shared_conf(r)}
            MinJobAge=300
            SlurmctldTimeout=30
            # How long a silent node stays "up": a node killed under a job is declared DOWN
            # (and its jobs NODE_FAIL, requeued) about this long after its last answer.
            SlurmdTimeout={slurmd_timeout}
            InactiveLimit=0
            Waittime=0
            {node_lines}
            PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
        """
        with open(self.conf, "w") as f:
            f.write("\n".join(ln.strip() for ln in lines.strip().splitlines()) + "\n")
        open(os.path.join(r, "plugstack.conf"), "w").close()
        self.version = sc.slurm_version(self.conf)
        self.cgroup_conf_text = sc.cgroup_conf(self.version, sc.plugin_dir())
        with open(os.path.join(r, "cgroup.conf"), "w") as f:
            f.write(self.cgroup_conf_text)
        # The nodes' /etc/hosts: every test host by name, the controller under this machine's name.
        with open(self.hosts_file, "w") as f:
            f.write("127.0.0.1 localhost\n")
            f.write(f"{self.ctld_addr} {self.host}\n")
            for n in self.nodes:
                f.write(f"{self.addr[n]} {n}\n")

    def _make_network(self) -> None:
        prefix = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.ctld_addr}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, node in enumerate(self.nodes, 1):
            # The holder creates the node's namespaces and keeps them alive: net (own stack),
            # uts (own hostname), mount (own /etc/hosts). Everything else enters them with nsenter.
            setup = ('hostname "$1" && mount --bind "$2" /etc/hosts && ip link set lo up && '
                     'exec sleep infinity')
            log = open(os.path.join(self.root, "log", f"holder-{node}.out"), "ab")
            self.holder[node] = subprocess.Popen(
                [sc._which("unshare"), "--net", "--uts", "--mount", "--propagation", "private", "--",
                 "sh", "-c", setup, "sh", node, self.hosts_file],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
            log.close()
            with open(os.path.join(self.root, f"holder-{node}.pid"), "w") as f:
                f.write(f"{self.holder[node].pid}\n")
            pid = self.holder[node].pid
            deadline = time.time() + 15
            # Ready when the holder is `sleep` inside its namespace (after the set-up commands).
            while not (_netns_of(pid) and _netns_of(pid) != _netns_of(os.getpid())
                       and self._comm(pid) == "sleep"):
                if self.holder[node].poll() is not None or time.time() > deadline:
                    raise sc.ClusterError(f"namespaces for {node} not set up:\n" + self._tail(
                        os.path.join(self.root, "log", f"holder-{node}.out")))
                time.sleep(0.05)
            host_end, node_end = f"lv{self.suffix}h{i}", f"lv{self.suffix}c{i}"
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end, "netns", str(pid))
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            self.in_node(node, [_ip_path(), "addr", "add", f"{self.addr[node]}/{prefix}", "dev", node_end])
            self.in_node(node, [_ip_path(), "link", "set", node_end, "up"])

    @staticmethod
    def _comm(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/comm") as f:
                return f.read().strip()
        except OSError:
            return ""

    @staticmethod
    def _tail(path: str, n: int = 30) -> str:
        try:
            with open(path, errors="replace") as f:
                return "\n".join(f.read().splitlines()[-n:])
        except OSError:
            return f"({path} missing)"

    def nsenter(self, node: str) -> list[str]:
        """argv prefix that runs a command inside `node` (its network, hostname and /etc/hosts)."""
        return [sc._which("nsenter"), "-t", str(self.holder[node].pid), "--net", "--uts", "--mount", "--"]

    def in_node(self, node: str, argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.run(self.nsenter(node) + argv, check=check, timeout=timeout)

    def _start_slurmd(self, node: str) -> None:
        self._spawn(f"slurmd@{node}", self.nsenter(node) + [sc._which("slurmd"), "-D", "-f", self.conf, "-N", node])

    def _start_multi_daemons(self, timeout: float) -> None:
        r = self.root
        self._spawn("munged", [sc._which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={r}/munge/munge.key", f"--pid-file={r}/munge/munged.pid",
                               f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"])
        self._wait(lambda: os.path.exists(self.munge_socket), 15, "munged to create its socket", "munged")
        self._spawn("slurmctld", [sc._which("slurmctld"), "-D", "-c", "-i", "-f", self.conf])
        self._wait(lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") > 0, 30,
                   "slurmctld to answer `scontrol ping`", "slurmctld")
        for node in self.nodes:
            self._start_slurmd(node)
        self.wait_nodes("idle", timeout=timeout)

    def node_states(self) -> dict[str, str]:
        try:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10).stdout
        except subprocess.TimeoutExpired:
            return {}
        return {ln.split()[0]: ln.split()[1].rstrip("*~#!%$@^-") for ln in out.splitlines() if len(ln.split()) == 2}

    def node_state(self, node: str | None = None) -> str:
        return self.node_states().get(node or self.nodes[0], "unknown")

    def wait_nodes(self, state: str, nodes: list[str] | None = None, timeout: float = 60) -> None:
        nodes = nodes or self.nodes
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.node_states()
            if all(states.get(n) == state for n in nodes):
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None and (name in ("munged", "slurmctld")
                                                or name.split("@")[-1] in nodes):
                    raise sc.ClusterError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            time.sleep(0.3)
        raise sc.ClusterError(f"nodes {nodes} not {state} after {timeout:.0f}s: {self.node_states()}\n{self.logs()}")

    def logs(self, *daemons: str, tail: int = 40) -> str:
        names = daemons or ("munged", "slurmctld", *(f"slurmd-{n}" for n in self.nodes))
        out = []
        for d in names:
            for path in (os.path.join(self.root, "log", f"{d}.log"), os.path.join(self.root, "log", f"{d}.out")):
                if os.path.exists(path):
                    out.append(f"--- {path}\n" + self._tail(path, tail))
        return "\n".join(out)

    # ---- failures ---------------------------------------------------------------------
    def node_pids(self, node: str) -> list[int]:
        """Every process running on `node` (in its network namespace) except the holder: its
        slurmd, slurmstepds and job processes."""
        ns = _netns_of(self.holder[node].pid)
        keep = {self.holder[node].pid, os.getpid()}
        return [int(p) for p in os.listdir("/proc")
                if p.isdigit() and int(p) not in keep and _netns_of(int(p)) == ns]

    def kill_node(self, node: str) -> list[int]:
        """The node dies: SIGKILL to its slurmd and every job process on it, at once (no
        SIGTERM, no chance to save). Its address stays up, so peers see their connections reset,
        as after a crash; the controller hears nothing more from it."""
        pids = self.node_pids(node)
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc = self.procs.get(f"slurmd@{node}")
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return pids

    def restart_node(self, node: str, timeout: float = 60) -> None:
        """The node boots again: a fresh slurmd (ReturnToService=2 puts a DOWN node back)."""
        self._start_slurmd(node)
        self.wait_nodes("idle", [node], timeout=timeout)

    # ---- teardown ---------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, stop the daemons and node namespaces, remove the bridge and the dir."""
        ctld = self.procs.get("slurmctld")
        if os.path.exists(self.conf) and ctld is not None and ctld.poll() is None:
            try:
                self.run(["scancel", "--full", "--signal=KILL", "--user=root"], check=False, timeout=15)
                self.run(["scancel", "--user=root"], check=False, timeout=15)
                deadline = time.time() + 15
                while time.time() < deadline and self.run(["squeue", "-h", "-t", "R,CG,PD"], check=False,
                                                           timeout=10).stdout.strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for name in [n for n in self.procs if n.startswith("slurmd@")] + ["slurmctld", "munged"]:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                sc._kill([proc.pid], wait=8)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        # Job processes left in a node (they carry SLURM_CONF too), then the holders, whose exit
        # destroys each node's namespaces and veth pair.
        sc._kill(sc._pids_with_env(f"SLURM_CONF={self.conf}"), wait=3)
        for proc in self.holder.values():
            if proc.poll() is None:
                sc._kill([proc.pid], wait=3)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        sc._teardown_dir(self.root)  # also removes the bridge named in network.json
