"""Tiny programs run as real subprocesses (under torchrun, mpiexec or a hand-made env) by the tests.

    python -m tests.rank_scripts init     -> prints one JSON line: the Runtime and an all-reduce result
"""
import json
import sys

import torch


def init_and_reduce() -> None:
    import trainlib as tl
    from trainlib import comm

    rt = tl.init()
    again = tl.init()
    t = torch.tensor([float(rt.rank + 1)])
    comm.all_reduce(t)
    sys.stdout.write(json.dumps({"rank": rt.rank, "world_size": rt.world_size, "local_rank": rt.local_rank,
                      "backend": rt.backend, "device": str(rt.device), "source": rt.source,
                      "timeout_s": rt.timeout_s, "sum": t.item(), "idempotent": again is rt}) + "\n")  # one write: no interleaving
    sys.stdout.flush()


def dp_over_mpi() -> None:
    """Under mpiexec: tl.DataParallel with the MPI transport vs torch DDP (gloo) on the same batches."""
    import torch.nn as nn

    import trainlib as tl

    rt = tl.init()
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    ours = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    ours.load_state_dict(ref.state_dict())
    ddp = nn.parallel.DistributedDataParallel(ref)
    dp = tl.DataParallel(ours, sync=tl.AllReduce(transport="auto", bucket_mb=0.01))
    worst = 0.0
    for step in range(3):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(10 * step + rt.rank))
        for m in (ddp, dp):
            m(x).pow(2).mean().backward()
        worst = max(worst, max((a.grad - b.grad).abs().max().item() for a, b in zip(ref.parameters(), ours.parameters())))
        for m in (ref, ours):
            m.zero_grad(set_to_none=True)
    sys.stdout.write(json.dumps({"rank": rt.rank, "source": rt.source, "transport": dp.sync.resolved_transport,
                                 "diff": worst}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    {"init": init_and_reduce, "dp_mpi": dp_over_mpi}[sys.argv[1]]()
