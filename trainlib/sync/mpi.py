"""MPI all-reduce through mpi4py, on the memory of CPU tensors (no copies).

Used when the job was started by `mpiexec`: on one node MPICH/Open MPI reduce through shared
memory, which gloo (TCP over loopback) cannot. The sub-communicator mirrors a torch process group
by splitting COMM_WORLD on the group's ranks.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from ..comm import CollectiveTimeout

_NP = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32}


class MPIRequest:
    def __init__(self, req, what: str, comm):
        self.req, self.what, self.comm = req, what, comm

    def wait(self, timeout_s: float | None = None) -> None:
        from ..runtime import _RUNTIME, DEFAULT_TIMEOUT_S

        timeout_s = timeout_s or (_RUNTIME.timeout_s if _RUNTIME else DEFAULT_TIMEOUT_S)
        deadline = time.monotonic() + timeout_s
        # MPI_Wait has no timeout: poll Test() and yield the core between polls
        while not self.req.Test():
            if time.monotonic() > deadline:
                raise CollectiveTimeout(f"rank {self.comm.Get_rank()} (MPI): {self.what} did not complete "
                                        f"within {timeout_s:.0f}s; a peer died or skipped it")
            time.sleep(0)


class MPIGroup:
    """An MPI communicator with the same ranks as a torch.distributed group."""

    _cache: dict[tuple[int, ...], "MPIGroup"] = {}

    def __init__(self, mpi_comm):
        self.comm = mpi_comm
        self._seq = 0

    @classmethod
    def for_process_group(cls, group) -> "MPIGroup":
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None and dist.is_initialized() \
            else tuple(range(world.Get_size()))
        if ranks not in cls._cache:
            # every rank calls Split with the smallest rank of its group as the colour
            cls._cache[ranks] = cls(world.Split(color=min(ranks), key=world.Get_rank()))
        return cls._cache[ranks]

    def iallreduce(self, t: torch.Tensor) -> MPIRequest:
        from mpi4py import MPI

        if t.dtype not in _NP or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"MPI all-reduce needs a contiguous CPU tensor of {list(_NP)}, got {t.dtype} on {t.device}")
        buf = t.numpy()  # shares memory with t
        self._seq += 1
        return MPIRequest(self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
                          f"Iallreduce #{self._seq} ({t.numel()} x {t.dtype})", self.comm)
