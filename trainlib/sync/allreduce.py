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

Every transport also reduce-scatters and all-gathers flat buffers in place, for sharded data
parallel (start_reduce_scatter / start_all_gather; sync/base.py ShardSync): torch through
comm.reduce_scatter_tensor / all_gather_into_tensor, mpi through Ireduce_scatter_block / Iallgather,
shm and hierarchical as the two halves of their all-reduce (on buffers from alloc(); any other
tensor goes through torch for that call).
"""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from .. import comm, runtime
from ..compression import COMPRESS
from ..observe import step_stats

log = logging.getLogger("trainlib")

TRANSPORTS = ("auto", "torch", "mpi", "shm", "hierarchical")


class AllReduce:
    """`tl.AllReduce(bucket_mb=25, compress=None | "bf16" | "fp16", transport="auto")`.

    Unsharded data parallel: bind(buckets, group), start(bucket), wait(). Sharded data parallel
    (sync/base.py, ShardSync): bind_group(group), alloc(numel, dtype, device) for every flat buffer,
    then start_reduce_scatter(flat) / start_all_gather(flat) and wait(), on the chunks flat.view(dp, -1)."""

    reduces_in_backward = True

    def __init__(self, bucket_mb: float = 25.0, compress: str | None = None, transport: str = "auto"):
        if compress is not None and compress not in COMPRESS:
            raise ValueError(f"compress={compress!r} is not one of None, {', '.join(map(repr, COMPRESS))}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r} is not one of {', '.join(TRANSPORTS)}")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb={bucket_mb} must be positive (default 25)")
        self.bucket_mb, self.compress, self.transport = bucket_mb, compress, transport
        self.comm_dtype = COMPRESS["none" if compress is None else compress]
        self.resolved_transport: str | None = None
        self._handles: list = []
        self._group = None
        self._dp, self._dp_index = 1, 0
        self._mpi = None
        self._shm = None
        self._worker = None
        self._shm_keys: dict[int, int] = {}  # data_ptr of a buffer from alloc() -> its ShmGroup key
        self._fallback_logged = False

    # ---- set-up --------------------------------------------------------------------------
    def bind(self, buckets, group) -> None:
        """Unsharded data parallel, after bind_group() and buckets built from alloc(): nothing to move.
        (Called without bind_group(), for buckets made elsewhere: choose the transport now and move
        each bucket's wire buffer into this transport's memory.)"""
        if self.resolved_transport is not None:
            self._check_bound(buckets)
            return
        on_cpu = all(b.comm.device.type == "cpu" for b in buckets)
        self.bind_group(group, device=torch.device("cpu" if on_cpu else buckets[0].comm.device.type),
                        need_bytes=_shm_bytes(buckets), n_buffers=len(buckets))
        if self._shm is None:
            return
        for b in buckets:
            new = self._alloc_shm(b.numel, b.comm.dtype)
            if b.comm is b.grads:
                new.copy_(b.grads)
                b.grads = b.comm = new
                b.attach_views()
            else:
                b.comm = new
        self._shm.map_peers()

    def _check_bound(self, buckets) -> None:
        if self._shm is not None and not all(self._shm_key(b.comm, log_fallback=False) is not None for b in buckets):
            raise ValueError(f"AllReduce({self.resolved_transport}): a bucket's wire buffer is not from alloc(); "
                             "build the buckets with build_buckets(..., alloc=sync.alloc) after bind_group()")

    def bind_group(self, group, device: torch.device | None = None, need_bytes: int = 0, n_buffers: int = 0,
                   reduce_dtype: torch.dtype | None = None) -> None:
        """Choose the transport for `group` (the dp group; collective over it) and set it up.

        device: where the flat buffers will live (default: tl.init()'s device); need_bytes: what this
        rank will alloc() in all, for the /dev/shm capacity check of the shm transports (0: unknown);
        reduce_dtype: the dtype reduce-scatter will sum in, if known: transport='auto' does not pick
        MPI for a 16-bit float (MPI cannot sum it)."""
        self._group = group
        self._dp, self._dp_index = dist.get_world_size(group), dist.get_rank(group)
        on_cpu = (device if device is not None else runtime.device()).type == "cpu"
        transport, layout = self.transport, None
        if transport == "auto":
            mpi_ok = reduce_dtype not in (torch.float16, torch.bfloat16)
            transport, layout = self._auto_transport(on_cpu, group, need_bytes, mpi_ok)
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
                layout = self._check_explicit(transport, group, need_bytes)
            self._start_shm(group, layout if transport == "hierarchical" else None)
        self.resolved_transport = transport
        if layout is not None and transport == "hierarchical":
            log.info("AllReduce over hierarchical (shm in the node, gloo across %d nodes), %d buffers",
                     len(layout.nodes), n_buffers)
        else:
            log.debug("AllReduce over %s, %d buffers", transport, n_buffers)

    def _auto_transport(self, on_cpu: bool, group, need_bytes: int, mpi_ok: bool = True):
        """(transport, node layout): mpi under mpiexec; shm when every rank of the group is on this
        node; hierarchical when they span nodes with the same number >= 2 on each; else torch.

        The fast paths are CPU-only and sum full-precision buffers (compressed buckets go to torch).
        One all_gather of node facts, so every rank reaches the same decision."""
        if not on_cpu or self.comm_dtype is not None:
            return "torch", None
        if mpi_ok and (rt := runtime.current()) is not None and rt.source == "mpi" and _mpi_importable():
            return "mpi", None
        from . import hierarchical, shm

        facts = shm.gather_node_facts(group, need_bytes)
        layout = hierarchical.NodeLayout.from_facts(facts, dist.get_process_group_ranks(group), dist.get_rank())
        if len(layout.nodes) == 1:
            return ("shm", layout) if shm.usable_for(facts) else ("torch", None)
        return ("hierarchical", layout) if hierarchical.auto_picks(layout, facts) else ("torch", None)

    def _check_explicit(self, transport: str, group, need_bytes: int):
        from . import hierarchical, shm

        facts = shm.gather_node_facts(group, need_bytes)
        if transport == "shm":
            shm.check_usable(facts)
        layout = hierarchical.NodeLayout.from_facts(facts, dist.get_process_group_ranks(group), dist.get_rank())
        if transport == "hierarchical":
            hierarchical.check_usable(layout, facts)
        return layout

    def _start_shm(self, group, layout) -> None:
        """shm (layout None) or hierarchical: the node's shared-memory group and the background
        worker that runs its collectives while backward (or forward) goes on."""
        from .shm import ShmGroup, ShmWorker

        timeout_s = runtime.timeout_s()
        if layout is None:
            self._shm = ShmGroup(group, timeout_s)
        else:
            from .hierarchical import build_group

            self._shm = build_group(group, timeout_s, layout)
        self._worker = ShmWorker(self._shm)

    def alloc(self, numel: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
        """A zeroed flat buffer that this backend communicates without copies: shared memory on the
        shm/hierarchical transports (collective over the dp group there: every rank allocates the
        same sizes in the same order), else torch.zeros. Call after bind_group()."""
        if self.resolved_transport is None:
            raise RuntimeError("AllReduce.alloc() before bind_group(): the transport decides where memory lives")
        if numel < 1:
            raise ValueError(f"alloc(numel={numel}): a flat buffer needs at least one element; skip empty buckets")
        if self._shm is None:
            return torch.zeros(numel, dtype=dtype, device=device)
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"alloc(device={device}): transport {self.resolved_transport!r} keeps buffers in "
                             "CPU shared memory; use transport='torch' for device tensors")
        t = self._alloc_shm(numel, dtype)
        self._shm.map_peers()
        return t

    def _alloc_shm(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        key = len(self._shm_keys)
        t = self._shm.alloc(key, numel, dtype)
        self._shm_keys[t.data_ptr()] = key
        return t

    # ---- collectives ---------------------------------------------------------------------
    def start(self, bucket) -> None:
        """Unsharded: all-reduce bucket.comm (sum over the dp group), completed by wait()."""
        key = self._shm_key(bucket.comm)
        if key is not None:
            self._count(bucket.comm, 2)
            self._handles.append(self._worker.submit(key, "all_reduce"))
        elif self._mpi is not None:
            self._count(bucket.comm, 2)
            self._handles.append(_timed(self._mpi.iallreduce(bucket.comm)))
        else:
            self._handles.append(comm.all_reduce(bucket.comm, group=self._group, async_op=True))

    def start_reduce_scatter(self, flat: torch.Tensor) -> None:
        """After wait(): flat.view(dp, -1)[r] = the sum over the dp group of that chunk (r: this rank's
        index in the group); the other chunks are unspecified."""
        chunk = self._chunk("start_reduce_scatter", flat)
        key = self._shm_key(flat, prefix=True)
        if key is not None:
            self._count(flat, 1)
            self._handles.append(self._worker.submit(key, "reduce_scatter", flat.numel()))
        elif self._mpi is not None:
            self._count(flat, 1)
            self._handles.append(_timed(self._mpi.ireduce_scatter(flat)))
        else:
            self._handles.append(comm.reduce_scatter_tensor(chunk, flat, group=self._group, async_op=True))

    def start_all_gather(self, flat: torch.Tensor) -> None:
        """After wait(): every chunk flat.view(dp, -1)[k] holds dp rank k's chunk."""
        chunk = self._chunk("start_all_gather", flat)
        key = self._shm_key(flat, prefix=True)
        if key is not None:
            self._count(flat, 1)
            self._handles.append(self._worker.submit(key, "all_gather", flat.numel()))
        elif self._mpi is not None:
            self._count(flat, 1)
            self._handles.append(_timed(self._mpi.iallgather(flat)))
        else:
            self._handles.append(comm.all_gather_into_tensor(flat, chunk, group=self._group, async_op=True))

    def start_all_gather_into(self, out: torch.Tensor, chunk: torch.Tensor) -> None:
        """After wait(): out.view(dp, -1)[k] holds dp rank k's `chunk`, for every k; `out` may be any
        memory. On the shm transport a `chunk` from alloc() is read straight out of every rank's
        shared memory into `out` (one copy of the whole; no staging buffer); elsewhere the chunk is
        copied into its row of `out` and gathered there in place."""
        row = self._chunk("start_all_gather_into", out)
        key = self._shm_key(chunk, log_fallback=False) if self.resolved_transport == "shm" else None
        if key is not None and chunk.numel() == row.numel():
            self._count(out, 1)
            self._handles.append(self._worker.submit(key, "gather_out", out))
            return
        row.copy_(chunk)
        self.start_all_gather(out)

    def read_shards_into(self, out: torch.Tensor, chunk: torch.Tensor) -> bool:
        """out.view(dp, -1)[k] := dp rank k's `chunk` now, read by this thread out of shared memory with
        no barrier (shm transport, `chunk` from alloc()); False where that is not possible (then call
        start_all_gather_into). The caller guarantees that no rank writes its chunk between a barrier
        this rank passed before the call and one every rank passes after it (see barrier())."""
        row = self._chunk("read_shards_into", out)
        key = self._shm_key(chunk, log_fallback=False) if self.resolved_transport == "shm" else None
        if key is None or chunk.numel() != row.numel():
            return False
        self._count(out, 1)
        self._shm.read_out(key, out)
        return True

    def barrier(self) -> None:
        """Every rank of the group reaches this point (after what it started before, which completes
        first); on the shm transports through the worker's queue, else torch.distributed's barrier."""
        self.wait()
        if self._worker is not None:
            self._worker.submit(0, "barrier").wait()
        else:
            comm.barrier(self._group)

    def _count(self, flat: torch.Tensor, factor: int) -> None:
        """The shm and MPI transports move what a ring would (comm.py counts the torch transport):
        all-reduce 2(n-1)/n x the buffer (factor 2), reduce-scatter / all-gather (n-1)/n x (factor 1)."""
        obs = step_stats._active
        if obs is not None:
            obs.add_group_bytes(self._group, factor * (self._dp - 1) * flat.numel() * flat.element_size() / self._dp)

    def _chunk(self, what: str, flat: torch.Tensor) -> torch.Tensor:
        if self.resolved_transport is None:
            raise RuntimeError(f"AllReduce.{what}() before bind_group()")
        if flat.dim() != 1 or not flat.is_contiguous() or flat.numel() % self._dp:
            raise ValueError(f"{what}: the flat buffer must be 1-D, contiguous, with a multiple of dp={self._dp} "
                             f"elements; got shape {list(flat.shape)} (contiguous: {flat.is_contiguous()}); pad it "
                             f"to {-(-flat.numel() // self._dp) * self._dp} elements")
        return flat.view(self._dp, -1)[self._dp_index]

    def is_shared(self, t: torch.Tensor) -> bool:
        """Whether `t` is (a leading part of) a buffer from alloc() that this transport moves in place."""
        return self._shm_key(t, prefix=True, log_fallback=False) is not None

    def _shm_key(self, t: torch.Tensor, prefix: bool = False, log_fallback: bool = True) -> int | None:
        """The shared-memory key of `t` when it is a whole buffer from alloc() (or, with prefix, its
        first t.numel() elements: sharded DP reuses a few such buffers for buckets of any size); None
        (torch for this call) otherwise -- on every rank alike if the caller passes alike-made buffers."""
        if self._shm is None:
            return None
        key = self._shm_keys.get(t.data_ptr())
        if key is not None and t.is_contiguous():
            size = self._shm.buffers[key][self._shm.me].numel()
            if size == t.numel() or (prefix and t.numel() <= size):
                return key
        if not log_fallback:
            return None
        if not self._fallback_logged:
            self._fallback_logged = True
            log.debug("AllReduce(%s): a buffer of %d x %s is not from alloc(); it goes through torch.distributed",
                      self.resolved_transport, t.numel(), t.dtype)
        return None

    def wait(self, count: int | None = None) -> None:
        """Complete every started collective (or the `count` oldest), in start order."""
        n = len(self._handles) if count is None else min(count, len(self._handles))
        handles, self._handles = self._handles[:n], self._handles[n:]
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


class _Timed:
    """An MPI request that reports its transfer interval (launch to wait's return) to the measured step."""

    def __init__(self, handle, obs: step_stats.StepRecorder):
        self.handle, self.obs, self.t0 = handle, obs, time.perf_counter()

    def wait(self) -> None:
        self.handle.wait()
        self.obs.transfer(self.t0, time.perf_counter())


def _timed(handle):
    obs = step_stats._active
    return handle if obs is None else _Timed(handle, obs)


def _mpi_importable() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def _shm_bytes(buckets) -> int:
    """What this rank's buckets would occupy in /dev/shm (their wire buffers)."""
    return sum(b.numel * b.comm.element_size() for b in buckets)
