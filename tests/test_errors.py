"""One error hierarchy (trainlib.errors) and one timeout lookup (trainlib.runtime.timeout_s), on real
waits: a collective with a dead peer, a parameter server that never answers, a mismatch caught by
TRAINLIB_DEBUG_COLLECTIVES. The precedence of the lookup's sources, without a process group, is in
tests/test_runtime.py."""
from __future__ import annotations

import os
import time

import pytest
import torch

from trainlib import comm, runtime, trainer
from trainlib.errors import CollectiveError, CollectiveMismatch, CollectiveTimeout
from trainlib.pipeline.runtime import PipelineTimeout
from trainlib.sync.ps.client import PSClient, PSError, PSTimeout
from trainlib.testing import RankError, run_ranks

pytestmark = pytest.mark.timeout(120)

INIT_S, ENV_S, PS_ENV_S = 5.0, 20.0, 11.0
SLACK_S = 4.0   # a loaded 2-core machine, plus the liveness probe that names the lost peer


def test_hierarchy_and_the_trainers_exit_codes():
    assert issubclass(PSTimeout, CollectiveTimeout) and issubclass(PSTimeout, PSError)
    assert issubclass(PipelineTimeout, CollectiveTimeout)
    assert issubclass(CollectiveMismatch, CollectiveError) and not issubclass(CollectiveMismatch, CollectiveTimeout)
    assert comm.CollectiveTimeout is CollectiveTimeout and comm.CollectiveMismatch is CollectiveMismatch
    # the trainer's policy: a mismatch is the program's bug (exit 1), a lost PS a lost peer (exit 138)
    mismatch, ps, pipe = CollectiveMismatch("m"), PSTimeout("p"), PipelineTimeout("t")
    assert isinstance(mismatch, trainer.USER_ERRORS) and not isinstance(mismatch, trainer.LOST_PEER_ERRORS)
    for e in (ps, pipe, CollectiveTimeout("c")):
        assert isinstance(e, trainer.LOST_PEER_ERRORS) and not isinstance(e, trainer.USER_ERRORS), e


def test_silent_parameter_server_is_a_collective_timeout(monkeypatch):
    """Nothing listens at the address: hello() waits out the PS timeout and raises PSTimeout, which an
    `except CollectiveTimeout` (the trainer's lost-peer branch) catches. The client's timeout comes
    from TRAINLIB_PS_TIMEOUT_S through the one lookup when none is passed."""
    monkeypatch.setenv("TRAINLIB_PS_TIMEOUT_S", "1.5")
    client = PSClient([f"127.0.0.1:{runtime.free_port()}"], None, 0, 1)
    assert client.timeout_s == 1.5
    t0 = time.monotonic()
    try:
        with pytest.raises(CollectiveTimeout, match=r"did not answer within 1\.5s") as info:
            client.hello()
    finally:
        client.close()
    assert type(info.value) is PSTimeout
    assert 1.5 <= time.monotonic() - t0 < 1.5 + SLACK_S


def _dead_peer_and_mismatch() -> dict:
    before = [runtime.current(), str(runtime.device()), runtime.timeout_s()]
    with pytest.raises(RuntimeError, match="call tl.init"):
        runtime.get_runtime()
    rt = runtime.init(backend="gloo", device="cpu", timeout_s=INIT_S)
    out = {"before": before, "current_is_rt": runtime.current() is rt and runtime.get_runtime() is rt,
           "device": str(runtime.device()), "timeout": runtime.timeout_s(), "ps_timeout": runtime.timeout_s(ps=True),
           "explicit": runtime.timeout_s(2.0)}
    # a mismatch is not a timeout: `except CollectiveTimeout` lets it through
    os.environ[comm.DEBUG_ENV] = "1"
    try:
        try:
            comm.all_reduce(torch.ones(4 + rt.rank))
        except CollectiveTimeout as e:
            out["mismatch"] = f"caught as a timeout: {e}"
        except CollectiveMismatch as e:
            out["mismatch"] = str(e)
    finally:
        del os.environ[comm.DEBUG_ENV]
    comm.all_reduce(torch.ones(4))   # the debug check failed on both ranks before the real collective
    if rt.rank == 1:                  # alive but absent: a rank that exits would close its sockets at once
        time.sleep(INIT_S + 2.0)      # past rank 0's deadline (an early exit fails the elapsed check)
        return out
    t0 = time.monotonic()
    try:
        comm.all_reduce(torch.ones(4))
    except CollectiveTimeout as e:
        out["elapsed"], out["error"] = time.monotonic() - t0, str(e)
    return out


def test_init_timeout_beats_env_and_a_dead_peer_fails_in_time():
    """TRAINLIB_TIMEOUT_S=20 and TRAINLIB_PS_TIMEOUT_S=11 in the environment, tl.init(timeout_s=5):
    the collectives use 5 s (a dead peer fails rank 0 in ~5 s, naming the collective), the PS 11 s."""
    env = {"TRAINLIB_TIMEOUT_S": str(ENV_S), "TRAINLIB_PS_TIMEOUT_S": str(PS_ENV_S)}
    out = run_ranks(_dead_peer_and_mismatch, 2, env=env, init=False, timeout_s=90)
    assert not any(isinstance(o, RankError) for o in out), out
    for r, o in enumerate(out):
        assert o["before"] == [None, "cpu", ENV_S], o   # before init: env, no runtime, CPU
        assert o["current_is_rt"] and o["device"] == "cpu"
        assert (o["timeout"], o["ps_timeout"], o["explicit"]) == (INIT_S, PS_ENV_S, 2.0)
        assert o["mismatch"].startswith(f"rank {r}: all_reduce[sum] #1 (shape [{4 + r}]"), o["mismatch"]
        assert "does not match the other ranks" in o["mismatch"]
    assert INIT_S - 0.5 <= out[0]["elapsed"] < INIT_S + SLACK_S, out[0]
    assert "rank 0: all_reduce[sum] #3 (shape [4], torch.float32, world) did not complete within 5s" in out[0]["error"]
