"""Network faults on the emulated cluster: real links going down, losing packets, partitions.

The contract: a survivor exits non-zero (138, retryable) within the timeout plus a few seconds and
says which operation and which peer it lost, never hangs; a blip shorter than the timeout, or a
lossy link, does not kill the job, which ends on the uninterrupted run's weights; and after a
longer outage a job with restarts and checkpoints resumes once the link is back and ends on those
same weights. The timeout is short here (TRAINLIB_TIMEOUT_S) so each case takes seconds.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainlib import netcluster
from tests.netjob import job_env
from trainlib.netcluster import NetCluster, run_job
from trainlib.testing import run_ranks
from tests.trainer_ranks import train_one

pytestmark = pytest.mark.skipif(netcluster.unavailable_reason() is not None,
                                reason=netcluster.unavailable_reason() or "")
needs_nft = pytest.mark.skipif(not netcluster.nft_available(), reason="nftables is not installed (apt-get install nftables)")

TOKEN = "fedcba9876543210" * 4
SLACK_S = 12          # process teardown and torchrun's agent on a loaded 2-core machine
# long enough (in steps) that a fault lands mid-run; small enough to start and finish quickly
TRAIN = ["trainlib", "train", "--model.n_layer", "2", "--train.log_every", "1", "--train.batch_size", "8",
         "--model.seq_len", "64"]


def steps_done(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(x)["step"] for x in lines if x.strip()), default=0)


def wait_for_step(metrics: Path, step: int, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while steps_done(metrics) < step:
        assert time.monotonic() < deadline, f"the job did not reach step {step} within {limit_s}s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    with NetCluster(3, rate="1gbit") as c:
        yield c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same job with no fault, on 2 local gloo ranks (a 2-node job ends on the
    same weights, which test_multinode checks; here it saves a ~10 s job start on the cluster)."""
    tmp = tmp_path_factory.mktemp("ref")
    return run_ranks(train_one, 2, [*TRAIN[2:], "--train.steps", "24", "--train.metrics", str(tmp / "m.jsonl")],
                     env={"TRAINLIB_NO_PROGRESS": "1"}, timeout_s=240)[0]


def test_link_down_longer_than_the_timeout(cluster, tmp_path):
    timeout_s = 8.0
    metrics = tmp_path / "m.jsonl"
    marks = {}

    def cut(c, procs):
        wait_for_step(metrics, 3)
        c.link_down(1)
        marks["down"] = time.monotonic()

    try:
        res = run_job(cluster, [*TRAIN, "--train.steps", "400", "--train.metrics", str(metrics)], nodes=[0, 1],
                      env=job_env(tmp_path, timeout_s), timeout_s=180, during=cut)
        after_cut = time.monotonic() - marks["down"]
    finally:
        cluster.link_up(1)
    assert res.codes == [138, 138], (res.codes, res.outputs[0][-2000:])
    # each survivor names the collective it was blocked in: the gradient all_reduce or, when the cut lands
    # between backward and the step's logging, the metrics all_gather
    for out in res.outputs:
        assert re.search(r"lost a peer: rank \d: (all_reduce|all_gather)\S* #\d+ ", out), out[-3000:]
    # the heartbeats name the other side: node 0 sees rank 1 stop; node 1 cannot reach node 0's store
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    assert f"rank 1 ({n1.hostname}, {n1.ip}) stopped answering" in res.outputs[0], res.outputs[0][-3000:]
    assert f"store at {n0.ip}:" in res.outputs[1] and "did not answer either" in res.outputs[1], res.outputs[1][-3000:]
    # every survivor ended within the timeout plus slack of the cut (not after torch's 30 minutes)
    assert after_cut <= timeout_s + SLACK_S, after_cut


# minutes-long tier (`pytest -m long`): a blip shorter than the timeout is the outage test below without
# the checkpoint; the default suite keeps the outage, loss, delay and partition cases
@pytest.mark.long
def test_short_blip_does_not_kill_the_job(cluster, tmp_path, uninterrupted):
    metrics = tmp_path / "m.jsonl"

    def blip(c, procs):
        wait_for_step(metrics, 3)
        c.link_down(1)
        time.sleep(3.0)
        c.link_up(1)

    res = run_job(cluster, [*TRAIN, "--train.steps", "24", "--train.metrics", str(metrics)], nodes=[0, 1],
                  env=job_env(tmp_path, 30), timeout_s=240, during=blip)
    assert res.codes == [0, 0], res.outputs[0][-3000:]
    assert res.summary["weights_sha256"] == uninterrupted["weights_sha256"]


@needs_nft
def test_ten_percent_loss_slows_but_does_not_change_the_result(cluster, tmp_path, uninterrupted):
    # node 1's link drops 10% of the frames in each direction (TCP retransmits them)
    cluster.shape(1, rate="1gbit", loss=10)
    try:
        res = run_job(cluster, [*TRAIN, "--train.steps", "24", "--train.metrics", str(tmp_path / "m.jsonl")],
                      nodes=[0, 1], env=job_env(tmp_path, 60), timeout_s=240)
    finally:
        cluster.shape(1, rate="1gbit", loss=0)
    assert res.codes == [0, 0], res.outputs[0][-3000:]
    assert res.summary["weights_sha256"] == uninterrupted["weights_sha256"]


def test_extra_delay(cluster, tmp_path, uninterrupted):
    if not netcluster.netem_available():
        pytest.skip("200 ms of extra delay needs the kernel's sch_netem (CONFIG_NET_SCH_NETEM), "
                    "which this kernel is built without; rate, loss, link-down and partitions are tested")
    for i in (0, 1):
        cluster.shape(i, rate="1gbit", delay="200ms")
    try:
        res = run_job(cluster, [*TRAIN, "--train.steps", "24", "--train.metrics", str(tmp_path / "m.jsonl")],
                      nodes=[0, 1], env=job_env(tmp_path, 60), timeout_s=600)
    finally:
        for i in (0, 1):
            cluster.shape(i, rate="1gbit")
    assert res.codes == [0, 0]
    assert res.summary["weights_sha256"] == uninterrupted["weights_sha256"]


@needs_nft
def test_node_partitioned_from_the_parameter_server(cluster, tmp_path):
    """Dedicated server on node 2; node 1 loses its route to it mid-run. Both workers stop within the
    timeout naming the server (node 1 cannot reach it; node 0's sync pull waits on node 1's push)."""
    timeout_s = 8.0
    metrics = tmp_path / "m.jsonl"
    server = f"{cluster.nodes[2].ip}:7100"
    srv = cluster.run(2, [sys.executable, "-m", "trainlib.cli", "ps-server", "--bind", server,
                          "--worker-timeout", "30"],
                      env=job_env(tmp_path, 30, TRAINLIB_PS_TOKEN=TOKEN), stdout=subprocess.PIPE,
                      stderr=subprocess.DEVNULL, text=True)
    marks = {}

    def cut(c, procs):
        wait_for_step(metrics, 3)
        c.partition(1, [2])
        marks["cut"] = time.monotonic()

    try:
        assert "listening on" in srv.stdout.readline()
        res = run_job(cluster, [*TRAIN, "--train.steps", "400", "--train.metrics", str(metrics),
                                "--sync.kind", "ps", "--sync.servers", server],
                      nodes=[0, 1], env=job_env(tmp_path, timeout_s, TRAINLIB_PS_TOKEN=TOKEN), timeout_s=180,
                      during=cut)
        after_cut = time.monotonic() - marks["cut"]
    finally:
        cluster.heal(1)
        srv.terminate()
        srv.wait(timeout=10)
    assert res.codes[1] == 138, (res.codes, res.outputs[1][-3000:])
    assert server in res.outputs[1] and "lost a peer" in res.outputs[1], res.outputs[1][-3000:]
    assert res.codes[0] != 0
    assert after_cut <= 2 * timeout_s + SLACK_S, after_cut


def test_outage_then_resume_from_checkpoint(cluster, tmp_path, uninterrupted):
    """A link down for longer than the timeout kills the step; torchrun restarts the workers
    (PET_MAX_RESTARTS, as an elastic/ExitCode-policy job would), they wait for the link, resume from
    the last checkpoint and end on the uninterrupted run's weights."""
    metrics = tmp_path / "m.jsonl"
    ckpt = tmp_path / "ckpt"

    def outage(c, procs):
        wait_for_step(metrics, 9)      # past the checkpoint at step 8
        c.link_down(1)
        time.sleep(10.0)               # > the 6 s timeout: the step fails on both nodes
        c.link_up(1)

    res = run_job(cluster, [*TRAIN, "--train.steps", "24", "--train.metrics", str(metrics),
                            "--checkpoint.dir", str(ckpt), "--checkpoint.every", "4"],
                  nodes=[0, 1], env=job_env(tmp_path, 6), timeout_s=300, during=outage, max_restarts=3)
    assert res.codes == [0, 0], "\n---\n".join(o[-3000:] for o in res.outputs)
    assert res.summary["resumed_from"] is not None
    assert res.summary["weights_sha256"] == uninterrupted["weights_sha256"]


def test_node_dies_before_the_job_starts(cluster, tmp_path):
    """Node 1 dies while the job starts (before or while its agent joins): node 0 must not wait
    torchrun's 600 s for it; it exits 138 within the timeout plus slack."""
    timeout_s = 8.0
    marks = {}

    def kill(c, procs):
        time.sleep(1.5)
        c.kill_node(1)
        marks["kill"] = time.monotonic()

    res = run_job(cluster, [*TRAIN, "--train.steps", "50", "--train.metrics", str(tmp_path / "m.jsonl")],
                  nodes=[0, 1], env=job_env(tmp_path, timeout_s), timeout_s=120, during=kill)
    after_kill = time.monotonic() - marks["kill"]
    assert res.codes[0] == 138, (res.codes, res.outputs[0][-3000:])
    assert after_kill <= timeout_s + SLACK_S, after_kill
