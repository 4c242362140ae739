"""A collective timeout names the peer it lost, from the heartbeats in the job's store.

Real ranks on loopback gloo, TRAINLIB_TIMEOUT_S=3 (heartbeat every 0.5 s): a SIGSTOPped rank is
named "stopped answering" with its host and address; a rank that is alive but skipped the
collective is named as such, not as dead; a store that does not answer is said so within the
read deadline; shutdown stops the heartbeat and leaves an "exited" beat.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
import torch
import torch.distributed as dist

from trainlib import comm, liveness
from trainlib.testing import run_ranks

pytestmark = pytest.mark.timeout(90)

TIMEOUT_S = 3
SLACK_S = 4          # "timeout plus a few seconds" on a loaded 2-core machine (the probe takes ~1.3 s of it)
ENV = {"TRAINLIB_TIMEOUT_S": TIMEOUT_S}
HOST = socket.gethostname()


def _wake_later(seconds: float) -> None:
    subprocess.Popen(["sh", "-c", f"sleep {seconds}; kill -CONT {os.getpid()}"])


def _linger_if_store_host(rank: int) -> None:
    # rank 0 hosts the store here (under torchrun, the agent does and outlives the workers): stay a
    # moment so the other survivor's probe is not cut short by this process exiting
    if rank == 0:
        time.sleep(1.0)


def _stop_mid_collective():
    r = dist.get_rank()
    comm.all_reduce(torch.ones(4))                       # #1, everyone
    if r == 2:
        h = comm.all_reduce(torch.ones(4), async_op=True)   # enters #2 alone: it cannot complete
        time.sleep(2 * liveness.interval_s(TIMEOUT_S))      # a heartbeat says "inside #2"
        _wake_later(2 * TIMEOUT_S)
        os.kill(os.getpid(), signal.SIGSTOP)
        h.wait()
        return "woke"
    time.sleep(1.5)                                      # rank 2 is frozen by the time we enter #2
    t0 = time.monotonic()
    try:
        comm.all_reduce(torch.ones(4))
    except comm.CollectiveTimeout as e:
        msg = f"elapsed={time.monotonic() - t0:.2f}s {e}"
        _linger_if_store_host(r)
        return msg
    return "completed?"


def test_sigstopped_rank_is_named_with_its_host():
    out = run_ranks(_stop_mid_collective, 3, env=ENV, expect_failure=True, timeout_s=60)
    for r in (0, 1):
        msg = out[r]
        assert isinstance(msg, str) and msg.startswith("elapsed="), msg
        assert float(re.match(r"elapsed=([\d.]+)s", msg).group(1)) < TIMEOUT_S + SLACK_S, msg
        assert f"rank {r}: all_reduce[sum] #2" in msg and "did not complete within 3s" in msg
        assert f"rank 2 ({HOST}, 127.0.0.1) stopped answering" in msg, msg
        assert "when it was inside all_reduce[sum] #2" in msg, msg
        other = 1 - r
        assert f"rank {other} ({HOST}, 127.0.0.1) stopped" not in msg, msg   # the other survivor is not blamed


def _skip_collective():
    r = dist.get_rank()
    comm.all_reduce(torch.ones(4))                       # #1
    if r == 2:
        time.sleep(TIMEOUT_S + 4)                        # alive (a stuck data loader), never joins #2
        return "skipped"
    t0 = time.monotonic()
    try:
        comm.all_reduce(torch.ones(4))                   # #2
    except comm.CollectiveTimeout as e:
        msg = f"elapsed={time.monotonic() - t0:.2f}s {e}"
        _linger_if_store_host(r)
        return msg
    return "completed?"


def test_alive_rank_that_skipped_is_not_called_dead():
    out = run_ranks(_skip_collective, 3, env=ENV, expect_failure=True, timeout_s=60)
    assert out[2] == "skipped"
    for r in (0, 1):
        msg = out[r]
        assert float(re.match(r"elapsed=([\d.]+)s", msg).group(1)) < TIMEOUT_S + SLACK_S, msg
        assert f"rank 2 ({HOST}, 127.0.0.1) is alive but has not entered #2" in msg, msg
        assert "past all_reduce[sum] #1, in no collective" in msg
        assert "stopped answering" not in msg, msg
        # the other survivor waits in #2 too, or has already given up (exited while inside #2)
        assert (f"alive and waiting in it too: ranks [{1 - r}]" in msg
                or f"rank {1 - r} ({HOST}, 127.0.0.1) has exited; it was inside all_reduce[sum] #2" in msg), msg


def _recv_from_a_busy_peer():
    r = dist.get_rank()
    comm.all_reduce(torch.ones(4))                       # #1
    if r == 1:
        time.sleep(TIMEOUT_S + 2)                        # never sends
        return "busy"
    t0 = time.monotonic()
    try:
        comm.recv(torch.empty(4), src=1)
    except comm.CollectiveTimeout as e:
        return f"elapsed={time.monotonic() - t0:.2f}s {e}"
    return "received?"


def test_point_to_point_timeout_names_its_one_peer():
    # a recv's peer is alive but elsewhere: said so, in about H, and nobody else is probed
    out = run_ranks(_recv_from_a_busy_peer, 2, env=ENV, expect_failure=True, timeout_s=60)
    msg = out[0]
    assert float(re.match(r"elapsed=([\d.]+)s", msg).group(1)) < TIMEOUT_S + SLACK_S, msg
    assert "rank 0: recv[from=1] #2" in msg, msg
    assert f"rank 1 ({HOST}, 127.0.0.1) is alive, past all_reduce[sum] #1, in no collective" in msg, msg


def _store_host_stops():
    r = dist.get_rank()
    comm.all_reduce(torch.ones(4))
    if r == 0:                                           # the store lives in this process
        _wake_later(2 * TIMEOUT_S + 1)
        os.kill(os.getpid(), signal.SIGSTOP)
        return "woke"
    t0 = time.monotonic()
    try:
        comm.all_reduce(torch.ones(4))
    except comm.CollectiveTimeout as e:
        return f"elapsed={time.monotonic() - t0:.2f}s {e}"
    return "completed?"


def test_silent_store_is_reported_within_the_read_deadline():
    out = run_ranks(_store_host_stops, 2, env=ENV, expect_failure=True, timeout_s=60)
    msg = out[1]
    assert isinstance(msg, str), msg
    elapsed = float(re.match(r"elapsed=([\d.]+)s", msg).group(1))
    assert elapsed < TIMEOUT_S + liveness.READ_DEADLINE_S + 1.5, msg
    assert re.search(r"the job's store at 127\.0\.0\.1:\d+ did not answer either \(no answer within 2 s\): "
                     r"this node may be cut off from node 0", msg), msg


def _healthy_then_shutdown():
    from trainlib import runtime

    r = dist.get_rank()
    comm.all_reduce(torch.ones(4))
    t0 = time.monotonic()
    probe = comm.probe_peers()          # everyone alive, nobody inside a collective: no suspects
    took = time.monotonic() - t0
    assert probe is not None and probe.store_answered, probe
    assert probe.suspects == [] and probe.alive == [1 - r], probe.describe()
    assert took < 2 * liveness.interval_s(TIMEOUT_S) + 1.0, took   # stops as soon as the peer advances
    beat = probe.beats[1 - r]
    assert (beat.host, beat.addr, beat.seq, beat.pending_seq) == (HOST, "127.0.0.1", 1, None)
    comm.barrier()
    if r == 1:
        runtime.shutdown()
        assert not [t for t in threading.enumerate() if t.name == "trainlib-heartbeat"]
        return "down"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:     # rank 1's last beat says it exited
        p = comm.probe_peers([0, 1], seq=3)
        if p.suspects and p.suspects[0].kind == "exited":
            return p.suspects[0].describe()
        time.sleep(0.2)
    return "rank 1 never said it exited"


def test_probe_of_a_healthy_group_and_exit_at_shutdown():
    out = run_ranks(_healthy_then_shutdown, 2, env=ENV, timeout_s=60)
    assert out[1] == "down"
    assert out[0].startswith(f"rank 1 ({HOST}, 127.0.0.1) has exited; it was past all_reduce[sum] #2"), out[0]


def test_beat_round_trip_and_garbage():
    b = liveness.Beat("1-2", 3, "node1", "10.0.0.2", 0.5, 1.0, 36, "all_reduce[sum]", 36, "all_reduce[sum]")
    assert liveness.Beat.decode(b.encode()) == b
    assert len(b.encode()) < 300            # one small store set per period
    for raw in (None, b"", b"not json", b'{"beat": 1}', b"x" * (liveness.MAX_VALUE_BYTES + 1)):
        assert liveness.Beat.decode(raw) is None
    assert [liveness.interval_s(t) for t in (1, 3, 8, 16, 300)] == [0.5, 0.5, 1.0, 2.0, 2.0]


def test_no_heartbeat_no_probe():
    # this pytest process runs no heartbeat (no tl.init()): nothing to read, and it says so at once
    assert liveness.probe([0, 1], 0, 1) is None


class _SlowStore:
    """A real HashStore whose sets take `delay_s` once asked to: a loaded machine's slow store call."""

    def __init__(self, delay_s: float):
        self.inner, self.delay_s, self.slow = dist.HashStore(), delay_s, False

    def set(self, key: str, value: bytes) -> None:
        if self.slow:
            time.sleep(self.delay_s)
        self.inner.set(key, value)


def test_stop_waits_for_the_last_beat_of_a_slow_store():
    # A heartbeat thread still inside a store call when the interpreter finalizes aborts the process
    # (pthread_exit through pybind11's noexcept guard): stop() must outwait one call, here 1.5 s,
    # longer than the 1 s it used to give up after.
    store = _SlowStore(1.5)
    progress = lambda: {"seq": 0, "op": None, "pending_seq": None, "pending_op": None}   # noqa: E731
    hb = liveness.Heartbeat(0, 0.5, lambda t: store, "a slow store", progress, None, "test/hb")
    hb.start()
    assert liveness.Beat.decode(store.inner.get(hb.key(0))).state == "alive"
    store.slow = True
    t0 = time.monotonic()
    hb.stop()
    assert not hb._thread.is_alive(), f"stop() returned after {time.monotonic() - t0:.2f} s with the beat in flight"
    assert liveness.Beat.decode(store.inner.get(hb.key(0))).state == "exited"
    assert hb.store_timeout_s + 2.0 > time.monotonic() - t0 >= 1.5
