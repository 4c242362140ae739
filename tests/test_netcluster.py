"""The emulated cluster itself, and the interface choice it exists to test (trainlib.netif).

The link checks measure real traffic between two namespaces: a 100 Mbit/s tbf must deliver close
to 100 Mbit/s (not 10 Gbit/s, not 10), a downed port or a partition must stop traffic and a heal
restore it, random loss must drop about the share asked for, and teardown must leave no namespace.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from trainlib import netcluster, netif
from trainlib.netcluster import NetCluster

needs_cluster = pytest.mark.skipif(netcluster.unavailable_reason() is not None,
                                   reason=netcluster.unavailable_reason() or "")
needs_nft = pytest.mark.skipif(not netcluster.nft_available(), reason="nftables is not installed (apt-get install nftables)")

# UDP probes: how many of N datagrams arrive (loss, partitions, a downed port)
UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 5002)); s.settimeout(1.5)
print('ready', flush=True); n = 0
try:
    while True:
        s.recv(64); n += 1
except socket.timeout:
    pass
print(n, flush=True)
"""
UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(b'p', (sys.argv[1], 5002)); time.sleep(0.0002)
"""


def mbits(c: NetCluster, seconds: float = 1.5) -> float:
    return c.goodput(0, 1, seconds) * 8 / 1e6


def udp_delivered(c: NetCluster, n: int) -> int:
    sink = c.run(1, [sys.executable, "-c", UDP_SINK], stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    subprocess.run(c.wrap(0, [sys.executable, "-c", UDP_SEND, c.nodes[1].ip, str(n)]), timeout=60, check=True)
    out, _ = sink.communicate(timeout=30)
    return int(out.strip())


@pytest.fixture(scope="module")
def cluster():
    with NetCluster(2, rate="100mbit") as c:
        yield c


@needs_cluster
def test_rate_is_shaped_and_changeable(cluster):
    assert 75 <= mbits(cluster) <= 105          # tbf at 100 Mbit/s
    cluster.shape(0, rate="400mbit")
    cluster.shape(1, rate="400mbit")
    try:
        assert 300 <= mbits(cluster) <= 420     # changed while the cluster runs
    finally:
        cluster.shape(0, rate="100mbit")
        cluster.shape(1, rate="100mbit")


@needs_cluster
@pytest.mark.parametrize("cut", ["link_down", "partition"])
def test_a_cut_stops_traffic_and_its_repair_restores_it(cluster, cut):
    if cut == "partition" and not netcluster.nft_available():
        pytest.skip("nftables is not installed (apt-get install nftables)")
    do, undo = {"link_down": (lambda: cluster.link_down(1), lambda: cluster.link_up(1)),
                "partition": (lambda: cluster.partition(0, [1]), lambda: cluster.heal(0))}[cut]
    do()
    try:
        assert udp_delivered(cluster, 200) == 0
    finally:
        undo()
    assert udp_delivered(cluster, 200) == 200


@needs_cluster
@needs_nft
def test_random_loss_drops_about_the_share_asked(cluster):
    cluster.shape(1, rate="100mbit", loss=20)
    try:
        got = udp_delivered(cluster, 2000)
    finally:
        cluster.shape(1, rate="100mbit", loss=0)
    # binomial(2000, 0.8): mean 1600, sd 18; +-5 sd
    assert 1510 <= got <= 1690


@needs_cluster
def test_nodes_have_their_own_hostname_shm_and_route(cluster):
    probe = ("import socket, os; from trainlib.netif import route_to; r = route_to(os.environ['M']); "
             "open('/dev/shm/tlnc-probe', 'w').write('x'); print(socket.gethostname(), r.ifname, r.address, "
             "sorted(os.listdir('/dev/shm')))")
    outs = []
    for i in (0, 1):
        env = {"M": cluster.nodes[0].ip, "PATH": "/usr/bin:/bin"}
        outs.append(subprocess.run(cluster.wrap(i, [sys.executable, "-c", probe]), env=env, capture_output=True,
                                   text=True, timeout=30).stdout.strip())
    assert outs[0] == "node0 eth0 10.213.0.1 ['tlnc-probe']"  # the master's own address is on eth0
    assert outs[1] == "node1 eth0 10.213.0.2 ['tlnc-probe']"  # each node's /dev/shm is its own tmpfs


@needs_cluster
def test_teardown_and_stale_sweep():
    c = NetCluster(1)
    c.start()
    names = [ns for ns in netcluster._list_netns() if ns.startswith(c.name)]
    assert len(names) == 2
    c.close()
    assert not [ns for ns in netcluster._list_netns() if ns.startswith(c.name)]
    # a namespace left by a dead owner (pid 2**22 + 1 is above pid_max's default) is swept
    stale = f"{netcluster.PREFIX}{2**22 + 1}x1-n0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    assert stale in netcluster.sweep_stale()
    assert stale not in netcluster._list_netns()


def test_socket_ifname_respects_the_user_and_loopback(tmp_path):
    assert netif.socket_ifname_env({"GLOO_SOCKET_IFNAME": "ens5"}, "10.0.0.1") == ({}, None)
    assert netif.socket_ifname_env({}, "127.0.0.1") == ({}, None)
    assert netif.socket_ifname_env({}, None) == ({}, None)


def test_default_route_interface_from_the_kernel_table(tmp_path):
    table = tmp_path / "route"
    table.write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
                     "ens6\t0000FEA9\t00000000\t0001\t0\t0\t0\t0000FFFF\n"
                     "ens5\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\n")
    assert netif.default_route_ifname(str(table)) == "ens5"
    table.write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n")
    assert netif.default_route_ifname(str(table)) is None


def test_unresolvable_master_falls_back_to_the_default_route():
    add, why = netif.socket_ifname_env({}, "no-such-master.invalid")
    dflt = netif.default_route_ifname()
    if dflt is None:
        assert add == {} and "cannot resolve" in why
    else:
        assert add == {"GLOO_SOCKET_IFNAME": dflt, "NCCL_SOCKET_IFNAME": dflt}
        assert "default route" in why and "no-such-master.invalid" in why


@needs_cluster
def test_cluster_command_runs_a_job_on_every_node():
    """`trainlib cluster` is the CLI form: each node's worker sees its rank and its own hostname."""
    probe = "import os, socket; print('probe', os.environ['RANK'], os.environ['WORLD_SIZE'], socket.gethostname())"
    r = subprocess.run([sys.executable, "-m", "trainlib.cli", "cluster", "--nodes", "2", "--rate", "100mbit", "--",
                        sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = sorted(line for line in r.stdout.splitlines() if " probe " in line)
    assert lines == ["[node0] probe 0 2 node0", "[node1] probe 1 2 node1"]
    bad = subprocess.run([sys.executable, "-m", "trainlib.cli", "cluster", "--nodes", "2", "--rate", "fast"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "rate='fast' is not a tc rate" in bad.stderr


def _static_env(**extra: str) -> dict[str, str]:
    env = {"MASTER_ADDR": "10.213.0.1", "MASTER_PORT": "29500", "PET_NNODES": "2", "PET_NODE_RANK": "1",
           "PET_NPROC_PER_NODE": "1", "RANK": "1", "WORLD_SIZE": "2", "PATH": "/usr/bin"}
    env.update(extra)
    return env


def test_static_job_bounds_its_rendezvous_and_restarts_in_place():
    from trainlib.launchers.devices import Devices
    from trainlib.launchers.errors import LaunchConfigError
    from trainlib.launchers.plan import build_plan

    cpu = Devices()
    plan = build_plan(["trainlib", "train"], _static_env(), devices=cpu)
    assert "--rdzv-conf" not in plan.torchrun_argv and "--max-restarts" not in plan.torchrun_argv
    plan = build_plan(["trainlib", "train"], _static_env(TRAINLIB_TIMEOUT_S="20", PET_MAX_RESTARTS="3"), devices=cpu)
    argv = plan.torchrun_argv
    assert argv[argv.index("--rdzv-conf") + 1] == "timeout=20"
    assert argv[argv.index("--max-restarts") + 1] == "3"
    assert any("join within 20 s" in n for n in plan.net_notes)
    plan = build_plan(["trainlib", "train"], _static_env(TRAINLIB_TIMEOUT_S="20", TRAINLIB_RDZV_TIMEOUT_S="900"),
                      devices=cpu)
    assert "timeout=900" in plan.torchrun_argv
    with pytest.raises(LaunchConfigError, match="TRAINLIB_RDZV_TIMEOUT_S='soon' is not a number"):
        build_plan(["trainlib", "train"], _static_env(TRAINLIB_RDZV_TIMEOUT_S="soon"), devices=cpu)
