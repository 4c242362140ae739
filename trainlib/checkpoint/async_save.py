"""Asynchronous checkpoint saves: copy the state to host memory, return, write in the background.

    writer = CheckpointWriter(D, keep=3)                 # collective: makes the writer's gloo group
    for step in ...:
        ...; opt.step()
        if step % every == 0:
            writer.save(step, state, layout=lay)         # blocks only for the copy to host memory
    writer.close()                                       # waits; raises a failed background write

What the training loop pays is one memcpy of its state into buffers the writer keeps from one
save to the next (fresh buffers would cost a page fault per 4 KiB, about as much again as the
copy). With `until=optimizer`, not even that: the optimizer's parameters and state change only in
its step(), so their copy runs on the background thread during the next forward and backward, and
a step pre-hook holds the optimizer until it is done (CheckFreq's pipelined snapshot, Mohan et al.,
FAST 2021); everything else (buffers, RNG, sampler) is copied at once. The contract: nothing
changes those tensors in place between save() and the optimizer's next step() — true for the
trainer, not for a parameter server in async mode, which pulls fresh weights before the step. The background thread then runs store.write_flat — the same atomic, checksummed recipe,
the same manifest and layouts as a synchronous save — so a SIGKILL during the background write
leaves the previous checkpoint as `latest`, exactly as a kill inside a synchronous save does.

At most one save is in flight: save() first waits for the previous one. A failure of the
background write is kept and raised by the next save(), wait() or close(), on every rank (the
recipe's collectives tell each rank whether the others succeeded), never dropped.

Why a group of its own: the background write needs collectives (rank 0 may only write the
manifest once every rank's files are durable, and it needs their sha256s). Running them on the
training's group from a second thread would interleave with the training's own collectives in a
different order on different ranks — a deadlock or crossed messages. A separate gloo group,
created collectively with the writer, has its own connections and its own order; gloo runs on
CPU, so it also works beside NCCL training. Its collectives stay out of comm's log on purpose:
that log's sequence numbers are compared across ranks to diagnose the training's timeouts.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import queue
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from . import rng
from .backends import open_storage
from .store import CheckpointError, Collectives, _where, check_save_args, write_flat
from .tree import flatten

log = logging.getLogger("trainlib")

__all__ = ["CheckpointWriter", "writer_for", "close_writers"]


class _WriterGroup(Collectives):
    """A gloo group used only by the writer's background thread; every wait has a timeout."""

    def __init__(self, world_size: int, timeout_s: float):
        self.world_size, self.timeout_s, self.seq = world_size, timeout_s, 0
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def all_gather(self, out: list[torch.Tensor], t: torch.Tensor) -> None:
        self.seq += 1
        what = f"checkpoint writer all_gather #{self.seq} (shape {list(t.shape)}, {t.dtype})"
        try:
            ok = dist.all_gather(out, t, group=self.group, async_op=True).wait(
                datetime.timedelta(seconds=self.timeout_s))
        except Exception as e:  # gloo raises on timeout or on a peer that closed its connection
            raise CheckpointError(f"rank {dist.get_rank()}: {what} failed within {self.timeout_s:.0f}s "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); a peer died or "
                                  "stopped saving; its log says why") from e
        if ok is False:
            raise CheckpointError(f"rank {dist.get_rank()}: {what} did not complete within {self.timeout_s:.0f}s; "
                                  "a peer died or stopped saving")


def _timeout_s() -> float:
    from ..runtime import timeout_s

    return timeout_s()


class CheckpointWriter:
    """Asynchronous saves to `root` (a directory or s3://bucket/prefix). Collective to create (every
    rank, same order as its other process groups); then save() is collective like store.save."""

    def __init__(self, root: str | os.PathLike, *, keep: int = 3, save_rng: bool = True,
                 timeout_s: float | None = None):
        check_save_args(0, keep)
        self.root, self.keep, self.save_rng = str(root), keep, save_rng
        self.storage = open_storage(root)
        self.rank, self.world_size, collective = _where(None, None)
        self.timeout_s = _timeout_s() if timeout_s is None else timeout_s
        self.group = _WriterGroup(self.world_size, self.timeout_s) if collective else None
        self._buffers: dict[str, torch.Tensor] = {}
        self._pending: set[str] = set()
        # one worker thread for the writer's life: Thread.start() waits until the new thread runs,
        # which on a busy machine cost the caller a GIL switch interval or two (5-10 ms) per save
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._worker = threading.Thread(target=self._loop, name="trainlib-checkpoint-writer", daemon=True)
        # daemon: a process that dies mid-write must not linger in a collective; the write is
        # then simply lost, which the recipe makes safe (the previous `latest` stays)
        self._worker.start()
        self._error: BaseException | None = None
        self._step: int | None = None
        self.blocking_s = 0.0   # how long the last save() held the caller (copy + start)
        self.hook_wait_s = 0.0  # how long the optimizer step after the last save(until=) waited for its copy
        self.closed = False
        self._copied = threading.Event()
        self._copied.set()
        self._hooked: tuple[int, Any] | None = None   # (id(optimizer), hook handle)

    def _snapshot(self, tensors: dict[str, torch.Tensor], prune: bool = True) -> dict[str, torch.Tensor]:
        """Copy every tensor into this writer's host buffers (reused while shape and dtype match)."""
        out = {}
        for name, t in tensors.items():
            buf = self._buffers.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
                self._buffers[name] = buf
            buf.copy_(t, non_blocking=t.is_cuda)
            out[name] = buf
        if prune:  # buffers of tensors the state no longer has (the deferred ones come later)
            for name in set(self._buffers) - set(tensors) - self._pending:
                del self._buffers[name]
        if any(t.is_cuda for t in tensors.values()):
            torch.cuda.synchronize()  # the non_blocking copies must have landed before we return
        return out

    def save(self, step: int, state: dict[str, Any], *, layout: dict | None = None,
             until: torch.optim.Optimizer | None = None) -> None:
        """Snapshot `state` (and this rank's RNG states) and write checkpoint `step` in the background.
        Waits for the previous save first, and raises its failure if it had one. until: copy the
        tensors that are `until`'s parameters or state in the background too, before its next step()."""
        if self.closed:
            raise CheckpointError(f"CheckpointWriter for {self.root} is closed; make a new one")
        check_save_args(step, self.keep)
        self.wait()
        t0 = time.perf_counter()
        skeleton, tensors = flatten({"state": state, "rng": rng.capture() if self.save_rng else None})
        until = _torch_optimizer(until) if until is not None else None
        later = _owned_by(until, tensors) if until is not None else set()
        self._pending = later
        snap = self._snapshot({k: t for k, t in tensors.items() if k not in later})
        deferred = {k: tensors[k] for k in later}
        layout = json.loads(json.dumps(layout)) if layout is not None else None  # a copy, like the tensors
        self._step, self.hook_wait_s = step, 0.0
        if deferred:
            self._hook(until)
            self._copied.clear()
        self._idle.clear()
        self._jobs.put((step, skeleton, snap, deferred, layout))
        self.blocking_s = time.perf_counter() - t0

    def _hook(self, opt: torch.optim.Optimizer) -> None:
        if self._hooked is not None and self._hooked[0] == id(opt):
            return
        if self._hooked is not None:
            self._hooked[1].remove()
        self._hooked = (id(opt), opt.register_step_pre_hook(self._before_step))

    def _before_step(self, *_: Any) -> None:
        if self._copied.is_set():
            return
        t0 = time.perf_counter()
        if not self._copied.wait(self.timeout_s):
            raise CheckpointError(f"rank {self.rank}: the snapshot of step {self._step} for the background save "
                                  f"was not copied within {self.timeout_s:.0f}s; the machine is overloaded")
        self.hook_wait_s += time.perf_counter() - t0

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._write(*job)
            finally:
                self._idle.set()

    def _write(self, step: int, skeleton: dict, tensors: dict[str, torch.Tensor],
               deferred: dict[str, torch.Tensor], layout: dict | None) -> None:
        try:
            try:
                tensors = {**tensors, **self._snapshot(deferred, prune=False)}
            finally:
                self._copied.set()  # also on failure: the optimizer must not wait for a copy that never comes
            write_flat(self.storage, step, skeleton, tensors, keep=self.keep, rank=self.rank,
                       world_size=self.world_size, layout=layout, coll=self.group)
        except BaseException as e:  # kept for the training thread: raised at the next save/wait/close
            log.error("rank %d: background checkpoint save of step %d failed: %s", self.rank, step, e)
            self._error = e

    @property
    def in_flight(self) -> bool:
        return not self._idle.is_set()

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the save in flight (if any) is durable and `latest` names it; raise its failure."""
        limit = self.timeout_s * 2 if timeout_s is None else timeout_s
        if not self._idle.wait(limit):
            raise CheckpointError(f"rank {self.rank}: the background save of step {self._step} to {self.root} "
                                  f"did not finish within {limit:.0f}s; check the storage and the other ranks")
        err, self._error = self._error, None
        if err is not None:
            raise CheckpointError(f"rank {self.rank}: the background save of step {self._step} to {self.root} "
                                  f"failed: {err}") from err

    def close(self) -> None:
        """Wait for the save in flight and release the host buffers; raises a failed write."""
        if self.closed:
            return
        try:
            self.wait()
        finally:
            self.closed = True
            self._jobs.put(None)
            self._buffers.clear()
            if self._hooked is not None:
                self._hooked[1].remove()
                self._hooked = None

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # already failing: do not mask that error with the writer's
            try:
                self.close()
            except CheckpointError as e:
                log.error("%s", e)


def _torch_optimizer(opt) -> torch.optim.Optimizer:
    """The torch optimizer whose step() changes the state (tl.DistributedOptimizer wraps one)."""
    inner = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "inner", None)
    if not isinstance(inner, torch.optim.Optimizer):
        raise CheckpointError(f"save(until={type(opt).__name__}) needs a torch.optim.Optimizer (or a wrapper with "
                              "one as .inner); pass until=None to copy everything at once")
    return inner


def _owned_by(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Names of the flattened tensors that are `opt`'s parameters or state (same storage)."""
    live = {p.untyped_storage().data_ptr() for g in opt.param_groups for p in g["params"]}
    live |= {t.untyped_storage().data_ptr() for st in opt.state.values() for t in st.values()
             if isinstance(t, torch.Tensor)}
    return {k for k, t in tensors.items() if t.numel() and t.untyped_storage().data_ptr() in live}


_WRITERS: dict[tuple[str, int], CheckpointWriter] = {}


def writer_for(root: str | os.PathLike, keep: int) -> CheckpointWriter:
    """The trainer's writer for `root` (one per process and directory, created collectively on the
    first checkpoint step, which every rank reaches together)."""
    key = (str(root), keep)
    w = _WRITERS.get(key)
    if w is None or w.closed:
        w = _WRITERS[key] = CheckpointWriter(root, keep=keep)
    return w


def close_writers() -> None:
    """Wait for every trainer writer's save in flight (end of training); raises the first failure."""
    writers = list(_WRITERS.values())
    _WRITERS.clear()
    for w in writers:
        w.close()
