"""`tl.DataParallel`: bucketed gradient sync overlapped with backward (the torch DDP contract).

    model = tl.DataParallel(model, mesh=mesh, sync=tl.AllReduce(bucket_mb=25, compress=None))
    loss_fn(model(x), y).backward()   # when this returns, every param.grad is the dp-average

How a step flows, unsharded (picotron's shape, with DDP's in-order launch):
  forward        sync.on_forward(); buffers broadcast from dp rank 0; per-backward state reset
  backward       each parameter's post-accumulate-grad hook moves its gradient into the bucket
                 and counts the bucket down; a bucket whose gradients are all in is scaled by 1/dp
                 (cast to the wire dtype when compressed) and handed to sync.start() -- buckets
                 launch strictly in index order on every rank, so the collectives line up even
                 when ranks finish buckets in different orders
  end of backward  (one autograd-engine callback) buckets still waiting (parameters unused this
                 step) launch with zero gradients, sync.wait(), compressed buckets unpack
After the hook, param.grad is a view into its bucket's flat buffer, so there is no second copy of
the gradients: after zero_grad(set_to_none=True) autograd hands the hook a fresh tensor, which it
copies into the view at once (so it is freed there: one gradient copy at the peak, not a bucket's
worth). A gradient that is not a view at launch (set by hand) is gathered by the pack kernel in
the pass that scales it, and the views are re-attached. A sync that does not reduce in backward
(async parameter server, `reduces_in_backward = False`) gets no hooks: gradients stay local.

Under a pipeline (`parts=` the stage modules, set by tl.parallelize) buckets never span two stages;
the schedule runs under no_sync() and calls reduce_part(stage) right after a stage's last backward,
which launches that stage's buckets at once, and sync_gradients() launches the rest and waits.

Sharded data parallel and mixed precision (`shard=...`, `mixed_precision=...`) take another path,
in sharded.py: there param.grad is not a view -- each gradient is packed into a bucket's wire as it
arrives and freed, and full buckets are reduce-scattered (ZeRO-1/2/3; all-reduced when only
mixed_precision is set).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging

import torch
import torch.nn as nn
from torch.autograd import Variable

from .. import comm
from ..mesh import Mesh
from ..observe import step_stats
from ..sync.allreduce import AllReduce
from ..precision import MixedPrecision
from .buckets import Bucket, build_buckets, wire_bytes
from .sharded import SHARD_STAGES, ShardedDataParallel

log = logging.getLogger("trainlib")

BROADCAST_CHUNK_BYTES = 64 * 2**20


def _kernels():
    from trainlib import kernels

    return kernels


class DataParallel(ShardedDataParallel, nn.Module):
    """Wrap `module` for data-parallel training over `mesh`'s dp axis. See the module docstring.

    shard: None (replicated, DDP), "optimizer" (ZeRO-1), "gradients" (ZeRO-2), "parameters" (ZeRO-3);
    mixed_precision: a tl.MixedPrecision policy. Either one makes the optimizer's side sharded /
    fp32-master: wrap the optimizer in tl.DistributedOptimizer (see sharded.py).
    parts: submodules of `module` (pipeline stages) whose parameters never share a bucket, so that
    reduce_part(i) can start reducing part i's gradients while other parts still run backward."""

    def __init__(self, module: nn.Module, mesh: Mesh | None = None, sync=None, *, bucket_mb: float | None = None,
                 broadcast_buffers: bool = True, shard: str | None = None,
                 mixed_precision: MixedPrecision | None = None, parts: list[nn.Module] | None = None):
        super().__init__()
        if shard in ("none", "None"):
            shard = None
        if shard is not None and shard not in SHARD_STAGES:
            raise ValueError(f"DataParallel(shard={shard!r}): use None or one of {', '.join(SHARD_STAGES)} "
                             "(ZeRO stages 1, 2, 3)")
        if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecision):
            raise TypeError(f"DataParallel(mixed_precision={mixed_precision!r}): pass a tl.MixedPrecision(...)")
        self.module = module
        self.mesh = mesh if mesh is not None else Mesh(dp=-1)
        self.sync = sync if sync is not None else AllReduce()
        self.group = self.mesh.group("dp")
        self.dp = self.mesh.size("dp")
        self.src = self.mesh.group_ranks("dp")[0]
        self.broadcast_buffers = broadcast_buffers
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("DataParallel: the module has no parameter with requires_grad=True; nothing to sync")
        check_same_across_ranks(module, self.group)
        self._broadcast(list(module.parameters()) + list(module.buffers()))
        bucket_mb = bucket_mb if bucket_mb is not None else self.sync.bucket_mb
        self._require_sync = True
        self._callback_queued = False
        self._next = 0
        self._hooks = []
        self._handles = []
        self._parts_open = False   # reduce_part() launched buckets this step; sync_gradients() completes them
        # the step breakdown (observe/step_stats.py): used alone, a step runs from forward() to the
        # end of the synced backward; inside tl.parallelize / the trainer, they measure the step
        self.observe = True
        self._own_step: step_stats.StepRecorder | None = None
        self._last_stats: step_stats.StepStats | None = None
        # a parameter in two parts (tied across stages) belongs to none: it is reduced at the end
        self._part_of: dict[int, int] | None = None
        if parts is not None:
            self._part_of = {}
            for k, m in enumerate(parts):
                for p in m.parameters():
                    self._part_of[id(p)] = k if self._part_of.get(id(p), k) == k else -1
        self.sharded = shard is not None or mixed_precision is not None
        if self.sharded:
            if not self.sync.reduces_in_backward or not hasattr(self.sync, "start_reduce_scatter"):
                raise ValueError(f"DataParallel(shard={shard!r}, mixed_precision=...) needs sync=tl.AllReduce(...); "
                                 f"{type(self.sync).__name__} keeps whole gradients (use shard=None with it)")
            self._init_sharded(named, bucket_mb, shard, mixed_precision)
            return
        self.shard, self.precision = None, None
        alloc = None
        if hasattr(self.sync, "bind_group"):   # the backend chooses its transport first, then gives the memory
            need, count = wire_bytes(named, bucket_mb, self.sync.comm_dtype, part_of=self._part_of)
            self.sync.bind_group(self.group, named[0][1].device, need, count, reduce_dtype=self.sync.comm_dtype)
            alloc = self.sync.alloc
        self.buckets: list[Bucket] = build_buckets(named, bucket_mb, self.sync.comm_dtype, alloc=alloc,
                                                   part_of=self._part_of)
        if self.sync.reduces_in_backward:
            for b in self.buckets:
                for i, p in enumerate(b.params):
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(b, i)))
        self.sync.bind(self.buckets, self.group)
        log.debug("DataParallel: %d buckets (%s MB), dp=%d", len(self.buckets),
                  [round(b.nbytes / 2**20, 2) for b in self.buckets], self.dp)

    # ---- forward -------------------------------------------------------------------------
    def last_step_stats(self) -> step_stats.StepStats | None:
        """Where the last synced step's time went (forward, backward, exposed sync wait; bytes sent
        on dp, overlap, peak memory): see trainlib/observe/step_stats.py. Used on its own, a step is
        forward() to the end of the synced backward; None before the first one or with observe off."""
        return self._last_stats

    def _open_own_step(self) -> None:
        # an async parameter server syncs in forward, with no end of backward to close a step at
        # (and a forward under no_grad, evaluation, has no backward at all)
        if (self.observe and self._require_sync and self.sync.reduces_in_backward and torch.is_grad_enabled()
                and step_stats._active is None):
            self._own_step = step_stats.open_step(step_stats.axes_of(self.mesh))
            self._own_step.switch("forward")   # until the first gradient arrives

    def _close_own_step(self) -> None:
        if self._own_step is not None:
            rec, self._own_step = self._own_step, None
            self._last_stats = step_stats.close_step(rec)

    def forward(self, *args, **kwargs):
        if self._own_step is not None:   # the previous forward had no synced backward
            step_stats.abandon_step()
            self._own_step = None
        self._open_own_step()
        if self.sharded:
            return self._sharded_forward(*args, **kwargs)
        self.sync.on_forward(self.module)
        if self.broadcast_buffers and self.dp > 1:
            bufs = [b for b in self.module.buffers() if b.is_floating_point() or b.dtype == torch.long]
            if bufs:
                self._broadcast(bufs)
        self._reset()
        return self.module(*args, **kwargs)

    def _reset(self) -> None:
        for b in self.buckets:
            b.pending = len(b.params)
            b.started = False
        self._next = 0

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (gradient accumulation); the next synced backward averages the sum."""
        prev, self._require_sync = self._require_sync, False
        try:
            yield
        finally:
            self._require_sync = prev

    def sync_gradients(self) -> None:
        """Average now the gradients accumulated under no_sync() by backward passes that did not go
        through forward() (a pipeline schedule calls the stage modules directly)."""
        if self.sharded:
            self._sync_sharded()
            return
        if not self.sync.reduces_in_backward:   # async PS: gradients stay local, deltas move in on_forward
            return
        if not self._parts_open:
            self._reset()
        self._parts_open = False
        self._finish_backward()   # launches the buckets reduce_part() did not, then waits for all

    def reduce_part(self, part: int) -> None:
        """Start (without waiting) reducing the gradients of parts[part], accumulated under no_sync():
        a pipeline stage whose last backward of the step is done (torch pipelining's reduce-grad).
        sync_gradients() completes them. Every dp rank must call this in the same order (ranks of
        one dp group run the same pipeline stages, hence the same schedule)."""
        if self._part_of is None:
            raise ValueError("DataParallel.reduce_part needs DataParallel(..., parts=[stage modules])")
        if not self._parts_open:
            self._parts_open = True
            self._reset_sharded() if self.sharded else self._reset()
        if self.sharded:
            self._reduce_part_sharded(part)
            return
        if not self.sync.reduces_in_backward:
            return
        for b in self.buckets:
            if b.part == part and not b.started:
                b.pending = 0
                self._launch(b)

    # ---- backward ------------------------------------------------------------------------
    def _make_hook(self, bucket: Bucket, i: int):
        def hook(param: torch.Tensor) -> None:
            view = bucket.view(i)
            if param.grad is not None and param.grad.data_ptr() != view.data_ptr():
                # A fresh gradient (after zero_grad(set_to_none=True)): move it into the bucket now,
                # so it is freed here instead of living until its whole bucket launches -- that
                # keeps the peak at one gradient copy (plus the one in flight), not a bucket's worth.
                view.copy_(param.grad)
                param.grad = view
            if not self._require_sync:
                return
            if not self._callback_queued:
                self._callback_queued = True
                Variable._execution_engine.queue_callback(self._finish_backward)
                if self._own_step is not None:   # the first gradient: forward (and the loss) is over
                    self._own_step.switch("backward")
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch_ready()
        return hook

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending <= 0:
            if not self.buckets[self._next].started:   # reduce_part() may have launched it already
                self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, b: Bucket) -> None:
        sources, all_views = [], True
        for i, p in enumerate(b.params):
            view, g = b.view(i), p.grad
            if g is None:  # unused this step: contributes zeros, like DDP's find_unused_parameters
                view.zero_()
                g = view
            elif g.data_ptr() != view.data_ptr():
                all_views = False
            sources.append(g)
        k = _kernels()
        if all_views:
            k.scale_cast(b.grads, b.comm, 1.0 / self.dp)
        else:
            k.pack(sources, b.comm, 1.0 / self.dp)
        b.attach_views()
        b.started = True
        with step_stats.traced("trainlib.bucket_launch"):
            self.sync.start(b)

    def _finish_backward(self) -> None:
        self._callback_queued = False
        for b in self.buckets[self._next:]:
            b.pending = 0
        self._launch_ready()
        with step_stats.phase("sync_wait", "trainlib.bucket_wait"):
            self.sync.wait()
        k = _kernels()
        for b in self.buckets:
            if b.comm is not b.grads:
                k.scale_cast(b.comm, b.grads, 1.0)
        self._close_own_step()

    # ---- helpers -------------------------------------------------------------------------
    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Coalesced broadcast from the dp group's first rank: flat buffers of one dtype, at most
        BROADCAST_CHUNK_BYTES each (one whole-model copy would double a large model's build peak)."""
        if self.dp == 1:
            return
        by_dtype: dict[torch.dtype, list[list[torch.Tensor]]] = {}
        filled: dict[torch.dtype, int] = {}   # bytes in each dtype's last chunk
        for t in tensors:
            chunks = by_dtype.setdefault(t.dtype, [[]])
            nbytes = t.numel() * t.element_size()
            if chunks[-1] and filled[t.dtype] + nbytes > BROADCAST_CHUNK_BYTES:
                chunks.append([])
                filled[t.dtype] = 0
            chunks[-1].append(t)
            filled[t.dtype] = filled.get(t.dtype, 0) + nbytes
        with torch.no_grad():
            for chunks in by_dtype.values():
                for ts in chunks:
                    flat = torch.cat([t.detach().reshape(-1) for t in ts])
                    comm.broadcast(flat, src=self.src, group=self.group)
                    off = 0
                    for t in ts:
                        t.copy_(flat[off: off + t.numel()].view_as(t))
                        off += t.numel()

    def grad_stats(self) -> tuple[bool, torch.Tensor]:
        """(any inf/nan, squared L2 norm) of this rank's gradients, from the buckets in one pass each
        (sharded: of this rank's gradient chunks only)."""
        if self.sharded:
            nonfinite, _, sq = self.sharded_grad_stats()
            return nonfinite, torch.tensor(sq, dtype=torch.float32)
        k = _kernels()
        nonfinite, sq = False, torch.zeros((), dtype=torch.float32)
        for b in self.buckets:
            flag, s = k.epilogue(b.grads)
            nonfinite |= bool(flag)
            sq = sq + s.to(sq.device)
        return nonfinite, sq

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.sync.close()


def check_same_across_ranks(module: nn.Module, group) -> None:
    """Every rank must wrap the same model: compare a digest of (name, shape, dtype, requires_grad) and,
    on a mismatch, name the first differing entry (on every rank, so all fail together)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return
    entries = [f"parameter {n} shape={list(p.shape)} dtype={p.dtype} requires_grad={p.requires_grad}"
               for n, p in module.named_parameters()]
    entries += [f"buffer {n} shape={list(b.shape)} dtype={b.dtype}" for n, b in module.named_buffers()]
    digest = hashlib.sha256("\n".join(entries).encode()).digest()[:8]
    device = next((p.device for p in module.parameters()), torch.device("cpu"))   # NCCL: device tensors only
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    comm.all_gather(everyone, mine, group=group)
    if all(int(t) == int(everyone[0]) for t in everyone):
        return
    ranks = dist.get_process_group_ranks(group)
    src = ranks[0]
    bad = ranks[next(i for i, t in enumerate(everyone) if int(t) != int(everyone[0]))]
    ref, other = (_broadcast_lines(entries, r, group, device) for r in (src, bad))
    first = next(((a, b) for a, b in zip(ref, other) if a != b), (f"{len(ref)} entries", f"{len(other)} entries"))
    raise ValueError(f"DataParallel: the model differs across data-parallel ranks: rank {bad} has '{first[1]}' "
                     f"where rank {src} has '{first[0]}'. Build the same model on every rank before wrapping it.")


def _broadcast_lines(lines: list[str], src: int, group, device: torch.device) -> list[str]:
    """Rank `src`'s lines, on every rank of `group` (a length, then the UTF-8 bytes)."""
    import torch.distributed as dist

    text = "\n".join(lines).encode()
    n = torch.tensor([len(text)], dtype=torch.int64, device=device)
    comm.broadcast(n, src=src, group=group)
    buf = torch.zeros(int(n), dtype=torch.uint8, device=device)
    if dist.get_rank() == src:
        buf.copy_(torch.frombuffer(bytearray(text), dtype=torch.uint8))
    comm.broadcast(buf, src=src, group=group)
    return bytes(buf.cpu().tolist()).decode().split("\n")
