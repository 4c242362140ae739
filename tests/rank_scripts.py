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


if __name__ == "__main__":
    {"init": init_and_reduce}[sys.argv[1]]()
