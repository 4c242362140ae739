"""Multi-node correctness on an emulated cluster (trainlib.netcluster): real namespaces, real links.

Each node is a network namespace with its own hostname (resolving to 127.0.1.1, as on Debian),
its own /dev/shm and a 1 Gbit/s link; each runs `trainlib launch -- trainlib train` with the env a
PyTorchJob pod gets. Every layout must end on the weights_sha256 of the same layout run on one
node (the trainer on N local gloo ranks on loopback, trainlib.testing.run_ranks: a `trainlib train`
job there would cost ~13-25 s of CPU in imports and torchrun): the reference is computed here, not stored.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainlib import netcluster
from tests.netjob import job_env
from trainlib.netcluster import NetCluster, run_job
from trainlib.testing import run_ranks
from tests.trainer_ranks import train_one

pytestmark = pytest.mark.skipif(netcluster.unavailable_reason() is not None,
                                reason=netcluster.unavailable_reason() or "")

# a small job: startup dominates, so 2 layers and 6 steps say as much as 300 steps would
TRAIN = ["trainlib", "train", "--train.steps", "6", "--model.n_layer", "2", "--train.log_every", "2",
         "--train.batch_size", "8", "--model.seq_len", "64"]
TOKEN = "0123456789abcdef" * 4
JOB_TIMEOUT_S = 180


_references: dict[tuple, dict] = {}


def local_reference(tmp: Path, nproc: int, args: list[str]) -> dict:
    """The same job on one node: the trainer on `nproc` gloo ranks on loopback (cached per layout
    for this module: sync PS and all-reduce are compared with the same all-reduce run)."""
    key = (nproc, tuple(args))
    if key not in _references:
        argv = [*TRAIN[2:], "--train.metrics", str(tmp / "ref.jsonl"), *args]   # TRAIN less `trainlib train`
        _references[key] = run_ranks(train_one, nproc, argv, env={"TRAINLIB_NO_PROGRESS": "1"},
                                     timeout_s=JOB_TIMEOUT_S)[0]
    return _references[key]


def cluster_run(cluster: NetCluster, tmp: Path, nproc: int, args: list[str], nodes=(0, 1), **extra: str):
    cmd = [*TRAIN, "--train.metrics", str(tmp / "metrics.jsonl"), *args]
    res = run_job(cluster, cmd, nproc_per_node=nproc, nodes=list(nodes), env=job_env(tmp, **extra),
                  timeout_s=JOB_TIMEOUT_S)
    assert res.codes == [0] * len(nodes), "\n---\n".join(o[-3000:] for o in res.outputs)
    assert res.summary is not None, res.outputs[0][-3000:]
    return res


@pytest.fixture(scope="module")
def cluster():
    with NetCluster(3, rate="1gbit") as c:
        yield c


def test_hostname_resolves_to_loopback_in_each_node(cluster):
    """The emulation reproduces the trap: gethostbyname(gethostname()) is 127.0.1.1 on every node."""
    probe = [sys.executable, "-c", "import socket; print(socket.gethostname(), socket.gethostbyname(socket.gethostname()))"]
    out = subprocess.run(cluster.wrap(1, probe), capture_output=True, text=True, timeout=30).stdout.split()
    assert out == ["node1", "127.0.1.1"]


def test_dp_two_nodes_matches_one_node(cluster, tmp_path):
    ref = local_reference(tmp_path, 2, [])
    res = cluster_run(cluster, tmp_path, 1, [])
    assert res.summary["world_size"] == 2
    assert res.summary["weights_sha256"] == ref["weights_sha256"]
    # the launcher chose the interface that routes to MASTER_ADDR, and said so
    assert "GLOO_SOCKET_IFNAME=NCCL_SOCKET_IFNAME=eth0" in res.outputs[1]


def test_ps_colocated_two_nodes_matches_one_node(cluster, tmp_path):
    ref = local_reference(tmp_path, 2, [])      # sync PS sums exactly as all-reduce does
    res = cluster_run(cluster, tmp_path, 1, ["--sync.kind", "ps"])
    assert res.summary["weights_sha256"] == ref["weights_sha256"]
    # each node's server bound and announced its own routable address, not 127.0.x.x
    for i in (0, 1):
        assert f"started colocated parameter server {cluster.nodes[i].ip}:" in res.outputs[i]


def test_ps_dedicated_server_node(cluster, tmp_path):
    """Workers on nodes 0 and 1, the server alone on node 2 (a CPU-only pod), authenticated."""
    ref = local_reference(tmp_path, 2, [])
    srv_env = job_env(tmp_path, TRAINLIB_PS_TOKEN=TOKEN)
    srv = cluster.run(2, [sys.executable, "-m", "trainlib.cli", "ps-server", "--bind", f"{cluster.nodes[2].ip}:7000"],
                      env=srv_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = srv.stdout.readline()
        assert "listening on" in line, line
        res = cluster_run(cluster, tmp_path, 1, ["--sync.kind", "ps", "--sync.servers", f"{cluster.nodes[2].ip}:7000"],
                          TRAINLIB_PS_TOKEN=TOKEN)
    finally:
        srv.terminate()
        srv.wait(timeout=10)
    assert res.summary["weights_sha256"] == ref["weights_sha256"]


def test_tp_inside_node_dp_across(cluster, tmp_path):
    ref = local_reference(tmp_path, 4, ["--mesh.tp", "2"])
    res = cluster_run(cluster, tmp_path, 2, ["--mesh.tp", "2"])
    assert res.summary["mesh"] == {"pp": 1, "dp": 2, "tp": 2}
    assert res.summary["weights_sha256"] == ref["weights_sha256"]


def test_pp_across_nodes(cluster, tmp_path):
    ref = local_reference(tmp_path, 2, ["--mesh.pp", "2"])
    res = cluster_run(cluster, tmp_path, 1, ["--mesh.pp", "2"])
    assert res.summary["mesh"] == {"pp": 2, "dp": 1, "tp": 1}
    assert res.summary["weights_sha256"] == ref["weights_sha256"]


def test_dp_two_nodes_of_two_goes_hierarchical(cluster, tmp_path):
    """2 nodes x 2 processes: `auto` picks the hierarchical all-reduce (shm in the node, gloo across).
    One node has no such layout, and the hierarchical sum adds (g0+g1)+(g2+g3) where shm and gloo
    add in other orders, so the check is the loss within fp32 summation noise, not the hash."""
    ref = local_reference(tmp_path, 4, [])
    res = cluster_run(cluster, tmp_path, 2, [])
    assert "AllReduce over hierarchical" in res.outputs[0] and "AllReduce over hierarchical" in res.outputs[1]
    assert res.summary["world_size"] == 4
    assert abs(res.summary["loss_last"] - ref["loss_last"]) < 1e-4
    assert res.summary["loss_first"] == pytest.approx(ref["loss_first"], abs=1e-6)
