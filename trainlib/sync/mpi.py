"""MPI all-reduce, reduce-scatter and all-gather through mpi4py, on the memory of CPU tensors (no copies).

Used when the job was started by `mpiexec`: on one node MPICH/Open MPI reduce through shared
memory, which gloo (TCP over loopback) cannot. The sub-communicator mirrors a torch process group
by splitting COMM_WORLD on the group's ranks.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .. import runtime
from ..comm import CollectiveTimeout

# torch dtype -> MPI datatype name (MPI has no 16-bit float sum; 16-bit floats move as INT16_T)
_MPI_TYPES = {torch.float32: "FLOAT", torch.float64: "DOUBLE", torch.int64: "INT64_T", torch.int32: "INT32_T",
              torch.int16: "INT16_T"}


class MPIRequest:
    def __init__(self, req, what: str, comm, after=None, tensor: torch.Tensor | None = None):
        # tensor: keeps the memory MPI reads and writes alive until the request completes
        self.req, self.what, self.comm, self._after, self._tensor = req, what, comm, after, tensor

    def wait(self, timeout_s: float | None = None) -> None:
        timeout_s = runtime.timeout_s(timeout_s)
        deadline = time.monotonic() + timeout_s
        # MPI_Wait has no timeout: poll Test() and yield the core between polls
        while not self.req.Test():
            if time.monotonic() > deadline:
                raise CollectiveTimeout(f"rank {self.comm.Get_rank()} (MPI): {self.what} did not complete "
                                        f"within {timeout_s:.0f}s; a peer died or skipped it")
            time.sleep(0)
        if self._after is not None:
            self._after()
            self._after = None
        self._tensor = None


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

        buf = _buffer(t, "all-reduce")
        self._seq += 1
        return MPIRequest(self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
                          f"Iallreduce #{self._seq} ({t.numel()} x {t.dtype})", self.comm, tensor=t)

    def ireduce_scatter(self, flat: torch.Tensor) -> MPIRequest:
        """flat.view(n, -1)[r] := the sum over the communicator of that chunk (r: this rank); other
        chunks unspecified. MPI_IN_PLACE leaves the result in the first chunk (the standard's rule
        for Reduce_scatter_block), so wait() moves it to chunk r."""
        from mpi4py import MPI

        if flat.dtype in (torch.float16, torch.bfloat16):
            raise ValueError(f"MPI reduce-scatter of {flat.dtype}: MPI has no 16-bit float sum; use "
                             "transport='torch' or a float32 reduce dtype (MixedPrecision(reduce_dtype=torch.float32))")
        buf = _buffer(flat, "reduce-scatter")
        n, r = self.comm.Get_size(), self.comm.Get_rank()
        rows = flat.view(n, -1)
        after = (lambda: rows[r].copy_(rows[0])) if r else None  # noqa: E731  (disjoint rows: no overlap)
        self._seq += 1
        return MPIRequest(self.comm.Ireduce_scatter_block(MPI.IN_PLACE, buf, op=MPI.SUM),
                          f"Ireduce_scatter_block #{self._seq} ({flat.numel()} x {flat.dtype})", self.comm, after, flat)

    def iallgather(self, flat: torch.Tensor) -> MPIRequest:
        """flat.view(n, -1)[k] := rank k's chunk, for every k (in place: no arithmetic, so any dtype)."""
        from mpi4py import MPI

        # a byte-for-byte move: 16-bit floats travel as int16
        t = flat.view(torch.int16) if flat.dtype in (torch.float16, torch.bfloat16) else flat
        buf = _buffer(t, "all-gather")
        self._seq += 1
        return MPIRequest(self.comm.Iallgather(MPI.IN_PLACE, buf),
                          f"Iallgather #{self._seq} ({flat.numel()} x {flat.dtype})", self.comm, tensor=flat)


def _buffer(t: torch.Tensor, what: str) -> list:
    """[memory, datatype] over `t`'s own bytes for mpi4py. Not t.numpy(): exporting a storage to numpy
    makes it non-resizable for good, and ZeRO-3 frees gathered buffers with untyped_storage().resize_(0)."""
    from mpi4py import MPI

    if t.dtype not in _MPI_TYPES or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"MPI {what} needs a contiguous CPU tensor of {list(_MPI_TYPES)}, got {t.dtype} on "
                         f"{t.device} (contiguous: {t.is_contiguous()})")
    mem = (getattr(MPI, "buffer", None) or MPI.memory).fromaddress(t.data_ptr(), t.numel() * t.element_size())
    return [mem, getattr(MPI, _MPI_TYPES[t.dtype])]
