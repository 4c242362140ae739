"""Parameter-server faults and async semantics on real processes: a server killed with SIGKILL, a worker
that disappears (sync: named in the others' error; async: the others go on), the SSP staleness bound
measured by the server, and async server state saved and restored across a server restart."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

import trainlib as tl
from trainlib.sync.ps.client import PSClient
from trainlib.sync.ps.launch import spawn_server
from trainlib.sync.ps.protocol import DType, Op
from tests.ps_helpers import server_stats
from trainlib.testing import RankError, run_ranks

TOKEN = "faults-test-token-0123456789"
PS_TIMEOUT_S = 5.0


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))


def _step(model: nn.Module, opt, step: int, rank: int) -> float:
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(16, 8, generator=g)
    opt.zero_grad(set_to_none=True)
    loss = (model(x) - x[:, :4].sin()).pow(2).mean()
    loss.backward()
    opt.step()
    return loss.item()


def _spawn(n: int, **kw) -> list:
    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(lambda _: spawn_server(token=TOKEN, **kw), range(n)))


# -- sync faults ------------------------------------------------------------------------------
def sync_until_fault(servers: list[str], fault: str, server_pid: int) -> dict:
    rt = tl.init()
    model = tl.DataParallel(_mlp(), sync=tl.ParameterServer(servers=servers, token=TOKEN, timeout_s=PS_TIMEOUT_S,
                                                            partition_mb=0.001))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(10):
        if step == 2 and rt.rank == 1 and fault == "worker":
            os._exit(3)  # vanish without a word
        if step == 2 and rt.rank == 0 and fault == "server":
            os.kill(server_pid, signal.SIGKILL)
        t0 = time.monotonic()
        try:
            _step(model, opt, step, rt.rank)
        except Exception as e:
            return {"step": step, "error": f"{type(e).__name__}: {e}", "elapsed": time.monotonic() - t0}
    return {"step": 10, "error": None}


def test_killed_server_gives_a_clear_error_within_the_timeout():
    servers = _spawn(2)
    try:
        t0 = time.monotonic()
        results = run_ranks(sync_until_fault, 2, [s.address for s in servers], "server", servers[1].proc.pid,
                            timeout_s=60)
        assert time.monotonic() - t0 < 45
    finally:
        for s in servers:
            s.stop()
    for r in results:
        # the dropped connection is noticed at once; at worst the timeout plus a 2 s status query.
        # Rank 1 may still be collecting step 1 when rank 0, already done with it, kills the server.
        assert r["step"] in (1, 2) and r["elapsed"] < PS_TIMEOUT_S + 3, r
        assert f"parameter server {servers[1].address}" in r["error"], r


def test_vanished_worker_is_named_in_sync_mode():
    servers = _spawn(2)
    try:
        results = run_ranks(sync_until_fault, 2, [s.address for s in servers], "worker", 0, timeout_s=60,
                            expect_failure=True)
    finally:
        for s in servers:
            s.stop()
    assert isinstance(results[1], RankError)
    r = results[0]
    assert r["step"] == 2 and r["elapsed"] < PS_TIMEOUT_S + 3, r  # the timeout plus one status query
    assert "waiting for worker 1 (rank 1)" in r["error"], r


# -- async ------------------------------------------------------------------------------------
def async_phases(addr_tau2: str, addr_tau0: str, addr_dies: str, steps: int = 8) -> dict:
    rt = tl.init()
    out: dict = {}
    for name, addr, tau in (("tau2", addr_tau2, 2), ("tau0", addr_tau0, 0)):
        model = tl.DataParallel(_mlp(), sync=tl.ParameterServer(servers=[addr], token=TOKEN, mode="async",
                                                                staleness=tau, timeout_s=30, partition_mb=0.0005))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = []
        for step in range(steps):
            if rt.rank == 1:
                time.sleep(0.15)  # the slow worker: the fast one runs ahead up to the bound
            losses.append(_step(model, opt, step, rt.rank))
        model.sync.sync_params()
        # a reply whose MAC fails is dropped and counted: zero means no reply was corrupted in flight
        out[name] = {"clock": model.sync.clock, "losses": losses, "dropped_replies": model.sync.client.dropped}
        model.close()
    # a worker that vanishes: the other one goes on once the server presumes it gone
    ps = tl.ParameterServer(servers=[addr_dies], token=TOKEN, mode="async", staleness=1, timeout_s=30,
                            partition_mb=0.0005)
    model = tl.DataParallel(_mlp(), sync=ps)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(6):
        if step == 2 and rt.rank == 1:
            os._exit(3)
        _step(model, opt, step, rt.rank)
    ps.sync_params()
    out["dies"] = {"clock": ps.clock, "saved": ps.save_server_state(),
                   "params": {p.key: ps._base[p.bucket][p.offset: p.offset + p.numel].clone() for p in ps.partitions}}
    model.close()
    return out


def test_async_staleness_bound_vanished_worker_and_state_restore(tmp_path):
    servers = _spawn(2) + [spawn_server(token=TOKEN, state_dir=str(tmp_path), extra=("--worker-timeout", "2"))]
    try:
        results = run_ranks(async_phases, 2, *[s.address for s in servers], timeout_s=120, expect_failure=True)
        assert isinstance(results[1], RankError)  # rank 1 vanished in the last phase
        r = results[0]
        tau2, tau0 = server_stats(servers[0].address, TOKEN), server_stats(servers[1].address, TOKEN)
        # SSP: a read at clock c is granted only when the slowest worker is at >= c - staleness
        assert 1 <= tau2["max_lead"] <= 2, tau2
        assert tau2["max_spread"] <= 3, tau2
        assert tau0["max_lead"] == 0 and tau0["max_spread"] <= 1, tau0
        assert r["tau2"]["clock"] == r["tau0"]["clock"] == 8
        assert r["tau2"]["dropped_replies"] == r["tau0"]["dropped_replies"] == 0
        assert r["dies"]["clock"] == 6 and r["dies"]["saved"]
        old = servers.pop()
        old.stop()
        servers.append(spawn_server(token=TOKEN, state_dir=str(tmp_path)))  # a new process restores the state
        c = PSClient([servers[-1].address], TOKEN, worker=0, nworkers=2, timeout_s=10)
        c.hello()
        restored: dict[int, torch.Tensor] = {}
        reqs = [c.submit(0, Op.PULL, key, 6, b"", DType.FLOAT32, arg=1 << 20) for key in r["dies"]["params"]]
        c.collect(reqs, lambda q, h, p: restored.__setitem__(q.key, torch.frombuffer(bytearray(p),
                                                                                      dtype=torch.float32)))
        c.close()
        assert restored.keys() == r["dies"]["params"].keys()
        for key, want in r["dies"]["params"].items():
            assert torch.equal(restored[key], want), key
    finally:
        for s in servers:
            s.stop()
