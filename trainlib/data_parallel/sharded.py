"""Sharded data parallel (ZeRO-1/2/3) and mixed precision, on DataParallel's flat buckets.

    model = tl.DataParallel(model, mesh, shard="optimizer" | "gradients" | "parameters",
                            mixed_precision=tl.MixedPrecision(param_dtype=torch.bfloat16))
    opt = tl.DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4), model)

Every bucket is a flat parameter buffer padded to a multiple of dp; dp rank r owns chunk r of it.

    stage        params (flat)             gradient wire (flat)           optimizer (fp32)
    optimizer    full, persistent          full, persistent               master + state of chunk r
    gradients    full, persistent          allocated per backward, freed  master + state + grad of chunk r
    parameters   chunk r; gathered per     allocated per backward, freed  master + state + grad of chunk r
                 unit for forward/backward

A step: backward packs each gradient into its bucket's wire as it arrives (scaled 1/dp, cast to the
reduce dtype, param.grad freed at once), a full bucket is reduce-scattered while backward goes on,
and the reduced chunk r lands (unscaled, cast to fp32) in the optimizer's gradient slice. The
optimizer steps on its slices only; stages 1/2 then all-gather the updated parameters into the
buckets. Stage 3 keeps only chunk r between uses: a unit (a layer from `as_layers()`, or a child
of the model's ModuleLists) is all-gathered just before its forward, the next unit prefetched,
freed after its forward (storage resized to 0, so saved activations keep their tensors), and
gathered again when the gradient reaches its output. On the shm transport the shards themselves live
in shared memory, so a gather is one copy of every rank's shard into the unit's parameters, and a
gradient is packed straight into the shared buffer it is reduce-scattered in. Under a pipeline (pp > 1) a unit stays
gathered from its first forward until the gradients are synced after the flush, as torchtitan does
with FSDP and pipelining, instead of gathering once per microbatch.

`shard=None` with a MixedPrecision policy is the same machinery with one owner (every rank steps
the whole bucket from fp32 masters) and an all-reduce in place of the reduce-scatter.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.autograd import Variable

from .. import comm
from ..observe import step_stats
from ..precision import LossScaler, MixedPrecision
from .buckets import plan_buckets

log = logging.getLogger("trainlib")

SHARD_STAGES = ("optimizer", "gradients", "parameters")
MAX_INFLIGHT_WIRES = 2   # transient gradient buckets alive at once (stages 2/3): bounds the gradient peak
WIRE_SLOTS = 2           # shared-memory transports: reused buffers the transient wires are reduced in
SHM_TRANSPORTS = ("shm", "hierarchical")
# torch >= 2.3 can move memory between storages; older ones free and re-allocate a unit's memory
_SWAPPABLE = hasattr(torch.UntypedStorage, "_swap_data_ptr_")
# stage 3 pools freed units' memory from this size on: glibc's dynamic mmap threshold reaches at most
# 32 MiB (64-bit), so smaller blocks go back to its heap and are reused without faulting pages in
# (pooling them measured no gain: 1-2% slower on bench zero's step model, 2 ranks)
POOL_MIN_BYTES = 32 << 20
POOL_DEPTH = 3


@dataclass
class FlatBucket:
    """One bucket of the sharded wrapper: a flat parameter buffer, its wire, this rank's chunk."""
    index: int
    unit: int                    # index into ShardedDataParallel.units (-1: the root unit)
    params: list[nn.Parameter]
    names: list[str]
    offsets: list[int]
    numel: int
    padded: int                  # numel rounded up to a multiple of the owner count
    lo: int                      # this rank's chunk: [lo, hi) of the flat buffer
    hi: int
    flat: torch.Tensor           # padded, param dtype; every param's .data is a view of it
    shard: torch.Tensor | None   # stage 3: this rank's chunk of the parameters, kept between uses
    master: torch.Tensor         # fp32 [hi - lo]: what the optimizer updates
    grad: torch.Tensor           # fp32 [hi - lo]: the reduced gradient of this chunk
    wire: torch.Tensor | None = None
    arrived: list[bool] = field(default_factory=list)
    pending: int = 0
    started: bool = False
    gathered: bool = True
    stats: tuple | None = None   # (nonfinite, squared norm) of `grad` from the epilogue, until it changes
    in_slot: bool = False        # the wire is a view of one of the transport's shared buffers (stages 2/3)
    gather_slot: torch.Tensor | None = None   # stage 3: the shared buffer this bucket is being gathered in
    part: int = -1               # pipeline stage (DataParallel(parts=...)); -1: none, or shared by stages

    def chunk_of(self, i: int) -> tuple[int, int] | None:
        """The part of parameter i inside this rank's chunk, as (start, end) in the flat buffer."""
        s, e = max(self.offsets[i], self.lo), min(self.offsets[i] + self.params[i].numel(), self.hi)
        return (s, e) if s < e else None


class _PreBackward(torch.autograd.Function):
    """Identity on a unit's outputs whose backward gathers the unit before autograd reaches it."""

    @staticmethod
    def forward(ctx, owner, unit, *xs):
        ctx.owner, ctx.unit = owner, unit
        return xs if len(xs) > 1 else xs[0]

    @staticmethod
    def backward(ctx, *grads):
        ctx.owner._pre_backward(ctx.unit)
        return (None, None, *grads)


def find_units(module: nn.Module) -> list[nn.Module]:
    """The layers stage 3 gathers one at a time: `as_layers()`, else the children of the model's
    (outermost) ModuleLists / Sequentials, flattened; parameters outside all of them form the root."""
    def expand(m: nn.Module) -> list[nn.Module]:
        if isinstance(m, (nn.ModuleList, nn.Sequential)):
            return [u for c in m for u in expand(c)]
        return [m]

    if hasattr(module, "as_layers"):
        return list(module.as_layers())
    if isinstance(module, (nn.ModuleList, nn.Sequential)):
        return expand(module)
    units: list[nn.Module] = []
    taken: set[str] = set()
    for name, m in module.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and not any(name.startswith(t + ".") for t in taken):
            units += expand(m)
            taken.add(name)
    return units


class ShardedDataParallel:
    """The sharded/mixed-precision half of tl.DataParallel (a mixin: DataParallel.__init__ sets
    self.module, mesh, sync, group, dp and calls _init_sharded)."""

    shard: str | None
    precision: MixedPrecision | None

    def _init_sharded(self, named: list[tuple[str, nn.Parameter]], bucket_mb: float, shard: str | None,
                      precision: MixedPrecision | None) -> None:
        self.shard, self.precision = shard, precision
        self.owners = self.dp if shard is not None else 1
        self.me = self.mesh.rank("dp") if shard is not None else 0
        self.param_dtype = precision.param_dtype if precision is not None else None   # None: each its own
        self.compress_dtype = getattr(self.sync, "comm_dtype", None)
        self.scaler = LossScaler(precision)
        self._pipelined = False       # set by tl.parallelize when a pipeline schedule drives the stages
        self._in_backward = False
        self._held: int | None = None  # stage 3: the unit whose forward ran last, kept gathered (below)
        self._settled = False   # stage 3, shm: every rank's shard is final until release_shards()
        self._inflight: list[tuple[str, FlatBucket]] = []
        self._wire_pool: dict[torch.dtype, list[torch.Tensor]] = {}
        # stage 3: memory of freed units, by size, reused by the next gathers (at most what was gathered at once)
        self._gather_pool: dict[int, list[torch.UntypedStorage]] = {}
        self.pool_gathered = True      # False: free a unit's memory to the allocator (the pool's A/B)
        self.gather_allocations = 0    # units' memory allocated afresh (not from the pool), for tests
        self.grads_ready = False   # a synced backward reduced gradients since the last zero_grad
        self.units = find_units(self.module) if shard == "parameters" else []
        unit_of = self._unit_of_params(named)
        groups: dict[int, list[tuple[str, nn.Parameter]]] = {}
        for n, p in named:
            groups.setdefault(unit_of[id(p)], []).append((n, p))
        # stage 3 gathers whole units, one bucket each (DDP's small first bucket would only double the
        # collectives: a unit's gradients all arrive within its own backward); other stages take DDP's caps
        cap = float("inf") if shard == "parameters" else bucket_mb
        first = {"first_bucket_mb": cap} if shard == "parameters" else {}
        plan = [(unit, group) for unit in sorted(groups, key=lambda u: (u < 0, u))   # forward order, root last
                for group in plan_buckets(groups[unit], cap, part_of=self._part_of, **first)]
        if shard is not None:
            # stages 1/2 keep their parameter buffers (and stage 1 its wire) in the transport's memory,
            # stage 3 its parameter shards
            shared = sum(p.numel() * (_size(self._dtypes(p.dtype)[0]) + (_size(self._dtypes(p.dtype)[2])
                                                                         if shard == "optimizer" else 0))
                         for _, g in plan for _, p in g)
            reduce = {self._dtypes(p.dtype)[2] for _, p in named}
            self.sync.bind_group(self.group, named[0][1].device,
                                 shared // self.owners if shard == "parameters" else shared, len(plan),
                                 reduce_dtype=min(reduce, key=_size))   # the narrowest decides MPI's fitness
        # stage 3 on the shm transport: each shard lives in shared memory, so a unit is gathered by
        # copying every rank's shard straight into the parameters (one copy, no staging buffer)
        self._shards_shared = shard == "parameters" and getattr(self.sync, "resolved_transport", None) == "shm"
        self.buckets: list[FlatBucket] = []
        for i, (unit, group) in enumerate(plan):
            self.buckets.append(self._make_bucket(i, unit, group))
            if shard == "parameters":   # free as we go: the build peak stays one unit above the model
                self._free(self.buckets[-1], pool=False)
        if self._part_of is not None:
            for b in self.buckets:
                b.part = self._part_of.get(id(b.params[0]), -1)
        self._slots: dict[torch.dtype, list[torch.Tensor]] = {}
        self._slot_next: dict[torch.dtype, int] = {}
        self._slot_owner: dict[tuple, FlatBucket] = {}
        if shard in ("gradients", "parameters") and getattr(self.sync, "resolved_transport", None) in SHM_TRANSPORTS:
            self._alloc_slots()
        # backward produces the last layers' gradients first: launch buckets in that order
        # (within a unit plan_buckets already put the last parameters first; the root goes last)
        self._launch_order = sorted(self.buckets, key=lambda b: (b.unit < 0, -b.unit, b.index))
        self._launch_pos = {b.index: j for j, b in enumerate(self._launch_order)}
        if shard == "parameters":
            self._hooks += self._unit_hooks()
        for b in self.buckets:
            for i, p in enumerate(b.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_sharded_hook(b, i)))
        log.info("DataParallel: shard=%s, %d buckets, precision %s, dp=%d", shard, len(self.buckets),
                 precision, self.dp)

    # ---- layout --------------------------------------------------------------------------
    def _unit_of_params(self, named) -> dict[int, int]:
        """Parameter -> unit index; a parameter used by two units (tied weights) goes to the root."""
        seen: dict[int, int] = {}
        for u, m in enumerate(self.units):
            for p in m.parameters():
                seen[id(p)] = u if seen.get(id(p), u) == u else -1
        return {id(p): seen.get(id(p), -1) for _, p in named}

    def _alloc_slots(self) -> None:
        """Stages 2/3 on a shared-memory transport: WIRE_SLOTS buffers per (kind, dtype), each as large
        as the largest bucket, through which transient gradient wires are reduce-scattered (and, stage
        3, parameters all-gathered) in place. Collective: every rank allocates the same, in one order."""
        largest: dict[tuple[str, torch.dtype], int] = {}
        for b in self.buckets:
            kinds = [("reduce", self._dtypes(b.params[0].dtype)[2])]
            if self.shard == "parameters" and not self._shards_shared:
                kinds.append(("gather", b.flat.dtype))
            for key in kinds:
                largest[key] = max(largest.get(key, 0), b.padded)
        for key in sorted(largest, key=str):
            self._slots[key] = [self.sync.alloc(largest[key], key[1], self.buckets[0].flat.device)
                                for _ in range(WIRE_SLOTS)]
            self._slot_next[key] = 0

    def _take_slot(self, key: tuple[str, torch.dtype], b: FlatBucket) -> torch.Tensor | None:
        """A shared buffer of `key` for bucket b, once its previous user is done; None without shared
        buffers (the torch transport). Every rank must give a bucket the same buffer: a reduce wire takes
        the one of its launch position (buckets launch in one order), a gather the next in turn (gathers
        start in one order)."""
        slots = self._slots.get(key)
        if not slots:
            return None
        if key[0] == "reduce":
            k = self._launch_pos[b.index] % len(slots)
        else:
            k = self._slot_next[key]
            self._slot_next[key] = (k + 1) % len(slots)
        owner = self._slot_owner.get((key, k))
        if owner is not None and any(x is owner for _, x in self._inflight):
            self._drain(upto=owner)
        self._slot_owner[(key, k)] = b
        return slots[k][:b.padded]

    def _early_slot(self, b: FlatBucket, dtype: torch.dtype) -> torch.Tensor | None:
        """Bucket b's reduce buffer at its first gradient, so gradients are packed where they are
        reduced (no private wire copied in at launch) -- when it is safe: in backward's own launch
        order (no pipeline), and once the bucket that used that buffer before b in this step has
        launched (buckets launch in order, so no earlier one can still claim it). None: pack into a
        private wire, copied into the buffer at launch. (Only stages 2/3 have transient wires and slots.)"""
        slots = self._slots.get(("reduce", dtype))
        if not slots or self._pipelined:
            return None
        j = self._launch_pos[b.index]
        if j >= len(slots) and not self._launch_order[j - len(slots)].started:
            return None
        return self._take_slot(("reduce", dtype), b)

    def _dtypes(self, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
        """(stored/compute, master, reduce) dtypes for parameters of `dtype` under this policy."""
        master = torch.float64 if dtype == torch.float64 else torch.float32
        stored = self.param_dtype if self.param_dtype is not None and dtype.is_floating_point else dtype
        reduce = self.compress_dtype or (self.precision.reduce_dtype if self.precision is not None else stored)
        return stored, master, reduce

    def _make_bucket(self, index: int, unit: int, group: list[tuple[str, nn.Parameter]]) -> FlatBucket:
        params = [p for _, p in group]
        offsets, n = [], 0
        for p in params:
            offsets.append(n)
            n += p.numel()
        padded = -(-n // self.owners) * self.owners
        chunk = padded // self.owners
        lo, hi = self.me * chunk, (self.me + 1) * chunk
        device = params[0].device
        stored, master_dtype, reduce = self._dtypes(params[0].dtype)
        full32 = torch.zeros(padded, dtype=master_dtype, device=device)
        with torch.no_grad():
            for p, off in zip(params, offsets):
                full32[off: off + p.numel()].copy_(p.detach().reshape(-1))
        stage3 = self.shard == "parameters"
        if self.shard in ("optimizer", "gradients"):
            flat = self.sync.alloc(padded, stored, device)
            flat.copy_(full32)
        else:
            flat = full32 if stored == master_dtype else full32.to(stored)
        shard = None
        if stage3:
            shard = self.sync.alloc(chunk, stored, device) if self._shards_shared else torch.empty_like(flat[lo:hi])
            shard.copy_(flat[lo:hi])
        if stored == master_dtype:
            master = shard if stage3 else flat[lo:hi]      # the optimizer updates the parameters themselves
        else:
            master = full32[lo:hi].clone()                 # fp32 masters from the fp32 weights, not from bf16
        wire = None
        if self.shard == "optimizer":
            wire = self.sync.alloc(padded, reduce, device)
        elif self.shard is None:
            wire = torch.zeros(padded, dtype=reduce, device=device)
        grad = wire[lo:hi] if wire is not None and reduce == master_dtype \
            else torch.zeros(hi - lo, dtype=master_dtype, device=device)
        for p, off in zip(params, offsets):
            p.data = flat[off: off + p.numel()].view(p.shape)
            p.grad = None
        return FlatBucket(index, unit, params, [nm for nm, _ in group], offsets, n, padded, lo, hi, flat, shard,
                          master, grad, wire, [False] * len(params))

    def bucket_nbytes(self) -> list[int]:
        return [b.padded * b.flat.element_size() for b in self.buckets]

    # ---- stage 3: gather / free units --------------------------------------------------------
    def _unit_buckets(self, unit: int) -> list[FlatBucket]:
        return [b for b in self.buckets if b.unit == unit]

    def _free(self, b: FlatBucket, pool: bool = True) -> None:
        if b.gathered:
            storage = b.flat.untyped_storage()
            if pool and self._pools(storage):
                # keep the memory for the next gather of this size: glibc mmaps a block past its
                # threshold (32 MiB at most) and unmaps it on free, so a unit gathered afresh is
                # page-faulted in again, every gather of every step. The storage object stays the
                # unit's (saved activations hold views of it); only its memory moves to the pool.
                spare = torch.UntypedStorage(0, device=storage.device)
                spare._swap_data_ptr_(storage)
                self._gather_pool.setdefault(spare.nbytes(), []).append(spare)
            else:
                storage.resize_(0)
            b.gathered = False

    def _pools(self, storage: torch.UntypedStorage) -> bool:
        """Keep this freed unit's memory? At most POOL_DEPTH blocks of a size: no more are gathered at
        once (the unit kept from the last forward, the current one and the prefetched next)."""
        return (_SWAPPABLE and storage.device.type == "cpu" and storage.nbytes() >= POOL_MIN_BYTES
                and self.pool_gathered and len(self._gather_pool.get(storage.nbytes(), ())) < POOL_DEPTH)

    def _materialize(self, b: FlatBucket) -> None:
        """Give a freed bucket's flat storage memory again: a pooled buffer of its size, or a new one
        (nothing when it has its memory already)."""
        storage, nbytes = b.flat.untyped_storage(), b.padded * b.flat.element_size()
        if storage.nbytes() >= nbytes:
            return
        spares = self._gather_pool.get(nbytes)
        if spares:
            storage._swap_data_ptr_(spares.pop())
        else:
            storage.resize_(nbytes)
            self.gather_allocations += 1

    def _reads_settled(self) -> bool:
        """Gather by reading the peers' shards now, with no collective? Only on the shm transport
        between the first gather after the shards last changed (a barrier every rank passed after
        writing) and the next write (release_shards(): a barrier every rank passes after reading)."""
        return self._settled and self._shards_shared and not self._pipelined

    def _start_gather(self, b: FlatBucket) -> None:
        if b.gathered or any(kind == "gather" and x is b for kind, x in self._inflight):
            return
        if self._reads_settled():
            self._materialize(b)
            if self.sync.read_shards_into(b.flat, b.shard):
                b.gathered = True
                return
        view = self._take_slot(("gather", b.flat.dtype), b)
        if view is not None:   # hierarchical: gathered in a shared buffer, copied into the parameters after
            view[b.lo:b.hi].copy_(b.shard)
            b.gather_slot = view
            self.sync.start_all_gather(view)
        else:
            self._materialize(b)
            self.sync.start_all_gather_into(b.flat, b.shard)
        self._inflight.append(("gather", b))

    def _gather_unit(self, unit: int, prefetch: int | None = None) -> None:
        need = [b for b in self._unit_buckets(unit) if not b.gathered]
        for b in need:
            self._start_gather(b)
        # a settled gather is a copy in this thread: made when needed, not ahead (nothing to overlap)
        if prefetch is not None and 0 <= prefetch < len(self.units) and not self._reads_settled():
            for b in self._unit_buckets(prefetch):
                self._start_gather(b)
        self._await_gathered(self._unit_buckets(unit))

    def _await_gathered(self, buckets: list[FlatBucket]) -> None:
        """Complete what is in flight up to the last of these buckets' gathers, and no further: the
        prefetched next unit and the reduce-scatters launched since go on in the background."""
        waiting = [i for i, (kind, x) in enumerate(self._inflight) if kind == "gather" and any(x is b for b in buckets)]
        if waiting:
            self._drain(upto=self._inflight[waiting[-1]][1])

    def _free_unit(self, unit: int) -> None:
        # a reduce-scatter in flight reads the wire, not the parameters: only a gather in flight pins them
        for b in self._unit_buckets(unit):
            if not any(kind == "gather" and x is b for kind, x in self._inflight):
                self._free(b)

    def _unit_hooks(self) -> list:
        hooks = []
        for u, m in enumerate(self.units):
            if any(b.unit == u for b in self.buckets):
                hooks.append(m.register_forward_pre_hook(self._make_pre_forward(u)))
                hooks.append(m.register_forward_hook(self._make_post_forward(u)))
        return hooks

    def _make_pre_forward(self, unit: int):
        def pre_forward(module, args):
            self._gather_root()
            if not self._in_backward:
                self._release_held(keep=unit)
            self._gather_unit(unit, prefetch=None if self._in_backward else unit + 1)
        return pre_forward

    def _release_held(self, keep: int | None = None) -> None:
        if self._held is not None and self._held != keep:
            self._free_unit(self._held)
        self._held = None

    def _make_post_forward(self, unit: int):
        def post_forward(module, args, output):
            if self._in_backward:  # activation checkpointing recomputes the forward inside backward
                return output
            if not torch.is_grad_enabled():
                if not self._pipelined:
                    self._free_unit(unit)
                return output
            if not self._pipelined:
                # kept gathered until the next unit's forward starts: the unit that ran last is the
                # first one backward needs, so it is not freed and gathered straight back (as FSDP
                # keeps its root unsharded); backward's first gather would re-create it at once anyway
                self._release_held(keep=unit)
                self._held = unit
            return _wrap_outputs(output, self, unit)
        return post_forward

    def _pre_backward(self, unit: int) -> None:
        self._in_backward = True
        self._queue_finish()
        self._gather_unit(unit, prefetch=unit - 1)

    def _gather_root(self, prefetch: int | None = None) -> None:
        root = self._unit_buckets(-1)
        for b in root + (self._unit_buckets(prefetch) if prefetch is not None else []):
            self._start_gather(b)
        self._await_gathered(root)

    # ---- forward ---------------------------------------------------------------------------
    def _sharded_forward(self, *args, **kwargs):
        self.sync.on_forward(self.module)
        if self.broadcast_buffers and self.dp > 1:
            bufs = [b for b in self.module.buffers() if b.is_floating_point() or b.dtype == torch.long]
            if bufs:
                self._broadcast(bufs)
        self._reset_sharded()
        if self.shard == "parameters":
            # the first unit's gather is not hidden behind anything: start it beside the root's
            settling = not self._settled
            self._gather_root(prefetch=0 if not self._pipelined and not self._in_backward else None)
            if settling and self._shards_shared and not self._pipelined:
                # a collective gather: every rank has reached its forward, so every shard holds its
                # last write (the optimizer step comes before). Until the next write, gathers read them.
                first = self._unit_buckets(-1) or self._unit_buckets(0)
                self._await_gathered(first)
                self._settled = bool(first)
        args = tuple(_cast_floating(a, self.param_dtype) for a in args)
        return self.module(*args, **kwargs)

    def _reset_sharded(self) -> None:
        for b in self.buckets:
            b.pending = len(b.params)
            b.started = False
            b.arrived = [False] * len(b.params)
        self._next = 0

    # ---- backward ----------------------------------------------------------------------------
    def _queue_finish(self) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            Variable._execution_engine.queue_callback(self._finish_sharded)
            if self._own_step is not None:   # the first gradient: forward (and the loss) is over
                self._own_step.switch("backward")

    def _make_sharded_hook(self, b: FlatBucket, i: int):
        def hook(param: torch.Tensor) -> None:
            if not self._require_sync or self._pipelined:
                return  # accumulate locally in param.grad (no_sync, or a pipeline flush syncs later)
            self._queue_finish()
            self._in_backward = True
            self._pack(b, i, param)
            b.pending -= 1
            if b.pending == 0:
                self._launch_ready_sharded()
                if b.unit >= 0 and all(x.pending == 0 for x in self._unit_buckets(b.unit)):
                    self._free_unit(b.unit)   # its backward is over: free the gathered parameters now
        return hook

    def _wire(self, b: FlatBucket) -> torch.Tensor:
        """The bucket's gradient wire; stages 2/3 borrow it from a small pool of freed ones, because
        fresh large buffers cost page faults (a memset's worth) on every backward."""
        if b.wire is None:
            dtype = self._dtypes(b.params[0].dtype)[2]
            view = self._early_slot(b, dtype) if self._require_sync else None
            if view is not None:
                b.wire, b.in_slot = view, True
                return view
            pool = self._wire_pool.setdefault(dtype, [])
            fits = [i for i, t in enumerate(pool) if t.numel() >= b.padded]
            base = pool.pop(min(fits, key=lambda i: pool[i].numel())) if fits else \
                torch.empty(b.padded, dtype=dtype, device=b.flat.device)
            b.wire = base[:b.padded]
        return b.wire

    def _release_wire(self, b: FlatBucket) -> None:
        base = b.wire._base if b.wire._base is not None else b.wire
        pool = self._wire_pool.setdefault(base.dtype, [])
        if len(pool) < MAX_INFLIGHT_WIRES + 1:
            pool.append(base)
        b.wire = None

    def _pack(self, b: FlatBucket, i: int, param: torch.Tensor) -> None:
        """param.grad -> its slot in the wire, scaled by 1/dp (the average) and cast; param.grad freed."""
        from trainlib import kernels

        p = b.params[i]
        view = self._wire(b)[b.offsets[i]: b.offsets[i] + p.numel()]
        kernels.pack([param.grad], view, 1.0 / self.dp)
        param.grad = None
        b.arrived[i] = True

    def _launch_ready_sharded(self) -> None:
        order = self._launch_order
        while self._next < len(order) and order[self._next].pending <= 0:
            if not order[self._next].started:   # reduce_part() may have launched it already
                self._launch_sharded(order[self._next])
            self._next += 1

    def _launch_sharded(self, b: FlatBucket) -> None:
        wire = self._wire(b)
        for i, got in enumerate(b.arrived):
            if not got:  # unused this step: contributes zeros, like DDP's find_unused_parameters
                wire[b.offsets[i]: b.offsets[i] + b.params[i].numel()].zero_()
        wire[b.numel:].zero_()
        b.started = True
        if self.shard is None:
            self._inflight.append(("reduce", b))
            self._handles.append(comm.all_reduce(wire, group=self.group, async_op=True) if self.dp > 1 else None)
            return
        # shared-memory transports reduce in place only in their own buffers: hand the bucket over
        # through one of a few reused ones
        view = self._take_slot(("reduce", wire.dtype), b) if self.shard != "optimizer" and not b.in_slot else None
        if view is not None:
            view.copy_(wire)
            self._release_wire(b)
            b.wire, b.in_slot, wire = view, True, view
        self.sync.start_reduce_scatter(wire)
        self._inflight.append(("reduce", b))
        if self.shard != "optimizer" and not b.in_slot and \
                sum(k == "reduce" for k, _ in self._inflight) > MAX_INFLIGHT_WIRES:
            self._drain()

    def _drain(self, upto: FlatBucket | None = None) -> None:
        """Complete what is in flight (everything, or up to and including bucket `upto`'s reduction):
        reduced chunks land in the optimizer's gradient slices (transient wires are released),
        gathered buckets are marked usable."""
        n = len(self._inflight) if upto is None else \
            max(i for i, (_, x) in enumerate(self._inflight) if x is upto) + 1
        if self.shard is not None:
            self.sync.wait(n)
        for h in self._handles:
            if h is not None:
                h.wait()
        self._handles = []
        from trainlib import kernels

        done, self._inflight = self._inflight[:n], self._inflight[n:]
        for kind, b in done:
            if kind == "gather":
                if b.gather_slot is not None:   # gathered in a shared buffer: into the parameters now
                    self._materialize(b)
                    b.flat.copy_(b.gather_slot)
                    b.gather_slot = None
                b.gathered = True
                continue
            # the chunk leaves the wire as the fp32 average, loss scale removed (the epilogue of a step)
            # one fused pass: unscale, cast to fp32, and the (inf/nan, squared norm) clipping needs
            b.stats = kernels.unscale_epilogue(b.wire[b.lo:b.hi], b.grad, 1.0 / self.scaler.scale)
            self.grads_ready = True
            if b.in_slot:
                b.wire, b.in_slot = None, False
            elif self.shard in ("gradients", "parameters"):
                self._release_wire(b)

    def _finish_sharded(self) -> None:
        self._callback_queued = False
        self._in_backward = False
        if self._require_sync and not self._pipelined:
            for b in self.buckets:
                if b.pending > 0 and not b.started:
                    b.pending = 0
            self._launch_ready_sharded()
            with step_stats.phase("sync_wait", "trainlib.bucket_wait"):
                self._drain()
        if self.shard == "parameters" and not self._pipelined:
            self._held = None
            for b in self.buckets:
                self._free(b)
        self._close_own_step()

    def _sync_sharded(self) -> None:
        """sync_gradients() for the sharded wrapper: gradients accumulated in param.grad (no_sync
        steps, a pipeline schedule) are packed and reduced now (what reduce_part() launched: waited for)."""
        if not self._parts_open:
            self._reset_sharded()
        self._parts_open = False
        for b in self._launch_order:
            if not b.started:
                self._pack_accumulated(b)
        self._launch_ready_sharded()
        with step_stats.phase("sync_wait", "trainlib.bucket_wait"):
            self._drain()
        if self.shard == "parameters":
            for b in self.buckets:
                self._free(b)

    def _pack_accumulated(self, b: FlatBucket) -> None:
        for i, p in enumerate(b.params):
            if p.grad is not None:
                self._pack(b, i, p)
        b.pending = 0

    def _reduce_part_sharded(self, part: int) -> None:
        """reduce_part() for the sharded wrapper: pack and launch the part's buckets, no wait."""
        for b in self._launch_order:
            if b.part == part and not b.started:
                self._pack_accumulated(b)
                self._launch_sharded(b)

    # ---- optimizer side ----------------------------------------------------------------------
    def sharded_grad_stats(self, split_tp: bool = False) -> tuple[bool, float, float]:
        """(any inf/nan, squared L2 norm of tp-sharded parameters' parts, of the others) over this
        rank's gradient chunks (already unscaled). Without split_tp everything counts as replicated
        and the whole sum comes from the fused epilogue kernel, one pass per bucket."""
        from trainlib import kernels

        nonfinite, sharded, replicated = False, 0.0, 0.0
        for b in self.buckets:
            if b.hi == b.lo:
                continue
            flag, s = b.stats if b.stats is not None else kernels.epilogue(b.grad)
            nonfinite |= bool(flag)
            if not split_tp:
                replicated += float(s)
                continue
            for i, p in enumerate(b.params):
                part = b.chunk_of(i)
                if part is None:
                    continue
                sq = float(b.grad[part[0] - b.lo: part[1] - b.lo].double().pow(2).sum())
                if getattr(p, "tp_sharded", False):
                    sharded += sq
                else:
                    replicated += sq
        return nonfinite, sharded, replicated

    def scale_grads_(self, coef: float) -> None:
        for b in self.buckets:
            b.grad.mul_(coef)
            if b.stats is not None:
                b.stats = (b.stats[0], b.stats[1] * coef * coef)

    def release_shards(self) -> None:
        """Call before this rank's parameter chunks change (an optimizer step, a load): stage 3 on the
        shm transport waits until every rank has finished reading them (collective, when any rank may
        have read them since they last changed; every rank decides alike, from the same calls)."""
        if self._settled:
            self._drain()
            self.sync.barrier()
            self._settled = False

    def publish_params(self) -> None:
        """After the optimizer stepped on the masters: cast them into this rank's chunk and, for
        stages 1/2 (and unsharded mixed precision), all-gather the updated buckets (stage 3: the
        optimizer step called release_shards() before writing)."""
        for b in self.buckets:
            target = b.shard if b.shard is not None else b.flat[b.lo:b.hi]
            if target.data_ptr() != b.master.data_ptr():
                target.copy_(b.master)
        if self.shard in ("optimizer", "gradients"):
            for b in self.buckets:
                self.sync.start_all_gather(b.flat)
                self._inflight.append(("gather", b))
            self._drain()

    def zero_sharded_grads(self) -> None:
        self.grads_ready = False
        for b in self.buckets:
            b.stats = None
            for p in b.params:
                p.grad = None

    # ---- state --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def gathered(self):
        """All parameters gathered (stage 3) for the duration: e.g. to evaluate or export."""
        if self.shard != "parameters":
            yield
            return
        for b in self.buckets:
            self._start_gather(b)
        self._drain()
        try:
            yield
        finally:
            for b in self.buckets:
                self._free(b)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on every rank (collective): fp32 masters gathered from every
        chunk, frozen parameters and buffers as they are."""
        if not self.sharded:   # replicated: every rank holds them whole already
            return {n: t.detach().clone() for n, t in self.module.state_dict().items()}
        gathered: dict[int, torch.Tensor] = {}
        for b in self.buckets:
            full = torch.zeros(b.padded, dtype=b.master.dtype, device=b.flat.device)
            full[b.lo:b.hi].copy_(b.master)
            if self.owners > 1:
                comm.all_gather_into_tensor(full, full[b.lo:b.hi].clone(), group=self.group)
            for p, off in zip(b.params, b.offsets):
                gathered[id(p)] = full[off: off + p.numel()].view(p.shape).clone()
        # state_dict's keys (tied weights under every name), without reading freed parameters
        return {n: gathered[id(t)] if id(t) in gathered else t.detach().clone()
                for n, t in self.module.state_dict(keep_vars=True).items()}

    def param_slices(self, of: str = "params") -> dict[str, torch.Tensor]:
        """This rank's part of every parameter, by name: a 1-D view of the flat elements
        checkpoint/layout.py records as its "dp" range. of="params" (what the module computes
        with) or "master" (the optimizer's fp32 copy)."""
        out = {}
        for b in self.buckets:
            source = b.master if of == "master" else (b.shard if b.shard is not None else b.flat[b.lo:b.hi])
            for i, name in enumerate(b.names):
                part = b.chunk_of(i)
                if part is not None:
                    out[name] = source[part[0] - b.lo: part[1] - b.lo]
        return out

    def shard_state_dict(self) -> dict:
        """This rank's slices of the parameters for a checkpoint (checkpoint/layout.py says where
        each sits in the whole tensor), the unsharded rest (frozen parameters, buffers), the loss scale."""
        bucketed = {id(p) for b in self.buckets for p in b.params}
        rest = {n: t.detach() for n, t in self.module.state_dict(keep_vars=True).items() if id(t) not in bucketed}
        return {"stage": self.shard or "none", "dp": self.owners, "rank": self.me,
                "precision": str(self.param_dtype or "as built"),
                "slices": {n: t.detach().clone() for n, t in self.param_slices().items()}, "rest": rest,
                "scaler": self.scaler.state_dict()}

    def load_shard_state_dict(self, state: dict) -> None:
        mine = {"stage": self.shard or "none", "dp": self.owners, "rank": self.me}
        saved = {k: state.get(k) for k in mine}
        targets = self.param_slices()
        if saved != mine or set(state["slices"]) != set(targets):
            from ..checkpoint.store import CheckpointError

            raise CheckpointError(f"this checkpoint holds sharded slices for {saved}, but this rank is {mine}; "
                                  "resume with the same dp size, --dp.shard and bucket size")
        self.release_shards()
        with torch.no_grad():
            for name, t in targets.items():
                t.copy_(state["slices"][name])
            self.module.load_state_dict(state["rest"], strict=False)
        self.scaler.load_state_dict(state["scaler"])
        self.after_load()

    def after_load(self) -> None:
        """Parameters were written into this rank's chunks (a checkpoint): stages 1/2 all-gather them
        into the whole buckets (collective over dp)."""
        if self.shard in ("optimizer", "gradients"):
            for b in self.buckets:
                self.sync.start_all_gather(b.flat)
                self._inflight.append(("gather", b))
            self._drain()


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _cast_floating(x, dtype: torch.dtype | None):
    """Floating-point inputs follow the parameters' dtype (integer token ids pass unchanged)."""
    if dtype is not None and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
        return x.to(dtype)
    return x


def _wrap_outputs(output, owner, unit: int):
    """Route the unit's tensor outputs through _PreBackward, keeping the output's structure."""
    if isinstance(output, torch.Tensor):
        return _PreBackward.apply(owner, unit, output) if output.requires_grad else output
    if isinstance(output, (tuple, list)):
        idx = [i for i, t in enumerate(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not idx:
            return output
        wrapped = _PreBackward.apply(owner, unit, *(output[i] for i in idx))
        wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
        out = list(output)
        for i, t in zip(idx, wrapped):
            out[i] = t
        return type(output)(out) if isinstance(output, tuple) and not hasattr(output, "_fields") else out
    return output
