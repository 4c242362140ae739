"""An emulated multi-node cluster on one machine: Linux network namespaces, veth pairs, a bridge.

    with NetCluster(nodes=2, rate="1gbit") as c:          # needs root and iproute2
        procs = [c.launch(i, ["trainlib", "train"], nproc_per_node=1) for i in range(2)]
        c.shape(1, loss=10)                                # change a link while the job runs
        c.link_down(1); c.link_up(1)

Layout (everything lives in namespaces the cluster itself creates; nothing is added to the host's
own network namespace, so no traffic can leave them):

    netns <name>-br:  bridge br0, one port p<i> per node        (the "switch")
    netns <name>-n<i>: eth0 = 10.213.0.<i+1>/24, lo              (node i's NIC)

A node's NIC is shaped in both directions (full duplex): a tbf on the node's eth0 limits what it
sends, and one on the switch port p<i> limits what it receives. Loss and partitions are nftables
rules on the switch (bridge family), so drops are silent to both ends (this kernel has no sch_netem; `netem_available()` says whether delay
and jitter can be emulated). A link taken down is the switch port going down: the node keeps its
address, as when a cable or a top-of-rack port fails.

Each command runs as `ip netns exec <ns> unshare --uts --mount`: its own hostname (node<i>), its own
/dev/shm tmpfs (as each pod has), and an /etc/hosts that maps the hostname to 127.0.1.1, as Debian
and many container images do, so software that trusts `gethostbyname(gethostname())` fails here
the way it fails on a real cluster. The environment is what a Kubeflow PyTorchJob pod gets.

Teardown always runs: on context exit, at interpreter exit, on SIGTERM/SIGINT, and namespaces left
by a dead earlier owner (their name carries the owner's pid) are swept when a new cluster starts.
"""
from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

log = logging.getLogger("trainlib")

PREFIX = "tlnc"                      # namespace names: tlnc<pid>x<k>-br, tlnc<pid>x<k>-n<i>
SUBNET = "10.213.0.0/24"             # used only inside the cluster's own namespaces
MASTER_PORT = 29500
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)x\d+-")
_count = 0

# goodput(): a sink that counts bytes from its first one, and a sender that streams for N seconds
_TCP_SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', int(sys.argv[1])))
s.listen(); print('ready', flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    d = c.recv(1 << 20)
    if not d: break
    t0 = t0 or time.monotonic(); n += len(d)
print(n / (time.monotonic() - t0), flush=True)
"""
_TCP_SEND = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); b = b'x' * (1 << 16); t = time.monotonic()
while time.monotonic() - t < float(sys.argv[3]): s.sendall(b)
s.close()
"""


class ClusterUnavailable(RuntimeError):
    """This machine cannot host an emulated cluster (not root, no iproute2, no namespaces)."""


def unavailable_reason() -> str | None:
    """Why a NetCluster cannot be made here (None when it can). Tests skip with this text."""
    if os.geteuid() != 0:
        return "the emulated cluster needs root (network namespaces, veth, tc)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 util-linux)"
    return None


def nft_available() -> bool:
    """nftables drives loss and partitions (apt-get install nftables)."""
    return shutil.which("nft") is not None


def netem_available() -> bool:
    """Delay and jitter need sch_netem, which some kernels (this CI VM's) are built without."""
    try:
        import gzip

        with gzip.open("/proc/config.gz", "rt") as f:
            return any(line.startswith("CONFIG_NET_SCH_NETEM=") for line in f)
    except OSError:
        return False


def _sh(*argv: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _list_netns() -> list[str]:
    out = _sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_netns_pids(ns: str, rounds: int = 20, settle_s: float = 0.05) -> None:
    """SIGKILL every process in namespace ns, and again until none is left: one pass over a snapshot
    misses a child forked between the snapshot and its parent's death (a launcher starting torchrun's
    worker survived a node kill that way and trained on). Bounded: `rounds` passes. A killed process
    leaves the list at once (a zombie has no namespace), so a quiet node ends in one or two."""
    for _ in range(rounds):
        pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
        if not pids:
            return
        for p in pids:
            try:
                os.kill(int(p), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(settle_s)
    log.warning("netcluster: processes still in %s after %d kill passes", ns, rounds)


def sweep_stale() -> list[str]:
    """Delete namespaces of earlier clusters whose owning process is gone; returns their names."""
    gone = []
    for ns in _list_netns():
        m = _NAME_RE.match(ns)
        if m and not _alive(int(m.group(1))):
            _kill_netns_pids(ns)
            _sh("ip", "netns", "del", ns, check=False)
            gone.append(ns)
    if gone:
        log.info("netcluster: swept %d stale namespaces: %s", len(gone), ", ".join(gone))
    return gone


def tbf_burst_bytes(rate: str) -> int:
    """The burst of a shaped NIC of `rate`: ~4 ms of traffic (at least 64 KiB so a GSO segment fits).
    After an idle gap this many bytes leave at once, faster than the rate (the planner models it:
    trainlib.planner.spec.ClusterSpec.nic_burst_bytes)."""
    return max(64 * 1024, _rate_bps(rate) // 8 // 250)


def _tbf_args(rate: str) -> list[str]:
    """tbf for a NIC of `rate`: tbf_burst_bytes(rate) and a queue of ~50 ms, as a switch port buffers."""
    limit = max(256 * 1024, _rate_bps(rate) // 8 // 20)
    return ["tbf", "rate", rate, "burst", str(tbf_burst_bytes(rate)), "limit", str(limit)]


def _rate_bps(rate: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps)", rate.strip().lower())
    if not m:
        raise ValueError(f"rate={rate!r} is not a tc rate; use e.g. '1gbit', '2500mbit', '100mbit'")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2)] * (8 if m.group(3) == "bps" else 1)
    return int(float(m.group(1)) * scale)


@dataclass
class Node:
    index: int
    netns: str
    ip: str
    hostname: str
    hosts_file: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    loss: float = 0.0                      # the nftables rules in force on this node
    blocked: tuple[str, ...] = ()


class NetCluster:
    """N emulated nodes on one bridge. See the module docstring."""

    def __init__(self, nodes: int, rate: str | None = None, loss: float = 0.0, delay: str | None = None,
                 shm_size: str = "2g", subnet: str = SUBNET):
        if nodes < 1 or nodes > 200:
            raise ValueError(f"nodes={nodes} must be between 1 and 200 (one /24)")
        global _count
        _count += 1
        self.name = f"{PREFIX}{os.getpid()}x{_count}"
        self.bridge_ns = f"{self.name}-br"
        self.n, self.rate, self.loss, self.delay, self.shm_size = nodes, rate, loss, delay, shm_size
        net = ipaddress.ip_network(subnet)
        self.prefixlen = net.prefixlen
        self._tmp = tempfile.mkdtemp(prefix=f"{self.name}-")
        self.nodes = [Node(i, f"{self.name}-n{i}", str(net.network_address + i + 1), f"node{i}",
                           os.path.join(self._tmp, f"hosts-{i}")) for i in range(nodes)]
        self._up = False
        self._old_handlers: dict = {}

    # ---- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "NetCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        sweep_stale()
        atexit.register(self.close)
        self._install_signal_handlers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self._up = True
        log.info("netcluster %s: %d nodes %s, rate=%s", self.name, self.n,
                 ", ".join(n.ip for n in self.nodes), self.rate or "unshaped")

    def _build(self) -> None:
        _sh("ip", "netns", "add", self.bridge_ns)
        br = ("ip", "-n", self.bridge_ns)
        _sh(*br, "link", "add", "br0", "type", "bridge")
        _sh(*br, "link", "set", "br0", "up")
        _sh(*br, "link", "set", "lo", "up")
        for node in self.nodes:
            port = f"p{node.index}"
            _sh("ip", "netns", "add", node.netns)
            # the veth is created inside the bridge namespace and its peer moved straight into the
            # node's: neither end ever exists in the host's namespace
            _sh(*br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
            _sh(*br, "link", "set", port, "master", "br0")
            _sh(*br, "link", "set", port, "up")
            nd = ("ip", "-n", node.netns)
            _sh(*nd, "addr", "add", f"{node.ip}/{self.prefixlen}", "dev", "eth0")
            _sh(*nd, "link", "set", "eth0", "up")
            _sh(*nd, "link", "set", "lo", "up")
            with open(node.hosts_file, "w") as f:
                f.write(f"127.0.0.1\tlocalhost\n127.0.1.1\t{node.hostname}\n")
                f.write("".join(f"{o.ip}\t{o.hostname}\n" for o in self.nodes if o is not node))
            self.shape(node.index, rate=self.rate, loss=self.loss, delay=self.delay)

    def close(self) -> None:
        """Kill every process started in the nodes, delete the namespaces. Idempotent."""
        for node in self.nodes:
            for p in node.procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        mine = [ns for ns in _list_netns() if ns.startswith(self.name + "-")]
        for ns in mine:
            _kill_netns_pids(ns)
        for ns in mine:
            _sh("ip", "netns", "del", ns, check=False)
        for node in self.nodes:
            for p in node.procs:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            node.procs.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._restore_signal_handlers()
        if self._up:
            log.info("netcluster %s: torn down", self.name)
        self._up = False

    def _install_signal_handlers(self) -> None:
        def on_signal(sig, frame):
            self.close()
            old = self._old_handlers.get(sig)
            if callable(old):
                old(sig, frame)
            raise SystemExit(128 + sig)

        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: context exit and atexit still tear down
            self._old_handlers = {}

    def _restore_signal_handlers(self) -> None:
        for sig, h in self._old_handlers.items():
            try:
                signal.signal(sig, h)
            except (ValueError, TypeError):
                pass
        self._old_handlers = {}

    # ---- links -----------------------------------------------------------------------------------
    def shape(self, i: int, rate: str | None = None, loss: float = 0.0, delay: str | None = None,
              jitter: str | None = None) -> None:
        """Set node i's NIC: rate (both directions, tbf), loss in percent (both directions, nftables),
        delay/jitter (netem, where the kernel has it). Can be called while a job runs."""
        node = self.nodes[i]
        for ns, dev in ((node.netns, "eth0"), (self.bridge_ns, f"p{i}")):
            _sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            if delay or jitter:
                if not netem_available():
                    raise ClusterUnavailable("delay/jitter need the kernel's sch_netem (CONFIG_NET_SCH_NETEM), "
                                             "which this kernel does not have")
                netem = ["netem", "delay", delay or "0ms", *([jitter] if jitter else [])]
                _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", *netem)
                if rate:
                    _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *_tbf_args(rate))
            elif rate:
                _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", *_tbf_args(rate))
        self._set_rules(i, loss=loss, blocked=node.blocked)

    def _set_rules(self, i: int, loss: float = 0.0, blocked: tuple[str, ...] = ()) -> None:
        """Node i's loss and blocked peers, enforced at the switch (nftables' bridge family in the
        bridge namespace): drops are silent, as on a real network, never an error to the sender."""
        if not 0 <= loss <= 100:
            raise ValueError(f"loss={loss} is a percentage between 0 and 100")
        node = self.nodes[i]
        if (loss, tuple(blocked)) == (node.loss, node.blocked):
            return
        node.loss, node.blocked = loss, tuple(blocked)
        self._apply_switch_rules()

    def _apply_switch_rules(self) -> None:
        if not nft_available():
            raise ClusterUnavailable("loss and partitions need nftables (apt-get install nftables)")
        rules = []
        for node in self.nodes:
            port = f"p{node.index}"
            if node.blocked:
                peers = ", ".join(node.blocked)
                rules += [f"ip saddr {node.ip} ip daddr {{ {peers} }} drop",
                          f"ip saddr {{ {peers} }} ip daddr {node.ip} drop"]
            if node.loss:
                # numgen draws per frame: the share dropped is loss/100 in each direction of the link
                n = int(round(node.loss * 100))
                rules += [f'iifname "{port}" numgen random mod 10000 < {n} drop',
                          f'oifname "{port}" numgen random mod 10000 < {n} drop']
        script = "table bridge tlnc\ndelete table bridge tlnc\n"
        if rules:
            body = "\n".join(f"    {r}" for r in rules)
            script += f"table bridge tlnc {{\n  chain links {{ type filter hook forward priority 0;\n{body}\n  }}\n}}\n"
        r = subprocess.run(["ip", "netns", "exec", self.bridge_ns, "nft", "-f", "-"], input=script,
                           capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            raise RuntimeError(f"nft in {self.bridge_ns} failed: {r.stderr.strip()}\n{script}")

    def partition(self, i: int, peers: list[int]) -> None:
        """Silently drop everything between node i and the given nodes (no error reaches either side,
        as when a route or a security group fails)."""
        self._set_rules(i, loss=self.nodes[i].loss, blocked=tuple(self.nodes[p].ip for p in peers))

    def heal(self, i: int) -> None:
        self._set_rules(i, loss=self.nodes[i].loss, blocked=())

    def link_down(self, i: int) -> None:
        """Node i's switch port goes down: nothing in or out, the node keeps its address."""
        _sh("ip", "-n", self.bridge_ns, "link", "set", f"p{i}", "down")

    def link_up(self, i: int) -> None:
        _sh("ip", "-n", self.bridge_ns, "link", "set", f"p{i}", "up")

    # ---- processes -------------------------------------------------------------------------------
    def wrap(self, i: int, argv: list[str]) -> list[str]:
        """argv as it runs on node i: its netns, hostname, /dev/shm and /etc/hosts."""
        node = self.nodes[i]
        script = ('hostname "$0" && mount -t tmpfs -o size="$1" tmpfs /dev/shm && '
                  'mount --bind "$2" /etc/hosts && shift 2 && exec "$@"')
        return ["ip", "netns", "exec", node.netns, "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", script, node.hostname, self.shm_size, node.hosts_file, *argv]

    def run(self, i: int, argv: list[str], env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
        """Start argv on node i (in its own process group, so teardown reaches its children)."""
        p = subprocess.Popen(self.wrap(i, argv), env=env, start_new_session=True, **popen)
        self.nodes[i].procs.append(p)
        return p

    def pytorchjob_env(self, i: int, nproc_per_node: int, nnodes: int | None = None,
                       base: dict[str, str] | None = None, port: int = MASTER_PORT) -> dict[str, str]:
        """What the Kubeflow training operator injects into replica i (node rank i) of a PyTorchJob."""
        nnodes = self.n if nnodes is None else nnodes
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("PET_", "TORCHELASTIC_")) and k not in
               ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME",
                "NCCL_SOCKET_IFNAME", "TRAINLIB_PS_HOST")}
        master = self.nodes[0].ip
        # the image's PATH: this interpreter's bin first, so `trainlib` and `torchrun` resolve
        path = env.get("PATH", "/usr/bin:/bin")
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + path
        env.update(MASTER_ADDR=master, MASTER_PORT=str(port), PET_MASTER_ADDR=master, PET_MASTER_PORT=str(port),
                   PET_NNODES=str(nnodes), PET_NPROC_PER_NODE=str(nproc_per_node), PET_NODE_RANK=str(i),
                   RANK=str(i), WORLD_SIZE=str(nnodes * nproc_per_node))
        return env

    def launch(self, i: int, cmd: list[str], nproc_per_node: int = 1, env: dict[str, str] | None = None,
               nnodes: int | None = None, max_restarts: int = 0, **popen) -> subprocess.Popen:
        """`trainlib launch -- CMD` on node i with a PyTorchJob pod's environment."""
        full = self.pytorchjob_env(i, nproc_per_node, nnodes=nnodes, base=env)
        if max_restarts:
            full["PET_MAX_RESTARTS"] = str(max_restarts)
        argv = [sys.executable, "-m", "trainlib.cli", "launch", "--", *cmd]
        return self.run(i, argv, env=full, **popen)

    def goodput(self, src: int = 0, dst: int = 1, seconds: float = 1.5, port: int = 5999) -> float:
        """Bytes/s of one TCP stream from node src to node dst over the links as shaped now."""
        sink = self.run(dst, [sys.executable, "-c", _TCP_SINK, str(port)], stdout=subprocess.PIPE, text=True)
        try:
            if sink.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the TCP sink on node {dst} did not start")
            subprocess.run(self.wrap(src, [sys.executable, "-c", _TCP_SEND, self.nodes[dst].ip, str(port), str(seconds)]),
                           timeout=seconds + 30, check=True)
            out, _ = sink.communicate(timeout=30)
        finally:
            sink.kill()
            sink.wait()
        return float(out.strip())

    def kill_node(self, i: int) -> None:
        """Node i dies: SIGKILL every process in its namespace (torchrun's workers run in sessions of
        their own, so killing the launcher's process group would leave them running)."""
        _kill_netns_pids(self.nodes[i].netns)

    def wait_all(self, procs: list[subprocess.Popen], timeout_s: float) -> list[int | None]:
        """Exit codes of procs, None for any still running after timeout_s (those are killed)."""
        deadline = time.monotonic() + timeout_s
        codes: list[int | None] = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        for p, c in zip(procs, codes):
            if c is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        return codes


@dataclass
class JobResult:
    codes: list[int | None]            # per node: the launcher's exit code, None if it had to be killed
    outputs: list[str]                 # per node: stdout + stderr
    wall_s: float

    @property
    def summary(self) -> dict | None:
        """Rank 0's final JSON line (`trainlib train` prints it last on node 0's stdout)."""
        import json

        for line in reversed(self.outputs[0].splitlines()):
            line = line.strip()
            if line.startswith("{") and "weights_sha256" in line:
                return json.loads(line)
        return None


def run_job(cluster: NetCluster, cmd: list[str], nproc_per_node: int = 1, nodes: list[int] | None = None,
            env: dict[str, str] | None = None, timeout_s: float = 300.0, during=None,
            max_restarts: int = 0) -> JobResult:
    """Run `trainlib launch -- CMD` on the given nodes (default: all) as one PyTorchJob and wait.

    `during(cluster, procs)` runs while the job does (fault injection); every process left after
    timeout_s is killed, so this always returns."""
    nodes = list(range(cluster.n)) if nodes is None else nodes
    logs = [tempfile.TemporaryFile(mode="w+") for _ in nodes]
    t0 = time.monotonic()
    procs = [cluster.launch(i, cmd, nproc_per_node=nproc_per_node, env=env, nnodes=len(nodes),
                            max_restarts=max_restarts, stdout=log_, stderr=subprocess.STDOUT)
             for i, log_ in zip(nodes, logs)]
    try:
        if during is not None:
            during(cluster, procs)
        codes = cluster.wait_all(procs, max(1.0, timeout_s - (time.monotonic() - t0)))
    finally:
        for i, p in zip(nodes, procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        if any(p.returncode is None or p.returncode < 0 for p in procs):
            for i in nodes:   # torchrun's workers live in their own sessions: reap what is left
                cluster.kill_node(i)
    outputs = []
    for log_ in logs:
        log_.seek(0)
        outputs.append(log_.read())
        log_.close()
    return JobResult(codes, outputs, time.monotonic() - t0)
