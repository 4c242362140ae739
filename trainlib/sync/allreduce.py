"""Collective all-reduce as a gradient-sync backend (see sync/base.py for the protocol).

Transports:
  torch  torch.distributed through trainlib.comm (nccl on GPU, gloo on CPU), asynchronous work
         handles so buckets reduce while backward goes on;
  mpi    mpi4py Iallreduce on the CPU tensors' own memory (zero-copy), when the job was started by
         mpiexec; MPI's shared-memory transport is far faster than gloo's TCP loopback on one node;
  shm    one node, CPU: the bucket buffers live in shared memory and ranks reduce each other's
         chunks in place (sync/shm.py); a background thread reduces buckets as backward fills them;
  auto   CPU tensors without compression: mpi when started by mpiexec (and mpi4py imports), else
         shm when all ranks of the group share this node (same host and boot), else torch.
         GPU tensors or compressed buckets: torch.
"""
from __future__ import annotations

import logging

import torch

from .. import comm

log = logging.getLogger("trainlib")

TRANSPORTS = ("auto", "torch", "mpi", "shm")
COMPRESS = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class AllReduce:
    """`tl.AllReduce(bucket_mb=25, compress=None | "bf16" | "fp16", transport="auto")`."""

    reduces_in_backward = True

    def __init__(self, bucket_mb: float = 25.0, compress: str | None = None, transport: str = "auto"):
        if compress not in COMPRESS:
            raise ValueError(f"compress={compress!r} is not one of None, 'bf16', 'fp16'")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r} is not one of {', '.join(TRANSPORTS)}")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb={bucket_mb} must be positive (default 25)")
        self.bucket_mb, self.compress, self.transport = bucket_mb, compress, transport
        self.comm_dtype = COMPRESS[compress]
        self._handles: list = []
        self._group = None
        self._mpi = None
        self._shm = None

    def bind(self, buckets, group) -> None:
        self._group = group
        transport = self.transport
        on_cpu = all(b.comm.device.type == "cpu" for b in buckets)
        if transport == "auto":
            transport = self._auto_transport(on_cpu, group, buckets)
        if transport == "mpi":
            if not on_cpu:
                raise ValueError("transport='mpi' needs CPU tensors; use transport='torch' (nccl) on GPU")
            if self.comm_dtype is not None:
                raise ValueError(f"compress={self.compress!r} is not supported by the MPI transport (MPI has no "
                                 "16-bit float sum); use transport='torch' or compress=None")
            from .mpi import MPIGroup

            self._mpi = MPIGroup.for_process_group(group)
        if transport == "shm":
            if not on_cpu:
                raise ValueError("transport='shm' needs CPU tensors; use transport='torch' (nccl) on GPU")
            if self.transport == "shm":  # auto reached shm through usable_for(), which checked the same facts
                from .shm import check_usable

                check_usable(group, _shm_bytes(buckets))
            self._bind_shm(buckets, group)
        self.resolved_transport = transport
        log.debug("AllReduce over %s, %d buckets", transport, len(buckets))

    def _auto_transport(self, on_cpu: bool, group, buckets) -> str:
        """mpi under mpiexec; shm when every rank of the group is on this node; else torch.

        Both fast paths are CPU-only and sum full-precision buffers (compressed buckets go to torch)."""
        if not on_cpu or self.comm_dtype is not None:
            return "torch"
        if _launched_by_mpi() and _mpi_importable():
            return "mpi"
        from .shm import usable_for

        return "shm" if usable_for(group, _shm_bytes(buckets)) else "torch"

    def _bind_shm(self, buckets, group) -> None:
        from ..runtime import _RUNTIME, DEFAULT_TIMEOUT_S
        from .shm import ShmGroup, ShmWorker

        self._shm = ShmGroup(group, _RUNTIME.timeout_s if _RUNTIME else DEFAULT_TIMEOUT_S)
        for b in buckets:  # move each bucket's wire buffer into shared memory
            new = self._shm.alloc(b.index, b.numel, b.comm.dtype)
            if b.comm is b.grads:
                new.copy_(b.grads)
                b.grads = b.comm = new
                b.attach_views()
            else:
                b.comm = new
        self._shm.map_peers()
        self._worker = ShmWorker(self._shm)

    def start(self, bucket) -> None:
        if self._shm is not None:
            self._handles.append(self._worker.submit(bucket.index))
        elif self._mpi is not None:
            self._handles.append(self._mpi.iallreduce(bucket.comm))
        else:
            self._handles.append(comm.all_reduce(bucket.comm, group=self._group, async_op=True))

    def wait(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.wait()

    def on_forward(self, module) -> None:
        pass

    def close(self) -> None:
        self._handles = []
        if self._shm is not None:
            self._worker.stop()
            self._shm.close()
            self._shm = None


def _launched_by_mpi() -> bool:
    from ..runtime import _RUNTIME

    return _RUNTIME is not None and _RUNTIME.source == "mpi"


def _mpi_importable() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def _shm_bytes(buckets) -> int:
    """What this rank's buckets would occupy in /dev/shm (their wire buffers)."""
    return sum(b.numel * b.comm.element_size() for b in buckets)
