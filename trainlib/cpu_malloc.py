"""glibc's malloc for CPU training: keep freed tensor memory for the next step instead of handing it back.

Left alone, glibc serves a block above its mmap threshold (128 KiB at first, raised at run time up to
32 MiB as blocks that size are freed) with a fresh mmap, unmaps it on free, and trims the heap's top once
more than twice that is free. A training step allocates and frees the same large tensors every step
(activations, gradients, the optimizer's per-tensor temporaries), so depending on the allocation history
a process re-faults and the kernel re-zeroes tens of MiB each step. Measured here (2026-12-02, the wide MLP
of 3 x Linear(2048, 2048) at dp=2, `/tmp` phase timing of `trainlib bench plan`'s layouts): one rank took
10-24 thousand minor faults per step under plain all-reduce and its optimizer step ran 30-80 ms slower than
its peer's; with freed memory kept, no faults and 164-214 ms steps instead of 199-330 ms.

torch's own CPU launcher (torch.backends.xeon.run_cpu) preloads jemalloc or tcmalloc for the same reason;
this is the in-process equivalent for glibc, applied by trainlib.init() on CPU. It is skipped where the
user chose otherwise: TRAINLIB_CPU_MALLOC=system, glibc's own MALLOC_*_ tunables in the environment, or
another allocator preloaded. The cost is RSS: freed memory stays in the process (up to TRIM_BYTES at the
heap's top), as a GPU caching allocator keeps its blocks. The first few steps still grow the heap (glibc 2.36
reuses freed posix_memalign blocks only once the heap holds enough of them: up to 11 steps of a 2 x 40 MiB
pattern here, tests/test_cpu_malloc.py); from then on a step faults nothing in.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters (malloc.h)
MMAP_BYTES = 256 * 2**20   # blocks up to this come from the heap and are reused (above: mmap, as before)
TRIM_BYTES = 2 * MMAP_BYTES   # free memory at the heap's top kept for reuse (glibc's own ratio: 2x)
ENV = "TRAINLIB_CPU_MALLOC"
MODES = ("reuse", "system")
_USER_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_applied: bool | None = None


def mode() -> str:
    """TRAINLIB_CPU_MALLOC: 'reuse' (the default) or 'system' (glibc as it comes)."""
    value = os.environ.get(ENV, "reuse").strip().lower() or "reuse"
    if value not in MODES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(MODES)} ('reuse' keeps freed "
                         "tensor memory in the process for the next step; 'system' leaves glibc's malloc as it is)")
    return value


def why_not() -> str | None:
    """Why reuse() would leave the allocator alone (None: it would tune it)."""
    if mode() == "system":
        return f"{ENV}=system"
    chosen = [k for k in _USER_TUNABLES if k in os.environ]
    if chosen:
        return f"glibc tunables set in the environment ({', '.join(chosen)})"
    preload = os.environ.get("LD_PRELOAD", "")
    other = [a for a in _OTHER_ALLOCATORS if a in preload]
    if other:
        return f"{other[0]} preloaded (LD_PRELOAD)"
    return None


def reuse() -> bool:
    """Tune glibc's malloc to keep freed blocks (see the module docstring); once per process. True when
    applied; False where skipped (why_not()) or where this is not glibc."""
    global _applied
    if _applied is not None:
        return _applied
    reason = why_not()
    if reason is not None:
        log.debug("CPU malloc left as it is: %s", reason)
        _applied = False
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_BYTES) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1
    except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to tune
        ok = False
    log.debug("CPU malloc: freed blocks up to %d MiB kept for reuse: %s", MMAP_BYTES >> 20, ok)
    _applied = ok
    return ok
