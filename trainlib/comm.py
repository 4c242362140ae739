"""The one place that calls torch.distributed's collectives.

Why a wrapper: every wait gets a timeout whose error names the rank, the collective and its
sequence number, and a short log of recent collectives is kept so a desync can be reported
("rank 1 was at all_reduce #41 while rank 0 ...") instead of hanging silently.
"""
from __future__ import annotations

import collections
import datetime
import logging
import os
import time
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import liveness, runtime
from .errors import CollectiveError, CollectiveMismatch, CollectiveTimeout  # noqa: F401  (comm.* names stay valid)
from .observe import step_stats

log = logging.getLogger("trainlib")

LOG_LENGTH = 64
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
        "avg": None}  # avg is sum then divide: gloo has no AVG op


@dataclass
class CollectiveRecord:
    seq: int
    op: str
    shape: tuple
    dtype: str
    group: tuple[int, ...] | None
    started: float = field(default_factory=time.monotonic)
    done: bool = False
    peer: int | None = None   # send/recv: the other end (a global rank)

    def describe(self) -> str:
        g = "world" if self.group is None else f"ranks {list(self.group)}"
        return f"{self.op} #{self.seq} (shape {list(self.shape)}, {self.dtype}, {g})"


_log: collections.deque[CollectiveRecord] = collections.deque(maxlen=LOG_LENGTH)
_seq = 0


def recent_collectives() -> list[CollectiveRecord]:
    """The last LOG_LENGTH collectives this rank entered, oldest first."""
    return list(_log)


def progress() -> dict[str, int | str | None]:
    """This rank's place in its collectives, for the heartbeat (trainlib.liveness): the newest one
    entered (seq, op) and the oldest one not finished yet (pending_seq, pending_op; None if none)."""
    recs = list(_log)   # one C-level copy under the GIL: safe against the training thread appending
    newest = recs[-1] if recs else None
    pending = next((r for r in recs if not r.done), None)
    return {"seq": _seq, "op": newest.op if newest else "",
            "pending_seq": pending.seq if pending else None, "pending_op": pending.op if pending else None}


def probe_peers(ranks: list[int] | None = None, seq: int | None = None) -> liveness.Probe | None:
    """Which of `ranks` (default: the world) stopped answering, exited, or is alive but not inside
    collective `seq`: read from their heartbeats in the job's store, watching them for up to ~2H
    (H = timeout/8, at most 2 s). None without a heartbeat (single process, or no store).
    A CollectiveTimeout calls this itself and appends `Probe.describe()` to its message."""
    if ranks is None:
        ranks = list(range(dist.get_world_size())) if dist.is_initialized() else [0]
    return liveness.probe(ranks, _rank(), seq)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _record(op: str, t: torch.Tensor | None, group) -> CollectiveRecord:
    global _seq
    _seq += 1
    ranks = None
    if group is not None and group is not dist.group.WORLD:
        ranks = tuple(dist.get_process_group_ranks(group))
    rec = CollectiveRecord(_seq, op, tuple(t.shape) if t is not None else (), str(t.dtype) if t is not None else "-", ranks)
    _log.append(rec)
    if t is not None and not op.startswith(("send", "recv")) and os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        _check_same_everywhere(rec, t, group)
    return rec


DEBUG_ENV = "TRAINLIB_DEBUG_COLLECTIVES"
_MAX_DIMS = 6


def _descriptor(rec: CollectiveRecord, t: torch.Tensor) -> list[int]:
    shape = list(t.shape)
    dims = shape[:_MAX_DIMS] + [-1] * (_MAX_DIMS - len(shape[:_MAX_DIMS]))
    return [rec.seq, zlib.crc32(rec.op.encode()), zlib.crc32(str(t.dtype).encode()), len(shape),
            zlib.crc32(repr(shape).encode()), *dims]


def _check_same_everywhere(rec: CollectiveRecord, t: torch.Tensor, group) -> None:
    """Debug mode: all-gather (op, dtype, shape) before the real collective and compare.

    gloo reports a size mismatch by aborting the receiving process from a background thread (or
    hangs until the timeout), so without this check the mismatch is found late and unnamed; the
    price is one small extra all-gather per collective, hence opt-in."""
    mine = torch.tensor(_descriptor(rec, t), dtype=torch.int64, device=t.device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    Handle(dist.all_gather(out, mine, group=group, async_op=True), rec).wait()
    rec.done = False
    rows = [o.cpu().tolist() for o in out]
    if all(r[1:] == rows[0][1:] for r in rows):
        return
    ranks = list(rec.group) if rec.group is not None else list(range(len(rows)))
    names = {zlib.crc32(r.op.encode()): r.op for r in _log}
    desc = "; ".join(f"rank {ranks[i]}: {names.get(r[1], 'another collective')} #{r[0]} shape "
                     f"{r[5:5 + min(r[3], _MAX_DIMS)]}{'...' if r[3] > _MAX_DIMS else ''} "
                     f"{_DTYPES.get(r[2], 'an unusual dtype')}" for i, r in enumerate(rows))
    raise CollectiveMismatch(f"rank {_rank()}: {rec.describe()} does not match the other ranks: {desc}. "
                             "Every rank must enter the same collectives in the same order with the same "
                             "shapes and dtypes.")


_DTYPES = {zlib.crc32(str(d).encode()): str(d) for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64)}


class Handle:
    """An in-flight collective. `wait()` blocks at most `timeout_s`, then raises CollectiveTimeout.

    While a step is measured (observe/step_stats.py) it also stamps when the transfer was in
    flight (launch to the backend's completion callback) and how long the caller blocked in wait()."""

    def __init__(self, work, rec: CollectiveRecord, after=None):
        self._work, self.record, self._after = work, rec, after
        self._blocking = False   # waited right after launch: the caller blocked from the launch on
        self._obs = obs = step_stats._active
        if obs is not None and work is not None:
            self._t0 = time.perf_counter()
            self._stamped = _stamp_completion(work, obs, self._t0)

    def wait(self, timeout_s: float | None = None) -> None:
        timeout_s = runtime.timeout_s(timeout_s)
        if self._work is not None:
            obs = self._obs
            t_wait = (self._t0 if self._blocking else time.perf_counter()) if obs is not None else 0.0
            try:
                ok = self._work.wait(datetime.timedelta(seconds=timeout_s))
            except Exception as e:  # gloo raises on timeout or on a peer that closed its connection
                raise _timeout_error(self.record, timeout_s, e) from e
            if ok is False:
                raise _timeout_error(self.record, timeout_s, None)
            self._work = None
            if obs is not None:
                t = time.perf_counter()
                obs.blocked_on(t_wait, t)
                if not self._stamped:
                    obs.transfer(self._t0, t)
        self.record.done = True
        if self._after is not None:
            self._after()
            self._after = None

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()


def _block(h: Handle) -> None:
    """Wait for a collective the caller launched synchronously."""
    h._blocking = True
    h.wait()


def _stamp_completion(work, obs, t0: float) -> bool:
    """Have the backend stamp the transfer's end when it completes (gloo/NCCL futures); False when
    it cannot (then wait() stamps it: an upper bound)."""
    works = work.works if isinstance(work, _Works) else [work]
    try:
        futures = [w.get_future() for w in works]
    except (AttributeError, RuntimeError):
        return False
    for fut in futures:
        fut.add_done_callback(lambda _f: obs.transfer(t0, time.perf_counter()))
    return True


def _sent(group, nbytes: float) -> None:
    """Count bytes this rank sends on `group` toward the step being measured (if any)."""
    obs = step_stats._active
    if obs is not None:
        obs.add_group_bytes(group, nbytes)


def _ring(group, t: torch.Tensor, factor_num: int, per_rank: bool) -> None:
    """Bytes a ring moves per rank: all-reduce 2(n-1)/n x B (factor 2), reduce-scatter and
    all-gather (n-1)/n x B of the full buffer (factor 1)."""
    if step_stats._active is None:
        return
    n = dist.get_world_size(group)
    nbytes = t.numel() * t.element_size() * (n if per_rank else 1)
    _sent(group, factor_num * (n - 1) * nbytes / n)


def _timeout_error(rec: CollectiveRecord, timeout_s: float, cause: Exception | None) -> CollectiveTimeout:
    pending = [r.describe() for r in _log if not r.done and r is not rec][-3:]
    msg = (f"rank {_rank()}: {rec.describe()} did not complete within {timeout_s:.0f}s"
           f"{f' ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})' if cause else ''}. "
           "A peer died, was stopped, skipped this collective or sent a different shape/dtype; "
           "check the other ranks' logs for the same sequence number.")
    if pending:
        msg += f" Other unfinished collectives here: {'; '.join(pending)}."
    return CollectiveTimeout(msg + _peers_story(rec))


def _peers_story(rec: CollectiveRecord) -> str:
    """Which peer the collective lost, from the heartbeats (a few seconds at most); "" if unknown."""
    try:
        if rec.peer is not None:
            probe = liveness.probe([rec.peer], _rank())
        else:
            ranks = list(rec.group) if rec.group is not None else list(range(dist.get_world_size()))
            probe = liveness.probe(ranks, _rank(), rec.seq)
    except Exception as e:  # the diagnosis must never hide the timeout itself
        log.debug("peer liveness probe failed: %s", e)
        return ""
    return f" {probe.describe()}" if probe is not None else ""


def all_reduce(t: torch.Tensor, op: str = "sum", group=None, async_op: bool = False) -> Handle | None:
    """In-place all-reduce. op: sum | avg | max | min."""
    if op not in _OPS:
        raise ValueError(f"all_reduce op {op!r} is not one of {', '.join(_OPS)}")
    rec = _record(f"all_reduce[{op}]", t, group)
    after = None
    if op == "avg":
        n = dist.get_world_size(group)
        after = lambda: t.div_(n)  # noqa: E731
    _ring(group, t, 2, per_rank=False)
    work = dist.all_reduce(t, op=_OPS[op] or dist.ReduceOp.SUM, group=group, async_op=True)
    h = Handle(work, rec, after)
    if async_op:
        return h
    _block(h)
    return None


def broadcast(t: torch.Tensor, src: int, group=None, async_op: bool = False) -> Handle | None:
    """src is a global rank, as in torch.distributed."""
    if step_stats._active is not None and dist.get_rank() == src:
        _sent(group, t.numel() * t.element_size())
    h = Handle(dist.broadcast(t, src=src, group=group, async_op=True), _record(f"broadcast[src={src}]", t, group))
    if async_op:
        return h
    _block(h)
    return None


def all_gather(out: list[torch.Tensor], t: torch.Tensor, group=None) -> None:
    _ring(group, t, 1, per_rank=True)
    _block(Handle(dist.all_gather(out, t, group=group, async_op=True), _record("all_gather", t, group)))


def reduce_scatter(out: torch.Tensor, parts: list[torch.Tensor], group=None) -> None:
    """out = sum over the group's ranks of their parts[my index in the group].

    A backend without reduce_scatter (older gloo) gets an all-reduce of the concatenation and keeps
    this rank's slice: same result, twice the traffic."""
    rec = _record("reduce_scatter", out, group)
    _ring(group, out, 1, per_rank=True)
    try:
        work = dist.reduce_scatter(out, parts, group=group, async_op=True)
    except (RuntimeError, NotImplementedError):  # "does not support reduce_scatter"
        rec.op = "reduce_scatter[via all_reduce]"
        flat = torch.cat([p.reshape(-1) for p in parts])
        _block(Handle(dist.all_reduce(flat, group=group, async_op=True), rec))
        i = dist.get_rank(group)
        out.copy_(flat[i * out.numel():(i + 1) * out.numel()].view_as(out))
        return
    _block(Handle(work, rec))


# torch >= 2.12 renamed the flat-tensor collectives (*_single) and deprecated all_gather_into_tensor
_RS_FLAT = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_AG_FLAT = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# How gloo runs the flat collectives: (below GLOO_P2P_MIN_BYTES of flat tensor, at or above it).
# Measured on 2 ranks here (torch 2.13, medians of alternating reps): gloo's own reduce_scatter_tensor
# takes 2-3x an all-reduce of the whole buffer at every size, so reduce-scatter is an all-reduce
# below the threshold; point-to-point (each chunk sent straight to its owner) costs ~0.8-1x an
# all-reduce from 4 MB up but has a ~5 ms floor below 1 MB, where gloo's all-gather is quicker.
GLOO_IMPL = {"reduce_scatter": ("all_reduce", "p2p"), "all_gather": ("native", "p2p")}
GLOO_P2P_MIN_BYTES = 4 << 20
# backend name -> {"reduce_scatter", "all_gather"} it turned out not to have natively
_LACKS: dict[str, set[str]] = {}
_P2P_TAG_BASE = 1 << 20   # above the tags the pipeline's send/recv use
_p2p_seq: dict[int, int] = {}   # id(process group) -> point-to-point flat collectives started on it


def _impl(op: str, backend: str, nbytes: int) -> str:
    """native | p2p | all_reduce (reduce-scatter) | list (all-gather): how to run `op` here."""
    if backend == "gloo":
        impl = GLOO_IMPL[op][nbytes >= GLOO_P2P_MIN_BYTES]
    else:
        impl = "native"
    if impl == "native" and op in _LACKS.get(backend, ()):
        return "all_reduce" if op == "reduce_scatter" else "list"
    return impl


def _chunk_of(out: torch.Tensor, inp: torch.Tensor, n: int, i: int) -> bool:
    """Whether `out` is exactly chunk i of inp.view(n, -1) in memory (the in-place form)."""
    return (out.is_contiguous() and inp.is_contiguous() and out.dtype == inp.dtype
            and out.data_ptr() == inp.data_ptr() + i * out.numel() * out.element_size())


def _check_flat(name: str, chunk: torch.Tensor, flat: torch.Tensor, n: int) -> None:
    if flat.numel() != n * chunk.numel() or chunk.dtype != flat.dtype or chunk.device != flat.device:
        raise ValueError(f"{name}: a chunk of {chunk.numel()} x {chunk.dtype} on {chunk.device} and a flat tensor of "
                         f"{flat.numel()} x {flat.dtype} on {flat.device} do not fit a group of {n} ranks: the flat "
                         f"tensor must hold {n} x the chunk's elements, with the same dtype and device")
    if not flat.is_contiguous():
        raise ValueError(f"{name}: the flat tensor (shape {list(flat.shape)}) must be contiguous; pass .contiguous()")


def _unsupported(e: Exception) -> bool:
    # torch's Backend base class: "Backend gloo does not support _reduce_scatter_base"
    return isinstance(e, NotImplementedError) or "does not support" in str(e) or "not supported" in str(e)


class _Works:
    """Several in-flight works (the point-to-point sends and receives of one collective) as one."""

    def __init__(self, works: list):
        self.works = works

    def wait(self, timeout: datetime.timedelta) -> bool:
        deadline = time.monotonic() + timeout.total_seconds()
        for w in self.works:
            left = max(deadline - time.monotonic(), 0.001)
            if w.wait(datetime.timedelta(seconds=left)) is False:
                return False
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)


def _p2p_plan(group) -> tuple[list[int], int, int]:
    """(the group's global ranks, this rank's index, a tag no other flat collective in flight on
    this group uses: every member calls them in one order, so their counters agree). Counted per
    group object, not per rank set: two groups of the same ranks (hierarchical's cross-node group
    with one rank per node) may be driven from two threads."""
    group = group if group is not None else dist.group.WORLD
    ranks = dist.get_process_group_ranks(group)
    key = id(group)
    _p2p_seq[key] = _p2p_seq.get(key, 0) + 1
    return ranks, ranks.index(dist.get_rank()), _P2P_TAG_BASE + _p2p_seq[key] % (1 << 20)


def reduce_scatter_tensor(out: torch.Tensor, inp: torch.Tensor, group=None, async_op: bool = False) -> Handle | None:
    """out = SUM over the group's ranks of their inp.view(n, -1)[i], i = this rank's index in the group.

    `out` may be inp's own chunk i (then inp's other chunks are unspecified afterwards). NCCL runs
    that in place (ncclReduceScatter allows recvbuff == sendbuff + i * count); gloo as GLOO_IMPL
    says; other backends reduce into a temporary chunk copied into `out` on wait(). A backend
    without reduce-scatter gets an all-reduce of inp, keeping chunk i."""
    n, i = dist.get_world_size(group), dist.get_rank(group)
    _check_flat("reduce_scatter_tensor", out, inp, n)
    rec = _record("reduce_scatter_tensor", inp, group)
    backend = dist.get_backend(group)
    in_place = _chunk_of(out, inp, n, i)
    impl = _impl("reduce_scatter", backend, inp.numel() * inp.element_size())
    _ring(group, inp, 2 if impl == "all_reduce" else 1, per_rank=False)   # the all-reduce form moves twice as much
    if impl == "p2p":
        return _finish(_reduce_scatter_p2p(out, inp, group, rec, in_place), async_op)
    if impl == "native":
        dst = out if in_place and backend == "nccl" else torch.empty_like(out)
        try:
            work = _RS_FLAT(dst, inp, group=group, async_op=True)
        except (RuntimeError, NotImplementedError) as e:
            if not _unsupported(e):
                raise
            _LACKS.setdefault(backend, set()).add("reduce_scatter")
            log.debug("%s has no reduce_scatter_tensor (%s); using all-reduce then keeping the chunk", backend, e)
        else:
            return _finish(Handle(work, rec, None if dst is out else (lambda: out.copy_(dst))), async_op)
    return _finish(_reduce_scatter_via_all_reduce(out, inp, group, rec, in_place), async_op)


def _reduce_scatter_p2p(out: torch.Tensor, inp: torch.Tensor, group, rec: CollectiveRecord, in_place: bool) -> Handle:
    """Send chunk k to rank k, receive every peer's chunk i, sum them on wait() (own chunk first,
    then the peers in group order: the same float on every run)."""
    rec.op = "reduce_scatter_tensor[p2p]"
    ranks, i, tag = _p2p_plan(group)
    rows = inp.view(len(ranks), -1)
    peers = [k for k in range(len(ranks)) if k != i]
    got = {k: torch.empty_like(rows[i]) for k in peers}
    works = [_p2p(rec, dist.irecv, got[k], src=ranks[k], group=group, tag=tag) for k in peers]
    works += [_p2p(rec, dist.isend, rows[k], dst=ranks[k], group=group, tag=tag) for k in peers]

    def after() -> None:
        acc = rows[i] if in_place else out.copy_(rows[i].view_as(out))
        for k in peers:
            acc.add_(got[k].view_as(acc))
    return Handle(_Works(works), rec, after)


def _reduce_scatter_via_all_reduce(out: torch.Tensor, inp: torch.Tensor, group, rec: CollectiveRecord,
                                   in_place: bool) -> Handle:
    """All-reduce inp (a copy, unless in place) and keep chunk i: for gloo's small buffers, and for
    a backend without reduce-scatter."""
    rec.op = "reduce_scatter_tensor[via all_reduce]"
    n, i = dist.get_world_size(group), dist.get_rank(group)
    buf = inp if in_place else inp.clone()
    after = None if in_place else (lambda: out.copy_(buf.view(n, -1)[i].view_as(out)))
    return Handle(dist.all_reduce(buf, group=group, async_op=True), rec, after)


def all_gather_into_tensor(out: torch.Tensor, inp: torch.Tensor, group=None, async_op: bool = False) -> Handle | None:
    """out.view(n, -1)[k] = rank k's inp, for every rank k of the group.

    `inp` may be out's own chunk i (in place): NCCL runs that form directly; gloo as GLOO_IMPL says;
    other backends send a copy of the chunk. A backend without the flat form falls back to list
    all_gather into out's chunks."""
    n, i = dist.get_world_size(group), dist.get_rank(group)
    _check_flat("all_gather_into_tensor", inp, out, n)
    rec = _record("all_gather_into_tensor", inp, group)
    backend = dist.get_backend(group)
    in_place = _chunk_of(inp, out, n, i)
    impl = _impl("all_gather", backend, out.numel() * out.element_size())
    _ring(group, out, 1, per_rank=False)
    if impl == "p2p":
        return _finish(_all_gather_p2p(out, inp, group, rec, in_place), async_op)
    src = inp if backend == "nccl" or not in_place else inp.clone()
    if impl == "native":
        try:
            return _finish(Handle(_AG_FLAT(out, src, group=group, async_op=True), rec), async_op)
        except (RuntimeError, NotImplementedError) as e:
            if not _unsupported(e):
                raise
            _LACKS.setdefault(backend, set()).add("all_gather")
            log.debug("%s has no all_gather_into_tensor (%s); using list all_gather", backend, e)
    return _finish(_all_gather_via_list(out, src, group, rec), async_op)


def _all_gather_p2p(out: torch.Tensor, inp: torch.Tensor, group, rec: CollectiveRecord, in_place: bool) -> Handle:
    """Send this rank's chunk to every peer, receive theirs straight into place."""
    rec.op = "all_gather_into_tensor[p2p]"
    ranks, i, tag = _p2p_plan(group)
    rows = out.view(len(ranks), -1)
    if not in_place:
        rows[i].copy_(inp.reshape(-1))
    peers = [k for k in range(len(ranks)) if k != i]
    works = [_p2p(rec, dist.irecv, rows[k], src=ranks[k], group=group, tag=tag) for k in peers]
    works += [_p2p(rec, dist.isend, rows[i], dst=ranks[k], group=group, tag=tag) for k in peers]
    return Handle(_Works(works), rec)


def _all_gather_via_list(out: torch.Tensor, src: torch.Tensor, group, rec: CollectiveRecord) -> Handle:
    """For a backend without the flat form: list all_gather into views of out's chunks."""
    rec.op = "all_gather_into_tensor[via all_gather]"
    n = dist.get_world_size(group)
    chunks = list(out.view(n, -1).unbind(0))
    return Handle(dist.all_gather(chunks, src.reshape(-1), group=group, async_op=True), rec)


def _finish(h: Handle, async_op: bool) -> Handle | None:
    if async_op:
        return h
    _block(h)
    return None


_SUBGROUPS: dict[tuple, tuple[object, object]] = {}


def subgroups(partition: list[list[int]], parent, timeout_s: float | None = None, backend: str = "gloo"):
    """Process groups for `partition` (disjoint lists of global ranks covering `parent`'s ranks),
    collective over `parent`; returns the one holding this rank.

    When `parent` spans the world, every rank creates every group in one order: new_group's
    documented contract. Otherwise (a dp axis inside a larger mesh) the ranks outside `parent` are
    busy elsewhere, so each group is made by its members alone (use_local_synchronization). torch
    names such a group by its ranks and the count of groups each member already has, so its members
    must have created equally many groups before; trainlib's groups (Mesh, these) keep that.
    Cached per partition (and default group), so all of `parent` hits or misses together: a second
    DataParallel over the same layout reuses the groups."""
    world, me = dist.group.WORLD, dist.get_rank()
    everyone = dist.get_world_size(parent) == dist.get_world_size()
    key = (everyone, tuple(sorted(tuple(sorted(r)) for r in partition)))
    hit = _SUBGROUPS.get(key)
    if hit is not None and hit[0] is world:
        return hit[1]
    timeout = datetime.timedelta(seconds=runtime.timeout_s(timeout_s))
    mine = None
    for ranks in key[1]:
        if everyone or me in ranks:
            g = dist.new_group(list(ranks), timeout=timeout, backend=backend, use_local_synchronization=not everyone)
            if me in ranks:
                mine = g
    if mine is None:
        raise ValueError(f"rank {me} is in none of the groups {partition}")
    _SUBGROUPS[key] = (world, mine)
    return mine


def barrier(group=None) -> None:
    # a 1-element all-reduce: gloo's barrier has no per-call timeout
    all_reduce(torch.zeros(1), group=group)


def isend(t: torch.Tensor, dst: int, group=None, tag: int = 0) -> Handle:
    rec = _record(f"send[to={dst}]", t, group)
    rec.peer = dst   # bytes: counted by the caller, which knows the axis (the pipeline: pp)
    return Handle(_p2p(rec, dist.isend, t, dst=dst, group=group, tag=tag), rec)


def irecv(t: torch.Tensor, src: int, group=None, tag: int = 0) -> Handle:
    rec = _record(f"recv[from={src}]", t, group)
    rec.peer = src
    return Handle(_p2p(rec, dist.irecv, t, src=src, group=group, tag=tag), rec)


def _p2p(rec: CollectiveRecord, launch, *args, **kwargs):
    """Post a point-to-point transfer. gloo raises at the post itself, not at wait(), when the peer
    already closed its connection: that is the same lost peer a wait() reports, so the same error."""
    try:
        return launch(*args, **kwargs)
    except RuntimeError as e:
        raise _timeout_error(rec, runtime.timeout_s(None), e) from e


def send(t: torch.Tensor, dst: int, group=None, tag: int = 0) -> None:
    isend(t, dst, group, tag).wait()


def recv(t: torch.Tensor, src: int, group=None, tag: int = 0) -> None:
    irecv(t, src, group, tag).wait()
