"""Multi-node correctness on an emulated cluster (trainlib.netcluster): real namespaces, real links.

Each node is a network namespace with its own hostname (resolving to 127.0.1.1, as on Debian),
its own /dev/shm and a 1 Gbit/s link; each runs `trainlib launch -- trainlib train` with the env a
PyTorchJob pod gets. Every layout must end on the weights_sha256 of the same layout run on one
node (the trainer on N local gloo ranks on loopback, trainlib.testing.run_ranks: a `trainlib train`
job there would cost ~13-25 s of CPU in imports and torchrun): the reference is computed here, not stored.

The cluster jobs are independent, so they all start in the background when the first test asks for
them (`jobs`), two at a time, each on a cluster of its own (two NetClusters of 3 nodes: a job alone
leaves a core idle while its launchers import and its ranks start and stop); each test checks its own.
"""
from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
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


# cluster jobs at once (one cluster each)
PARALLEL = 2


@pytest.fixture(scope="module")
def clusters():
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(NetCluster(3, rate="1gbit")) for _ in range(PARALLEL)]


@pytest.fixture(scope="module")
def cluster(clusters):
    return clusters[0]


def _dedicated_server_job(cluster: NetCluster, tmp: Path):
    """Workers on nodes 0 and 1, the server alone on node 2 (a CPU-only pod), authenticated."""
    srv_env = job_env(tmp, TRAINLIB_PS_TOKEN=TOKEN)
    srv = cluster.run(2, [sys.executable, "-m", "trainlib.cli", "ps-server", "--bind", f"{cluster.nodes[2].ip}:7000"],
                      env=srv_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = srv.stdout.readline()
        assert "listening on" in line, line
        return cluster_run(cluster, tmp, 1, ["--sync.kind", "ps", "--sync.servers", f"{cluster.nodes[2].ip}:7000"],
                           TRAINLIB_PS_TOKEN=TOKEN)
    finally:
        srv.terminate()
        srv.wait(timeout=10)


# test name -> (nproc per node, trainer flags); "ps_dedicated" runs _dedicated_server_job. The 2-process
# jobs first: they take longest.
JOBS = {"hierarchical": (2, []), "tp_dp": (2, ["--mesh.tp", "2"]), "dp": (1, []),
        "ps_colocated": (1, ["--sync.kind", "ps"]), "ps_dedicated": None, "pp": (1, ["--mesh.pp", "2"])}


@pytest.fixture(scope="module")
def jobs(clusters, tmp_path_factory):
    """Job name -> Future of (the cluster it ran on, its JobResult), for every job of JOBS, started in
    the background PARALLEL at a time, each on a cluster no other job is using."""
    free: queue.Queue = queue.Queue()
    for c in clusters:
        free.put(c)

    def run(name: str):
        tmp = tmp_path_factory.mktemp(name)
        c = free.get()
        try:
            if JOBS[name] is None:
                return c, _dedicated_server_job(c, tmp)
            nproc, args = JOBS[name]
            return c, cluster_run(c, tmp, nproc, args)
        finally:
            free.put(c)

    pool = ThreadPoolExecutor(PARALLEL)
    futures: dict[str, Future] = {name: pool.submit(run, name) for name in JOBS}
    try:
        yield futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def test_hostname_resolves_to_loopback_in_each_node(cluster):
    """The emulation reproduces the trap: gethostbyname(gethostname()) is 127.0.1.1 on every node."""
    probe = [sys.executable, "-c", "import socket; print(socket.gethostname(), socket.gethostbyname(socket.gethostname()))"]
    out = subprocess.run(cluster.wrap(1, probe), capture_output=True, text=True, timeout=30).stdout.split()
    assert out == ["node1", "127.0.1.1"]


def test_dp_two_nodes_matches_one_node(jobs, tmp_path):
    ref = local_reference(tmp_path, 2, [])
    _, res = jobs["dp"].result()
    assert res.summary["world_size"] == 2
    assert res.summary["weights_sha256"] == ref["weights_sha256"]
    # the launcher chose the interface that routes to MASTER_ADDR, and said so
    assert "GLOO_SOCKET_IFNAME=NCCL_SOCKET_IFNAME=eth0" in res.outputs[1]


def test_ps_colocated_two_nodes_matches_one_node(jobs, tmp_path):
    ref = local_reference(tmp_path, 2, [])      # sync PS sums exactly as all-reduce does
    cluster, res = jobs["ps_colocated"].result()
    assert res.summary["weights_sha256"] == ref["weights_sha256"]
    # each node's server bound and announced its own routable address, not 127.0.x.x
    for i in (0, 1):
        assert f"started colocated parameter server {cluster.nodes[i].ip}:" in res.outputs[i]


def test_ps_dedicated_server_node(jobs, tmp_path):
    """Workers on nodes 0 and 1, the server alone on node 2 (a CPU-only pod), authenticated."""
    ref = local_reference(tmp_path, 2, [])
    _, res = jobs["ps_dedicated"].result()
    assert res.summary["weights_sha256"] == ref["weights_sha256"]


def test_tp_inside_node_dp_across(jobs, tmp_path):
    ref = local_reference(tmp_path, 4, ["--mesh.tp", "2"])
    _, res = jobs["tp_dp"].result()
    assert res.summary["mesh"] == {"pp": 1, "dp": 2, "tp": 2}
    assert res.summary["weights_sha256"] == ref["weights_sha256"]


def test_pp_across_nodes(jobs, tmp_path):
    ref = local_reference(tmp_path, 2, ["--mesh.pp", "2"])
    _, res = jobs["pp"].result()
    assert res.summary["mesh"] == {"pp": 2, "dp": 1, "tp": 1}
    assert res.summary["weights_sha256"] == ref["weights_sha256"]


def test_dp_two_nodes_of_two_goes_hierarchical(jobs, tmp_path):
    """2 nodes x 2 processes: `auto` picks the hierarchical all-reduce (shm in the node, gloo across).
    One node has no such layout, and the hierarchical sum adds (g0+g1)+(g2+g3) where shm and gloo
    add in other orders, so the check is the loss within fp32 summation noise, not the hash."""
    ref = local_reference(tmp_path, 4, [])
    _, res = jobs["hierarchical"].result()
    assert "AllReduce over hierarchical" in res.outputs[0] and "AllReduce over hierarchical" in res.outputs[1]
    assert res.summary["world_size"] == 4
    assert abs(res.summary["loss_last"] - ref["loss_last"]) < 1e-4
    assert res.summary["loss_first"] == pytest.approx(ref["loss_first"], abs=1e-6)
