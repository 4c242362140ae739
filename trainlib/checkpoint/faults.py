"""Fault injection for the reliability tests: a worker SIGKILLs itself at a chosen point.

    TRAINLIB_FAULT_KILL_AT_STEP=RANK:STEP[:PHASE]

PHASE is where in step STEP rank RANK dies (default "step"):
    step           after the optimizer step, before any checkpoint of that step
    save:shard     inside a checkpoint save: this rank's files written to the temporary directory
    save:manifest  inside a save (rank 0): manifest written, directory not yet renamed
    save:rename    inside a save (rank 0): directory renamed, `latest` not yet moved

SIGKILL, not an exception: nothing gets to clean up, as with the OOM killer or a lost spot node.
Only the first incarnation dies (torchrun's TORCHELASTIC_RESTART_COUNT is 0 or unset), so a
restarted worker runs through. Unset in production: the check is one dict lookup.
"""
from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("trainlib")

ENV = "TRAINLIB_FAULT_KILL_AT_STEP"
PHASES = ("step", "save:shard", "save:manifest", "save:rename")


def parse(spec: str) -> tuple[int, int, str]:
    """'1:7:save:shard' -> (1, 7, 'save:shard'). Raises ValueError naming the fix."""
    from .store import CheckpointError

    parts = spec.split(":", 2)
    try:
        rank, step = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        raise CheckpointError(f"{ENV}={spec!r} must look like RANK:STEP[:PHASE], e.g. 1:7 or 0:10:save:manifest; "
                              f"unset it outside fault tests") from None
    phase = parts[2] if len(parts) > 2 else "step"
    if phase not in PHASES:
        raise CheckpointError(f"{ENV}={spec!r}: phase {phase!r} is not one of {', '.join(PHASES)}")
    return rank, step, phase


def maybe_kill(rank: int, step: int, phase: str = "step") -> None:
    """SIGKILL this process if the fault spec names (rank, step, phase) and this is not a restart."""
    spec = os.environ.get(ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return
    if parse(spec) == (rank, step, phase):
        log.warning("fault injection: rank %d kills itself at step %d (%s)", rank, step, phase)
        os.kill(os.getpid(), signal.SIGKILL)
