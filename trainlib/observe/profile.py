"""Traces on demand: `--profile.steps A:B` records a torch profiler Chrome trace of steps A..B.

    trainlib train --profile.steps 10:12 --profile.dir runs/profile
    # -> runs/profile/trace_rank0.json, trace_rank1.json, ...   (open in chrome://tracing or Perfetto)

Every rank writes its own file. While the trace records, trainlib's own regions appear as named
ranges next to torch's operators (step_stats.phase / traced open them only then, so they cost
nothing otherwise): trainlib.step#N, trainlib.data, trainlib.forward, trainlib.backward,
trainlib.optimizer, trainlib.bucket_launch, trainlib.bucket_wait, trainlib.ps_push,
trainlib.ps_pull, trainlib.pp.F / B / I / W (pipeline actions), trainlib.pp.recv_wait,
trainlib.pp.send_wait and trainlib.pp.loss_broadcast.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import step_stats

log = logging.getLogger("trainlib")


def trace_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"trace_rank{rank}.json"


class StepProfiler:
    """Starts torch.profiler before step `first` and writes the trace after step `last` (1-based)."""

    def __init__(self, first: int, last: int, directory: str | Path, rank: int):
        if not 1 <= first <= last:
            raise ValueError(f"profile steps {first}:{last}: need 1 <= A <= B (e.g. --profile.steps 10:12)")
        self.first, self.last, self.path = first, last, trace_path(directory, rank)
        self._prof = None
        self._step_range = None

    def before_step(self, step: int) -> None:
        if step == self.first and self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
            step_stats.set_tracing(True)
        if self._prof is not None:
            self._step_range = torch.autograd.profiler.record_function(f"trainlib.step#{step}")
            self._step_range.__enter__()

    def after_step(self, step: int) -> None:
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if step == self.last:
            self.close()

    def close(self) -> Path | None:
        """Stop and write the trace (also when training ended inside the window); its path, or None."""
        if self._prof is None:
            return None
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        step_stats.set_tracing(False)
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        log.info("profile: steps %d-%d traced to %s", self.first, self.last, self.path)
        return self.path
