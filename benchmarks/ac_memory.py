"""Activation checkpointing: activation memory kept for backward vs the time recomputation costs.

    python -m benchmarks.ac_memory --quick        # one JSON line: none / full / selective on the default GPT

`measure(model_factory, batch, mode)` builds a model, applies the mode, and reports
  retained_activation_bytes  bytes of the tensors the forward allocated that are still alive when it
                             returns (what the graph keeps for backward: ordinary saved tensors, each
                             checkpointed block's input, selective checkpointing's saved matmul outputs)
  autograd_saved_bytes       bytes autograd's saved_tensors_hooks see (parameters excluded). They do not
                             see inside a checkpointed region (checkpoint installs its own hooks there),
                             so without AC this matches retained_activation_bytes (plus the batch's index
                             tensors, saved but not allocated by the forward) and with AC it undercounts
  peak_rss_delta_bytes       peak RSS during forward+backward above the RSS before it (Linux: VmHWM,
                             reset through /proc/self/clear_refs; None where that is unavailable); glibc
                             is set to mmap every large block so that RSS follows live tensors
  step_s                     forward+backward seconds, median over repetitions
`compare` runs several modes with their steps interleaved (alternating repetitions) and reports ratios
against no checkpointing. `run(quick)` is the entry for `trainlib bench`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainlib.activation_checkpointing import apply_activation_checkpointing
from trainlib.benchmarks.harness import alternate, median

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
MODES: tuple[str | None, ...] = (None, "full", "selective")


def gpt_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy of a model returning logits (trainlib's GPT) or an object with .logits (HF)."""
    x, y = batch
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class _Allocations(TorchDispatchMode):
    """Weak references to every storage an op allocates (a view or an in-place op allocates none)."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                if s._cdata not in inputs and s.nbytes():
                    self.refs[s._cdata] = (StorageWeakRef(s), s.nbytes())
        return out

    def alive_bytes(self) -> int:
        return sum(n for ref, n in self.refs.values() if not ref.expired())


def retained_activation_bytes(model: nn.Module, batch: Batch, loss_fn: LossFn = gpt_loss) -> tuple[int, int]:
    """(retained_activation_bytes, autograd_saved_bytes) of one forward; runs the backward after."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    params |= {b.untyped_storage()._cdata for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in params:
            saved[s._cdata] = s.nbytes()
        return t

    allocs = _Allocations()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), allocs:
        loss = loss_fn(model, batch)
    retained = allocs.alive_bytes()  # temporaries are gone: Python freed them when the forward returned
    loss.backward()
    model.zero_grad(set_to_none=True)
    return retained, sum(saved.values())


def _rss_peak_reset() -> int | None:
    """Reset this process's peak RSS (VmHWM) and return the current RSS in bytes; None if not Linux."""
    try:
        _libc().malloc_trim(0)  # hand freed heap pages back, so this step's allocations show in the peak
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return None


def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


def _track_rss_closely() -> None:
    """glibc raises its mmap threshold after each large free, so freed activations stay in the heap
    and RSS overstates what is live (measured: 181-353 MB RSS for 46 MB retained with full AC).
    A fixed 64 KiB threshold (M_MMAP_THRESHOLD = -3) maps every large tensor on its own and unmaps it
    when freed, so RSS follows live memory. Process-wide: benchmark processes only."""
    try:
        _libc().mallopt(-3, 64 * 1024)
    except OSError:
        pass


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class _Runner:
    """One model with one mode applied; step() times a forward+backward."""

    def __init__(self, model_factory: Callable[[], nn.Module], batch: Batch, mode: str | None, loss_fn: LossFn,
                 track_rss: bool):
        if track_rss:
            _track_rss_closely()
        self.model = model_factory()
        self.model.train()
        apply_activation_checkpointing(self.model, mode)
        self.batch, self.loss_fn, self.rss_deltas = batch, loss_fn, []

    def step(self) -> float:
        before = _rss_peak_reset()
        t0 = time.perf_counter()
        self.loss_fn(self.model, self.batch).backward()
        dt = time.perf_counter() - t0
        if before is not None:
            self.rss_deltas.append(_status_kb("VmHWM") * 1024 - before)
        self.model.zero_grad(set_to_none=True)
        return dt


def _report(r: _Runner, mode: str | None, times: list[float]) -> dict[str, Any]:
    retained, saved = retained_activation_bytes(r.model, r.batch, r.loss_fn)
    return {"mode": mode or "none", "retained_activation_bytes": retained, "autograd_saved_bytes": saved,
            "peak_rss_delta_bytes": int(median(r.rss_deltas)) if r.rss_deltas else None,
            "step_s": median(times), "step_s_all": times}


def measure(model_factory: Callable[[], nn.Module], batch: Batch, mode: str | None, *, repeats: int = 5,
            loss_fn: LossFn = gpt_loss, track_rss: bool = True) -> dict[str, Any]:
    """Activation memory and forward+backward time of a fresh model_factory() under `mode` (one warm-up step).

    track_rss: set glibc's mmap threshold (process-wide, for good) so that peak RSS follows live tensors."""
    r = _Runner(model_factory, batch, mode, loss_fn, track_rss)
    r.step()
    r.rss_deltas.clear()
    return _report(r, mode, [r.step() for _ in range(repeats)])


def compare(model_factory: Callable[[], nn.Module], batch: Batch, modes: tuple[str | None, ...] = MODES, *,
            repeats: int = 5, loss_fn: LossFn = gpt_loss, track_rss: bool = True) -> dict[str, Any]:
    """measure() for each mode with the timed steps interleaved across modes; ratios against "none"."""
    runners = {m or "none": _Runner(model_factory, batch, m, loss_fn, track_rss) for m in modes}
    for r in runners.values():
        r.step()  # warm-up
        r.rss_deltas.clear()
    timed = alternate({name: r.step for name, r in runners.items()}, repeats)
    rows = {name: _report(r, None if name == "none" else name, timed[name]["all_s"]) for name, r in runners.items()}
    if "none" in rows:
        base = rows["none"]
        for row in rows.values():
            row["activation_ratio"] = row["retained_activation_bytes"] / base["retained_activation_bytes"]
            row["time_ratio"] = row["step_s"] / base["step_s"]
    return rows


def run(quick: bool) -> dict[str, Any]:
    """none / full / selective on the default GPT (trainlib.models.gpt.GPTConfig()); full size: a deeper, wider one."""
    from trainlib.models.gpt import GPT, GPTConfig

    cfg = GPTConfig() if quick else GPTConfig(seq_len=256, n_layer=8, n_head=8, d_model=256)
    batch_size, repeats = (32, 5) if quick else (16, 7)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g)
    batch = (x, (3 * x + 1) % cfg.vocab_size)
    rows = compare(lambda: GPT(cfg, seed=0), batch, repeats=repeats)
    return {"model": {"config": cfg.__dict__, "batch": batch_size,
                      "params": sum(p.numel() for p in GPT(cfg).parameters())},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats, "modes": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ac_memory", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the default GPT, few repetitions (CI)")
    args = p.parse_args(argv)
    print(json.dumps(run(args.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
