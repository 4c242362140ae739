"""`run_ranks(fn, world_size)`: run `fn` on N real processes joined by gloo on loopback.

Used by the tests and the benchmarks. Children come from a forkserver that has already imported
torch and trainlib, so a rank starts in a fraction of a second instead of ~3 s of torch import.
Each child gets its own RANK/WORLD_SIZE/MASTER_* env, OMP_NUM_THREADS=1, and calls tl.init().
An exception in any rank is re-raised in the parent with that rank's traceback; a rank that
does not finish within `timeout_s` is killed and reported.

Fault injection for the reliability tests: a worker SIGKILLs itself at a chosen point.

    TRAINLIB_FAULT_KILL_AT_STEP=RANK:STEP[:PHASE]

PHASE is one of trainlib.checkpoint.hooks.PHASES (default "step"): where in step STEP rank RANK
dies. SIGKILL, not an exception: nothing gets to clean up, as with the OOM killer or a lost spot
node. Only the first incarnation dies (torchrun's TORCHELASTIC_RESTART_COUNT is 0 or unset), so a
restarted worker runs through. The checkpoint hooks install the fault hook when the variable is
set (hooks.FAULT_ENV says why), so a test only sets it in the rank's env.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.forkserver
import os
import queue
import signal
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch

from .checkpoint.hooks import FAULT_ENV, PHASES, register
from .runtime import free_port

log = logging.getLogger("trainlib")

# preloaded once in the forkserver, so a rank starts in a fraction of a second; torch._dynamo too: torch's
# optimizers import it when constructed (~1.5-2 s of CPU here), which every rank building an AdamW paid again
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "trainlib"]


class RankError(RuntimeError):
    """A rank raised, died or timed out; the message has every failed rank's story."""


def _context():
    ctx = mp.get_context("forkserver")
    multiprocessing.forkserver.set_forkserver_preload(_PRELOAD)
    return ctx


def _child(fn, args, kwargs, rank, world_size, port, env, results, init) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1", **env})
    torch.set_num_threads(1)
    ok = False
    try:
        if init:
            from . import runtime

            runtime.init(backend="gloo", device="cpu")
        out = fn(*args, **kwargs)
        results.put((rank, "ok", _to_cpu(out)))
        ok = True
    except BaseException:  # report everything, including SystemExit from a CLI entry
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if init:
            from . import runtime

            _wait_for_peers(rank, world_size, wait=ok)
            try:
                runtime.shutdown()
            except Exception:
                pass


def _wait_for_peers(rank: int, world_size: int, wait: bool, timeout_s: float = 20.0) -> None:
    """Rank 0 hosts the job's store: having succeeded (wait), it stays until every rank has finished
    (or the timeout), so a rank that returns early does not take the store from a peer still building
    its groups ("Broken pipe" in new_group). A rank that failed leaves at once, as before (its peers'
    fault paths expect that); one that died never checks in, and the parent stops waiting on it."""
    import torch.distributed as dist

    try:
        if not dist.is_initialized():
            return
        store = dist.distributed_c10d._get_default_store()
        store.set(f"trainlib.testing/finished/{rank}", "1")
        if rank == 0 and wait:
            store.wait([f"trainlib.testing/finished/{r}" for r in range(world_size)], timedelta(seconds=timeout_s))
    except Exception:   # a peer gone or the store closed: nothing left to protect
        pass


class _TensorBytes:
    """A result tensor sent by value. torch's queue sends a tensor's storage as a file descriptor
    that the parent fetches from the child on unpickling; a child that has already exited (ranks
    exit right after reporting) leaves the parent a FileNotFoundError."""

    def __init__(self, t: torch.Tensor):
        t = t.detach().cpu().contiguous()
        self.dtype, self.shape = t.dtype, tuple(t.shape)
        self.data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""

    def tensor(self) -> torch.Tensor:
        if not self.data:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(self.dtype).reshape(self.shape)


def _map_tensors(x: Any, fn: Callable[[Any], Any], kind: type) -> Any:
    if isinstance(x, kind):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn, kind) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(v, fn, kind) for v in x)
    return x


def _to_cpu(x: Any) -> Any:
    return _map_tensors(x, _TensorBytes, torch.Tensor)


def _from_wire(x: Any) -> Any:
    return _map_tensors(x, _TensorBytes.tensor, _TensorBytes)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
              env: dict[str, str] | None = None, init: bool = True, expect_failure: bool = False,
              **kwargs: Any) -> list[Any]:
    """Run fn(*args, **kwargs) on `world_size` ranks; return the per-rank results in rank order.

    fn must be importable (a module-level function). With expect_failure=True, failures are
    returned as RankError instances in the result list instead of raising (fault tests)."""
    ctx = _context()
    port = free_port()
    results = ctx.Queue()
    env = {k: str(v) for k, v in (env or {}).items()}
    procs = [ctx.Process(target=_child, args=(fn, args, kwargs, r, world_size, port, env, results, init), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    first_failure: float | None = None
    while len(outcome) < world_size:
        now = time.monotonic()
        # once a rank failed, the others are probably stuck in a collective with it: short grace
        limit = deadline if first_failure is None else min(deadline, first_failure + 15.0)
        if now >= limit:
            break
        try:
            rank, status, payload = results.get(timeout=min(0.5, limit - now))
            outcome[rank] = (status, payload)
            if status == "error" and first_failure is None:
                first_failure = time.monotonic()
        except queue.Empty:
            for r, p in enumerate(procs):
                if r not in outcome and not p.is_alive() and p.exitcode is not None:
                    # died without reporting (killed, segfault, os._exit): give the queue a moment
                    try:
                        rank, status, payload = results.get(timeout=0.5)
                        outcome[rank] = (status, payload)
                        continue
                    except queue.Empty:
                        outcome[r] = ("error", f"process exited with code {p.exitcode} without a result")
                        first_failure = first_failure or time.monotonic()
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
        p.join(timeout=5)
        if r not in outcome:
            outcome[r] = ("error", f"did not finish within {timeout_s:.0f}s (killed)"
                          if first_failure is None else "killed after another rank failed")
    failures = {r: msg for r, (st, msg) in outcome.items() if st != "ok"}
    if failures and not expect_failure:
        detail = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(failures.items()))
        raise RankError(f"{len(failures)} of {world_size} ranks failed:\n{detail}")
    return [_from_wire(outcome[r][1]) if outcome[r][0] == "ok" else RankError(f"rank {r}: {outcome[r][1]}")
            for r in range(world_size)]


# -- fault injection --------------------------------------------------------------------------------

def parse_fault_spec(spec: str) -> tuple[int, int, str]:
    """'1:7:save:shard' -> (1, 7, 'save:shard'). Raises ValueError naming the fix."""
    parts = spec.split(":", 2)
    try:
        rank, step = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        raise ValueError(f"{FAULT_ENV}={spec!r} must look like RANK:STEP[:PHASE], e.g. 1:7 or 0:10:save:manifest; "
                         f"unset it outside fault tests") from None
    phase = parts[2] if len(parts) > 2 else "step"
    if phase not in PHASES:
        raise ValueError(f"{FAULT_ENV}={spec!r}: phase {phase!r} is not one of {', '.join(PHASES)}")
    return rank, step, phase


def kill_at_fault_spec(phase: str, *, rank: int, step: int) -> None:
    """The fault hook: SIGKILL this process if the env spec names (rank, step, phase) and this is not a restart."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return
    if parse_fault_spec(spec) == (rank, step, phase):
        log.warning("fault injection: rank %d kills itself at step %d (%s)", rank, step, phase)
        os.kill(os.getpid(), signal.SIGKILL)


_fault_hook_installed = False


def install_fault_hook() -> None:
    """Register kill_at_fault_spec as a checkpoint phase hook (once per process)."""
    global _fault_hook_installed
    if not _fault_hook_installed:
        _fault_hook_installed = True
        register(kill_at_fault_spec)
