"""trainlib.cpu_malloc: freed tensor memory kept for the next step on CPU, against glibc left as it comes.

Each case runs in a fresh interpreter: mallopt settings are per process and cannot be undone."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainlib import cpu_malloc

ROOT = Path(__file__).resolve().parents[1]

# a step's worth of large tensors allocated, touched and freed, as activations and the optimizer's
# temporaries are; prints the minor page faults of 5 such steps after WARMUP steps. Kept for reuse, the
# heap still grows by up to a step's worth per step over the first few steps before glibc (2.36; torch
# allocates with posix_memalign) reuses the freed blocks: one-time faults, not re-faults. Seen here
# (2026-12-02, 49 processes): the last growing step was step 3 to 11; at 10 warm-up steps 7 of 20
# processes still grew in the measured window.
WARMUP = 30
PATTERN = r"""
import resource, sys, torch
if sys.argv[1] == "reuse":
    from trainlib import cpu_malloc
    assert cpu_malloc.reuse()
elif sys.argv[1] == "init":
    import trainlib as tl
    tl.init(device="cpu")
def step():
    # 2 x 40 MiB: above the 32 MiB glibc's dynamic mmap threshold stops at, so glibc as it comes maps and
    # unmaps them every time (smaller blocks re-fault or not depending on the process's allocation history)
    ts = [torch.empty(10 * 2**20).fill_(1.0) for _ in range(2)]
    del ts
for _ in range(int(sys.argv[2])):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(how: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MALLOC_", "TRAINLIB_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    out = subprocess.run([sys.executable, "-c", PATTERN, how, str(WARMUP)],
                         env={**clean, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and ru_minflt in pages")
def test_reuse_stops_refaulting_freed_tensors():
    one_step_pages = 2 * 40 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    # glibc as it comes maps these afresh every step: each of the 5 steps faults all its pages in again
    assert _faults("system") >= 4 * one_step_pages
    assert _faults("reuse") < one_step_pages // 20
    # trainlib.init() on CPU applies it; TRAINLIB_CPU_MALLOC=system leaves glibc alone
    assert _faults("init") < one_step_pages // 20
    assert _faults("init", TRAINLIB_CPU_MALLOC="system") >= 4 * one_step_pages


def test_user_choices_are_respected(monkeypatch):
    for k in ("TRAINLIB_CPU_MALLOC", "LD_PRELOAD", *cpu_malloc._USER_TUNABLES):
        monkeypatch.delenv(k, raising=False)
    assert cpu_malloc.mode() == "reuse" and cpu_malloc.why_not() is None
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert "MALLOC_TRIM_THRESHOLD_" in cpu_malloc.why_not()
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert "jemalloc" in cpu_malloc.why_not()
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("TRAINLIB_CPU_MALLOC", "System")
    assert cpu_malloc.why_not() == "TRAINLIB_CPU_MALLOC=system"
    monkeypatch.setenv("TRAINLIB_CPU_MALLOC", "tcmalloc")
    with pytest.raises(ValueError, match=r"TRAINLIB_CPU_MALLOC='tcmalloc'.*reuse, system"):
        cpu_malloc.mode()
