"""Where one training step's time goes, measured by the runtime itself.

    stats = pm.last_step_stats()          # ParallelModel (tl.parallelize) or tl.DataParallel
    stats.sync_wait_s, stats.bytes_by_axis["dp"], stats.overlap, stats.as_dict()

How it is measured (cheap enough to leave on; nothing at all runs while no step is measured):
  phases    the step thread is always in exactly one phase -- forward, backward, sync_wait,
            optimizer, data, bubble, other -- and a phase switch is one perf_counter() stamp that
            closes the previous phase. Phases nest (the exposed sync wait runs inside
            loss.backward(), the pipeline's receive waits inside its forward/backward actions),
            the inner phase pausing the outer one, so the parts add up to the step by construction.
  sync wait the time the step thread blocked on gradient buckets after its backward was done
            (DataParallel's end-of-backward wait): communication that was NOT hidden behind backward.
  bubble    pipeline time spent waiting for a peer stage's activation or gradient, the flush's
            send completions and the loss broadcast, per stage held by this rank.
  bytes     bytes this rank SENT per mesh axis, counted where trainlib launches the transfer:
            collectives in comm.py by the busbw convention of a ring (all-reduce 2(n-1)/n x the
            buffer, reduce-scatter and all-gather (n-1)/n x the full buffer, broadcast the buffer
            from its source), the same formula for the shm/MPI transports that move the same data,
            the pipeline's point-to-point sends as their size, and the parameter-server pushes as
            their payload (axis "ps").
  comm time the union of the intervals in which at least one transfer was in flight (launch to
            completion, stamped by the transport's completion callback or worker thread);
            overlap = hidden / total = 1 - exposed / total, exposed being the sync wait plus the
            time the step thread blocked inside a collective (tensor-parallel all-reduces).
  memory    peak since the last reset_peak_memory(): torch.cuda.max_memory_allocated() on GPU,
            the process's RSS high-water mark (VmHWM, reset through /proc/self/clear_refs) on CPU.
"""
from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass, field

PHASES = ("forward", "backward", "sync_wait", "optimizer", "data", "bubble", "other")
AXES = ("dp", "tp", "pp", "ps")


@dataclass(frozen=True)
class StepStats:
    """One step on one rank. Times in seconds; the seven parts sum to step_s."""

    step_s: float
    forward_s: float
    backward_s: float
    sync_wait_s: float
    optimizer_s: float
    data_s: float
    bubble_s: float
    other_s: float
    bytes_by_axis: dict[str, int] = field(default_factory=dict)   # bytes this rank sent, per mesh axis
    comm_s: float = 0.0             # time with at least one transfer in flight
    exposed_comm_s: float = 0.0     # of which the step thread waited (not hidden behind compute)
    mem_peak_bytes: int = 0
    bubble_by_stage: dict[int, float] = field(default_factory=dict)

    @property
    def overlap(self) -> float:
        """Hidden / total communication time, 0..1 (0.0 when the step communicated nothing)."""
        if self.comm_s <= 0:
            return 0.0
        return max(0.0, min(1.0, 1.0 - self.exposed_comm_s / self.comm_s))

    @property
    def bw_gbps(self) -> float:
        """Achieved bandwidth: bytes sent over the communication time, in Gbit/s."""
        sent = sum(self.bytes_by_axis.values())
        return sent * 8 / self.comm_s / 1e9 if self.comm_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        """Flat numeric keys, the names the trainer's metrics records use (t_*_s, bytes_<axis>, ...)."""
        out: dict[str, float | int] = {f"t_{p}_s": getattr(self, f"{p}_s") for p in ("step", *PHASES)}
        out.update({f"bytes_{a}": int(self.bytes_by_axis.get(a, 0)) for a in AXES})
        out.update(comm_s=self.comm_s, exposed_comm_s=self.exposed_comm_s, bw_gbps=self.bw_gbps,
                   overlap=self.overlap, mem_peak_bytes=self.mem_peak_bytes)
        return out


# Threads that run collectives for the step thread (the shm transport's worker): time they spend
# blocked is communication in flight, not the step waiting.
_background: set[int] = set()


def register_background_thread() -> None:
    _background.add(threading.get_ident())


class StepRecorder:
    """Collects one step's phases, bytes and transfer intervals; finish() turns them into StepStats."""

    def __init__(self, axes: dict[int, str]):
        self.axes = axes                       # id(process group) -> mesh axis name
        self.t0 = self.last = time.perf_counter()
        self.stack: list[str] = ["other"]
        self.stages: list[int | None] = [None]
        self.acc = dict.fromkeys(PHASES, 0.0)
        self.bubble: dict[int, float] = {}
        self.bytes = dict.fromkeys(AXES, 0)
        self.intervals: list[tuple[float, float]] = []
        self.blocked = 0.0
        self.stage: int | None = None          # the pipeline stage the step thread works on now

    # ---- phases (step thread) ---------------------------------------------------------------
    def push(self, phase: str, stage: int | None = None) -> None:
        t = time.perf_counter()
        self._close(t)
        self.stack.append(phase)
        self.stages.append(stage)

    def switch(self, phase: str) -> None:
        """Leave the current phase for `phase` at the same nesting level."""
        self._close(time.perf_counter())
        self.stack[-1] = phase

    def pop(self) -> None:
        self._close(time.perf_counter())
        self.stack.pop()
        self.stages.pop()

    def _close(self, t: float) -> None:
        dt = t - self.last
        phase = self.stack[-1]
        self.acc[phase] += dt
        if phase == "bubble":
            stage = self.stages[-1] if self.stages[-1] is not None else -1
            self.bubble[stage] = self.bubble.get(stage, 0.0) + dt
        self.last = t

    # ---- communication (any thread) ---------------------------------------------------------
    def add_bytes(self, axis: str, n: float) -> None:
        self.bytes[axis] += int(n)

    def add_group_bytes(self, group, n: float) -> None:
        """Bytes sent on a process group; groups of no mesh axis (or of size 1) are not counted."""
        axis = self.axes.get(id(group))
        if axis is not None:
            self.bytes[axis] += int(n)

    def transfer(self, t0: float, t1: float) -> None:
        """A transfer was in flight from t0 to t1 (perf_counter). list.append is atomic: any thread."""
        self.intervals.append((t0, t1))

    def blocked_on(self, t0: float, t1: float) -> None:
        """The calling thread waited for a collective from t0 to t1: exposed if it is the step's."""
        if threading.get_ident() in _background or self.stack[-1] in ("sync_wait", "bubble"):
            return
        self.blocked += t1 - t0

    # ---- result -----------------------------------------------------------------------------
    def finish(self) -> StepStats:
        end = time.perf_counter()
        self._close(end)
        comm_s = _union(self.intervals, self.t0, end)
        exposed = min(comm_s, self.acc["sync_wait"] + self.blocked)
        a = self.acc
        return StepStats(step_s=end - self.t0, forward_s=a["forward"], backward_s=a["backward"],
                         sync_wait_s=a["sync_wait"], optimizer_s=a["optimizer"], data_s=a["data"],
                         bubble_s=a["bubble"], other_s=a["other"], bytes_by_axis=dict(self.bytes), comm_s=comm_s,
                         exposed_comm_s=exposed, mem_peak_bytes=peak_memory(), bubble_by_stage=dict(self.bubble))


def _union(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of the intervals, clipped to [lo, hi]."""
    total, cur_a, cur_b = 0.0, None, None
    for a, b in sorted(intervals):
        a, b = max(a, lo), min(b, hi)
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


# ---- the step being measured (one per process: comm.py and the transports find it here) -------
_active: StepRecorder | None = None


def active() -> StepRecorder | None:
    """The recorder of the step being measured on this process, or None (then record nothing)."""
    return _active


def axes_of(mesh) -> dict[int, str]:
    """id(process group) -> axis name for `mesh`'s axes that have more than one rank."""
    out: dict[int, str] = {}
    if mesh is None:
        return out
    import torch.distributed as dist

    for axis in ("dp", "tp", "pp"):
        if mesh.size(axis) > 1:
            g = mesh.group(axis)
            out[id(g)] = axis
            if g is dist.group.WORLD:
                out[id(None)] = axis   # comm.py calls with group=None mean the world
    return out


def open_step(axes: dict[int, str]) -> StepRecorder | None:
    """Start measuring a step, unless one is being measured already (an outer caller, e.g. the
    trainer, owns it: then None, and the caller must not close it)."""
    global _active
    if _active is not None:
        return None
    _active = StepRecorder(axes)
    return _active


def close_step(rec: StepRecorder) -> StepStats:
    global _active
    if _active is rec:
        _active = None
    return rec.finish()


def abandon_step() -> None:
    """Forget the step being measured (an exception left it open)."""
    global _active
    _active = None


# ---- phases and named ranges ------------------------------------------------------------------
# Set by trainlib.observe.profile while a torch profiler trace is recording: only then do the
# phases below also open torch.profiler.record_function ranges (which cost even without a profiler).
_tracing = False


def set_tracing(on: bool) -> None:
    global _tracing
    _tracing = on


class _Null:
    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


_NULL = _Null()


class _Phase:
    __slots__ = ("rec", "phase", "label", "stage", "rf")

    def __init__(self, rec: StepRecorder | None, phase: str | None, label: str, stage: int | None):
        self.rec, self.phase, self.label, self.stage, self.rf = rec, phase, label, stage, None

    def __enter__(self):
        if self.rec is not None and self.phase is not None:
            self.rec.push(self.phase, self.stage)
        if _tracing:
            import torch

            self.rf = torch.autograd.profiler.record_function(self.label)
            self.rf.__enter__()
        return None

    def __exit__(self, *exc) -> None:
        if self.rf is not None:
            self.rf.__exit__(*exc)
        if self.rec is not None and self.phase is not None:
            self.rec.pop()


def phase(name: str | None, label: str | None = None, stage: int | None = None):
    """`with phase("backward"):` -- the step thread is in phase `name` (None: no phase change,
    only a named range in a trace). `label` names the trace range (default trainlib.<name>)."""
    rec = _active
    if rec is None and not _tracing:
        return _NULL
    return _Phase(rec, name, label or f"trainlib.{name}", stage)


def traced(label: str):
    """A named range in a torch profiler trace while one is recording; nothing otherwise."""
    if not _tracing:
        return _NULL
    return _Phase(None, None, label, None)


# ---- memory ---------------------------------------------------------------------------------------
def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def peak_memory() -> int:
    """Peak bytes since the last reset_peak_memory(): the CUDA allocator's on GPU, RSS on CPU."""
    if _on_cuda():
        import torch

        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # no procfs (macOS): ru_maxrss is the whole life's peak (bytes there, KiB on Linux)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if os.uname().sysname == "Darwin" else rss * 1024)


def reset_peak_memory() -> None:
    """Start a new peak window (the trainer calls this at each log window)."""
    if _on_cuda():
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:  # "5" resets the RSS high-water mark only (Linux >= 4.0, proc(5))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
