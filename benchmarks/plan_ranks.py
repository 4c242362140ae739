"""Local gloo ranks for `trainlib plan --calibrate` (the library's planner holds no test machinery)."""
from __future__ import annotations

from typing import Any, Callable

from trainlib.testing import run_ranks


def spawn_ranks(fn: Callable[..., Any], ranks: int, threads: str, *args: Any) -> list[Any]:
    """fn(*args) on `ranks` local gloo ranks with OMP_NUM_THREADS=threads; per-rank results in rank order."""
    return run_ranks(fn, ranks, *args, timeout_s=600, env={"OMP_NUM_THREADS": threads})
