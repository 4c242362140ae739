"""No silent hangs: a skipped collective, a shape/dtype mismatch or a SIGSTOPped peer makes every
survivor fail within the timeout plus a few seconds, with a message naming rank, collective and
sequence number. Real processes on loopback gloo, TRAINLIB_TIMEOUT_S=3.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from trainlib import comm
from trainlib.testing import RankError, run_ranks

pytestmark = pytest.mark.timeout(90)

TIMEOUT_S = 3
SLACK_S = 4  # "timeout plus a few seconds" on a loaded 2-core machine


def _scenario(mode: str):
    r, w = dist.get_rank(), dist.get_world_size()
    t0 = time.monotonic()
    try:
        x = torch.full((4,), float(r + 1))
        comm.all_reduce(x)  # #1: everyone takes part, and the result is right
        assert x.tolist() == [w * (w + 1) / 2] * 4
        if mode == "skip" and r == w - 1:
            time.sleep(TIMEOUT_S + 1)  # busy elsewhere (a stuck data loader), never joins #2
            return "skipped"
        if mode == "stop" and r == w - 1:
            # frozen by SIGSTOP for twice the timeout; a helper wakes it up so the test ends promptly
            subprocess.Popen(["sh", "-c", f"sleep {2 * TIMEOUT_S}; kill -CONT {os.getpid()}"])
            os.kill(os.getpid(), signal.SIGSTOP)
        n = 4 + (r if mode == "shape" else 0)
        dtype = torch.float64 if mode == "dtype" and r == 1 else torch.float32
        comm.all_reduce(torch.ones(n, dtype=dtype))  # #2
        return "finished"
    except comm.CollectiveError as e:   # a timeout, or (debug check) a mismatch
        raise RuntimeError(f"elapsed={time.monotonic() - t0:.2f}s {type(e).__name__}: {e}") from None


def _failures(out: list, ranks: list[int]) -> dict[int, str]:
    msgs = {}
    for r in ranks:
        assert isinstance(out[r], RankError), f"rank {r} should have failed, got {out[r]!r}"
        msgs[r] = str(out[r])
        m = re.search(r"elapsed=([\d.]+)s", msgs[r])
        assert m, msgs[r]
        assert float(m.group(1)) < TIMEOUT_S + SLACK_S, msgs[r]
    return msgs


def test_skipped_collective_times_out_naming_it():
    out = run_ranks(_scenario, 3, "skip", env={"TRAINLIB_TIMEOUT_S": TIMEOUT_S}, expect_failure=True, timeout_s=60)
    assert out[2] == "skipped"
    for r, msg in _failures(out, [0, 1]).items():
        assert f"rank {r}: all_reduce[sum] #2 (shape [4], torch.float32, world) did not complete within 3s" in msg


def test_sigstopped_peer_survivors_fail_in_time():
    out = run_ranks(_scenario, 3, "stop", env={"TRAINLIB_TIMEOUT_S": TIMEOUT_S}, expect_failure=True, timeout_s=60)
    for r, msg in _failures(out, [0, 1]).items():
        assert f"rank {r}: all_reduce[sum] #2" in msg and "did not complete within 3s" in msg
    assert isinstance(out[2], RankError)  # woken up after its peers gave up: its #2 fails too, and says so
    assert "rank 2: all_reduce[sum] #2" in str(out[2])


def test_shape_mismatch_without_debug_check_fails_every_rank():
    # gloo either times out (every rank names its own #2) or aborts the rank that received too
    # many bytes from its background thread (SIGABRT, gloo's own "collective mismatch" message);
    # every rank that survives to raise names rank, collective and sequence number.
    out = run_ranks(_scenario, 2, "shape", env={"TRAINLIB_TIMEOUT_S": TIMEOUT_S}, expect_failure=True, timeout_s=60)
    aborted = [r for r in (0, 1) if "exited with code -6" in str(out[r])]
    assert len(aborted) < 2, out
    msgs = _failures(out, [r for r in (0, 1) if r not in aborted])
    for r, msg in msgs.items():
        assert f"rank {r}: all_reduce[sum] #2 (shape [{4 + r}], torch.float32, world)" in msg


@pytest.mark.parametrize("mode", ["dtype", "shape"])
def test_mismatch_with_debug_check_names_every_rank(mode):
    env = {"TRAINLIB_TIMEOUT_S": TIMEOUT_S, "TRAINLIB_DEBUG_COLLECTIVES": "1"}
    out = run_ranks(_scenario, 2, mode, env=env, expect_failure=True, timeout_s=60)
    for r, msg in _failures(out, [0, 1]).items():
        assert f"CollectiveMismatch: rank {r}: all_reduce[sum] #2" in msg and "does not match" in msg
        if mode == "dtype":
            assert "rank 0: all_reduce[sum] #2 shape [4] torch.float32; rank 1: all_reduce[sum] #2 shape [4] " \
                   "torch.float64" in msg
        else:
            assert "rank 0: all_reduce[sum] #2 shape [4] torch.float32; rank 1: all_reduce[sum] #2 shape [5]" in msg


_STOP_SCRIPT = """
import os, signal, subprocess, sys, time
import torch
import trainlib as tl
from trainlib import comm
rt = tl.init(backend="gloo", device="cpu")
comm.all_reduce(torch.ones(4))
if rt.rank == rt.world_size - 1:
    subprocess.Popen(["sh", "-c", f"sleep {STOP_S}; kill -CONT {os.getpid()}"])
    os.kill(os.getpid(), signal.SIGSTOP)
print(f"ENTER {time.time()}", flush=True)
comm.all_reduce(torch.ones(4))
"""


def test_sigstopped_peer_real_processes_exit_nonzero():
    """The same as a plain script run by a launcher: survivors' processes exit non-zero in time."""
    from trainlib.runtime import free_port

    port, procs = free_port(), []
    script = _STOP_SCRIPT.replace("STOP_S", str(3 * TIMEOUT_S))
    for r in range(3):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "3", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "TRAINLIB_TIMEOUT_S": str(TIMEOUT_S), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    exited: dict[int, float] = {}
    deadline = time.time() + 75
    while len(exited) < 2 and time.time() < deadline:
        for r in (0, 1):
            if r not in exited and procs[r].poll() is not None:
                exited[r] = time.time()
        time.sleep(0.05)
    for r, p in enumerate(procs):
        if p.poll() is None:
            p.kill()
    outs = [p.communicate(timeout=30) for p in procs]
    for r in (0, 1):
        out, err = outs[r]
        assert r in exited, f"rank {r} did not exit: {err[-2000:]}"
        assert procs[r].returncode != 0
        assert f"rank {r}: all_reduce[sum] #2 (shape [4], torch.float32, world) did not complete within 3s" in err
        # the heartbeats name the lost peer; rank 0 hosts the store here, so rank 1's probe may
        # see it go away when rank 0 exits (then it says so instead)
        assert "Heartbeats" in err and ("rank 2 (" in err and "stopped answering" in err or r == 1), err[-2000:]
        entered = float(re.search(r"ENTER ([\d.]+)", out).group(1))
        assert exited[r] - entered < TIMEOUT_S + SLACK_S, (r, exited[r] - entered)
        print(f"rank {r}: exit {procs[r].returncode} after {exited[r] - entered:.2f}s in #2")
