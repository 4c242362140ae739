"""An elastic PyTorchJob loses a node and finishes on fewer: two `trainlib launch` agents with the
variables an elasticPolicy (minReplicas 1, maxReplicas 2) injects, c10d rendezvous on loopback;
the second node is SIGKILLed mid-run (agent and worker: a spot node going away). The surviving
node's worker loses its peer, its agent restarts it, the rendezvous closes with one node, and the
run resumes from the last checkpoint, saved by 2 ranks, as 1 rank (checkpoint/reshard.py)."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.test_launch_e2e import clean_env, summary
from trainlib.runtime import free_port

pytestmark = pytest.mark.timeout(300)

STEPS = 150


def _kill_node(pid: int) -> None:
    """SIGKILL a launcher and everything under it (torch's agent starts its workers in new sessions)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _wait_listening(port: int, timeout_s: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on the rendezvous port {port} after {timeout_s} s")


def _metrics_step(path) -> int:
    try:
        return max((json.loads(ln)["step"] for ln in path.read_text().splitlines() if ln.strip()), default=0)
    except (OSError, ValueError):
        return 0


def test_elastic_job_loses_a_node_and_resumes_on_fewer(tmp_path):
    metrics = tmp_path / "m.jsonl"
    port = free_port()
    env = {"PET_RDZV_ENDPOINT": f"localhost:{port}", "PET_RDZV_BACKEND": "c10d", "PET_NNODES": "1:2",
           "PET_MAX_RESTARTS": "3", "PET_RDZV_ID": "elastic", "PET_NPROC_PER_NODE": "1",
           # heartbeats every second, a node silent for 5 s is gone (torch's default is 5 s x 3 attempts: the
           # survivor's next round waited 15 s for the dead node to expire before its 8 s last call)
           "PET_RDZV_CONF": "last_call_timeout=8,join_timeout=90,keep_alive_interval=1,keep_alive_max_attempt=5",
           "TRAINLIB_TIMEOUT_S": "10",
           "TRAINLIB_NO_PROGRESS": "1"}
    train = ["trainlib", "launch", "--", "trainlib", "train", "--model.n_layer", "2", "--model.d_model", "64",
             "--model.n_head", "2", "--model.seq_len", "64", "--train.batch_size", "8", "--train.corpus_bytes",
             "65536", "--train.steps", str(STEPS), "--train.log_every", "1", "--checkpoint.dir", str(tmp_path / "ck"),
             "--checkpoint.every", "10", "--train.metrics", str(metrics)]
    err_path = tmp_path / "survivor.err"
    survivor = subprocess.Popen(train, env=clean_env(tmp_path, **env), cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=open(err_path, "w"), text=True)
    _wait_listening(port)  # the survivor hosts the rendezvous store; the other joins its first round (last call 8 s)
    doomed = subprocess.Popen(train, env=clean_env(tmp_path, **env), cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _metrics_step(metrics) < 25 and time.monotonic() < deadline and survivor.poll() is None:
            time.sleep(0.1)
        assert 25 <= _metrics_step(metrics) < STEPS - 30, \
            f"the 2-node job is at step {_metrics_step(metrics)}: {err_path.read_text()[-3000:]}"
        _kill_node(doomed.pid)   # the node is gone: agent and workers at once
        out, _ = survivor.communicate(timeout=240)
        err = err_path.read_text()
    finally:
        for p in (survivor, doomed):
            if p.poll() is None:
                p.kill()
        _kill_node(doomed.pid)
    assert survivor.returncode == 0, err[-4000:]
    s = summary(out)
    assert s["steps"] == STEPS and s["world_size"] == 1, s
    assert s["resumed_from"] is not None and s["resumed_from"] >= 20, s
    assert "saved as (pp=1, dp=2, tp=1, shard=none) as (pp=1, dp=1, tp=1, shard=none)" in err, err[-4000:]
