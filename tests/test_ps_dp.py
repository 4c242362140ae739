"""Parameter server through tl.DataParallel on real processes and sockets (issue 4).

One group of 2 gloo workers and 2 `trainlib ps-server` subprocesses checks, side by side:
  sync PS gradients == all-reduce gradients (within 1e-6), dedicated and colocated servers;
  async with staleness 0 == sync (same parameters after the same SGD steps), with rank 1 slowed so that
  rank 0 would read ahead if the servers did not hold it back: their largest granted lead must be 0.
"""
from __future__ import annotations

import time

import torch

import trainlib as tl
from tests.dp_models import AwkwardNet, _batch, _max_grad_diff
from trainlib.sync.ps.launch import spawn_server
from tests.ps_helpers import server_stats
from trainlib.testing import run_ranks

TOKEN = "test-token-0123456789abcdef"


def _max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((pa.double() - pb.double()).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def ps_versus_allreduce(servers: list[str], steps: int = 3) -> dict:
    """Same model, same batches: AllReduce, dedicated PS (2 servers), colocated PS, async PS (staleness 0)."""
    tl.init()
    torch.manual_seed(0)
    nets = [AwkwardNet() for _ in range(4)]
    for n in nets[1:]:
        n.load_state_dict(nets[0].state_dict())
    small = dict(bucket_mb=0.002, partition_mb=0.0005)  # several buckets and partitions, on both servers
    ar = tl.DataParallel(nets[0], sync=tl.AllReduce(bucket_mb=0.002))
    ps = tl.DataParallel(nets[1], sync=tl.ParameterServer(servers=servers, token=TOKEN, timeout_s=30, **small))
    colo = tl.DataParallel(nets[2], sync=tl.ParameterServer(timeout_s=30, **small))
    asy = tl.DataParallel(nets[3], sync=tl.ParameterServer(servers=servers, token=TOKEN, mode="async", staleness=0,
                                                           timeout_s=30, **small))
    models = [ar, ps, colo, asy]
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in models]
    rank = torch.distributed.get_rank()
    worst = {"ps": 0.0, "colocated": 0.0}
    for step in range(steps):
        x, y = _batch(step, rank)
        for m, opt in zip(models, opts):
            if m is asy and rank == 1:
                time.sleep(0.05)  # rank 0 reaches the async read first: only the SSP bound makes it wait
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x, use_branch=step % 2 == 0), y).backward()
        worst["ps"] = max(worst["ps"], _max_grad_diff(nets[0], nets[1]))
        worst["colocated"] = max(worst["colocated"], _max_grad_diff(nets[0], nets[2]))
        for opt in opts:
            opt.step()
    asy.sync.sync_params()  # push the last local step
    dropped = sum(m.sync.client.dropped for m in models[1:])  # replies failing their MAC: must be none
    out = {"grad_diff": worst, "async_vs_sync_params": _max_param_diff(nets[1], nets[3]),
           "sync_vs_ar_params": _max_param_diff(nets[0], nets[1]),
           "n_partitions": len(ps.sync.partitions), "servers_used": sorted({p.server for p in ps.sync.partitions}),
           "n_buckets": len(ps.buckets), "dropped_replies": dropped, "colocated_servers": colo.sync.client and
           [link.address for link in colo.sync.client.links]}
    for m in models:
        m.close()
    return out


def test_sync_ps_matches_allreduce_and_async_tau0_matches_sync():
    servers = [spawn_server(token=TOKEN) for _ in range(2)]
    try:
        results = run_ranks(ps_versus_allreduce, 2, [s.address for s in servers], timeout_s=120)
        # only async reads move max_lead, so these are the staleness-0 model's: SSP says <= 0
        stats = [server_stats(s.address, TOKEN) for s in servers]
    finally:
        for s in servers:
            s.stop()
    for r in results:
        assert r["n_buckets"] > 1 and r["n_partitions"] > r["n_buckets"], r
        assert r["servers_used"] == [0, 1] and r["dropped_replies"] == 0, r
        assert r["grad_diff"]["ps"] <= 1e-6, r
        assert r["grad_diff"]["colocated"] <= 1e-6, r
        assert r["sync_vs_ar_params"] <= 1e-6, r
        assert r["async_vs_sync_params"] <= 1e-5, r
        assert len(r["colocated_servers"]) == 1 and r["colocated_servers"][0].startswith("127.0.0.1:"), r
    for st in stats:
        assert st["max_lead"] == 0 and st["max_spread"] <= 1, st
