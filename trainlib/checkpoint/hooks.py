"""Named phase hooks: the points in a training step and a checkpoint save where a registered
function is called with (phase, rank=, step=).

    remove = tl.checkpoint.hooks.register(lambda phase, *, rank, step: ...)
    ...
    remove()

Phases (PHASES), in the order one step meets them:
    step           after the optimizer step of step STEP, before any checkpoint of that step
    save:shard     inside a save: this rank's files are written to the temporary location
    save:manifest  inside a save (rank 0): manifest written, the step not yet published (renamed)
    save:rename    inside a save (rank 0): step published (on S3, the manifest's PUT), `latest` not yet moved

An async save (async_save.CheckpointWriter) runs the same save path on its writer thread, so its
save:* phases fire there. The library uses these for nothing itself; tests use them to kill a
process at an exact point (trainlib.testing's fault hook). With nothing registered, fire() is a
tuple check and one environment lookup.
"""
from __future__ import annotations

import os
from typing import Callable, Protocol

PHASES = ("step", "save:shard", "save:manifest", "save:rename")

# The fault tests start real processes (`trainlib train`, forkserver children) and set this in
# their env, sometimes after trainlib was imported; the hook has to appear in those processes
# without the test importing anything. So fire() installs trainlib.testing's fault hook, lazily and
# ONLY when this variable is set: this is the one place the library reaches for test code.
FAULT_ENV = "TRAINLIB_FAULT_KILL_AT_STEP"


class PhaseHook(Protocol):
    def __call__(self, phase: str, *, rank: int, step: int) -> None: ...


_hooks: list[PhaseHook] = []


def register(fn: PhaseHook) -> Callable[[], None]:
    """Call fn(phase, rank=, step=) at every phase from now on; returns a function that removes it."""
    _hooks.append(fn)

    def remove() -> None:
        if fn in _hooks:
            _hooks.remove(fn)

    return remove


def registered() -> tuple[PhaseHook, ...]:
    return tuple(_hooks)


def fire(phase: str, *, rank: int, step: int) -> None:
    """Run the registered hooks for this phase of step `step` on rank `rank`."""
    if phase not in PHASES:
        raise ValueError(f"phase hook {phase!r} is not one of {', '.join(PHASES)}; add it to PHASES "
                         "(and document it) before firing it")
    if os.environ.get(FAULT_ENV):
        from ..testing import install_fault_hook  # see FAULT_ENV: only when the variable is set

        install_fault_hook()
    for fn in tuple(_hooks):
        fn(phase, rank=rank, step=step)
