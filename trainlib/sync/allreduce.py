"""Collective all-reduce as a gradient-sync backend (see sync/base.py for the protocol).

Transports:
  torch  torch.distributed through trainlib.comm (nccl on GPU, gloo on CPU), asynchronous work
         handles so buckets reduce while backward goes on;
  mpi    mpi4py Iallreduce on the CPU tensors' own memory (zero-copy), when the job was started by
         mpiexec; MPI's shared-memory transport is far faster than gloo's TCP loopback on one node;
  shm    one node, CPU: the bucket buffers live in shared memory and ranks reduce each other's
         chunks in place (sync/shm.py); a background thread reduces buckets as backward fills them;
  hierarchical  several nodes, CPU, the same number of ranks on each: shm reduce-scatter in the
         node, gloo all-reduce of each owned chunk across nodes, shm all-gather in the node
         (sync/hierarchical.py); the same background thread;
  auto   CPU tensors without compression: mpi when started by mpiexec (and mpi4py imports), else
         shm when all ranks of the group share this node (same host and boot), hierarchical when
         they span nodes with the same number >= 2 on each, else torch.
         GPU tensors or compressed buckets: torch.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .. import comm

log = logging.getLogger("trainlib")

TRANSPORTS = ("auto", "torch", "mpi", "shm", "hierarchical")
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
        layout = None
        if transport == "auto":
            transport, layout = self._auto_transport(on_cpu, group, buckets)
        if transport == "mpi":
            if not on_cpu:
                raise ValueError("transport='mpi' needs CPU tensors; use transport='torch' (nccl) on GPU")
            if self.comm_dtype is not None:
                raise ValueError(f"compress={self.compress!r} is not supported by the MPI transport (MPI has no "
                                 "16-bit float sum); use transport='torch' or compress=None")
            from .mpi import MPIGroup

            self._mpi = MPIGroup.for_process_group(group)
        if transport in ("shm", "hierarchical"):
            if not on_cpu:
                raise ValueError(f"transport={transport!r} needs CPU tensors; use transport='torch' (nccl) on GPU")
            if layout is None:  # explicit choice; auto has checked the same facts already
                layout = self._check_explicit(transport, group, buckets)
            self._bind_shm(buckets, group, layout if transport == "hierarchical" else None)
        self.resolved_transport = transport
        if layout is not None and transport == "hierarchical":
            log.info("AllReduce over hierarchical (shm in the node, gloo across %d nodes), %d buckets",
                     len(layout.nodes), len(buckets))
        else:
            log.debug("AllReduce over %s, %d buckets", transport, len(buckets))

    def _auto_transport(self, on_cpu: bool, group, buckets):
        """(transport, node layout): mpi under mpiexec; shm when every rank of the group is on this
        node; hierarchical when they span nodes with the same number >= 2 on each; else torch.

        The fast paths are CPU-only and sum full-precision buffers (compressed buckets go to torch).
        One all_gather of node facts, so every rank reaches the same decision."""
        if not on_cpu or self.comm_dtype is not None:
            return "torch", None
        if _launched_by_mpi() and _mpi_importable():
            return "mpi", None
        from . import hierarchical, shm

        facts = shm.gather_node_facts(group, _shm_bytes(buckets))
        layout = hierarchical.NodeLayout.from_facts(facts, dist.get_process_group_ranks(group), dist.get_rank())
        if len(layout.nodes) == 1:
            return ("shm", layout) if shm.usable_for(facts) else ("torch", None)
        return ("hierarchical", layout) if hierarchical.auto_picks(layout, facts) else ("torch", None)

    def _check_explicit(self, transport: str, group, buckets):
        from . import hierarchical, shm

        facts = shm.gather_node_facts(group, _shm_bytes(buckets))
        if transport == "shm":
            shm.check_usable(facts)
        layout = hierarchical.NodeLayout.from_facts(facts, dist.get_process_group_ranks(group), dist.get_rank())
        if transport == "hierarchical":
            hierarchical.check_usable(layout, facts)
        return layout

    def _bind_shm(self, buckets, group, layout) -> None:
        """shm (layout None) or hierarchical: move each bucket's wire buffer into shared memory and
        start the background worker that reduces buckets as backward hands them over."""
        from ..runtime import _RUNTIME, DEFAULT_TIMEOUT_S
        from .shm import ShmGroup, ShmWorker

        timeout_s = _RUNTIME.timeout_s if _RUNTIME else DEFAULT_TIMEOUT_S
        if layout is None:
            self._shm = ShmGroup(group, timeout_s)
        else:
            from .hierarchical import build_group

            self._shm = build_group(group, timeout_s, layout)
        for b in buckets:
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
