"""Per-rank bodies of `trainlib bench dp` (run by run_ranks children, or by every rank under mpiexec).

    step_group   one process group builds every candidate from the same weights and steps them in
                 rotating order, K steps per candidate per repetition: ratios come from one run
    memory_rank  one candidate in a fresh process: peak RSS (VmHWM) and PSS after backward
    busbw_rank   one S-byte bucket through DataParallel's sync backend (start + wait) vs raw
                 gloo all_reduce (and raw MPI Allreduce under mpiexec) of the same bytes
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from trainlib import comm
from trainlib.benchmarks import dp_workloads as wl


def step_group(workload: str, specs: dict[str, dict[str, Any]], reps: int, k: int, tiny: bool = False,
               quick: bool = True, keep_params: bool = False) -> dict[str, Any]:
    """Seconds per step of every candidate (median over `reps` rounds of `k` steps), last losses, and
    each candidate's final-parameter distance from the first candidate's (all saw the same batches).
    keep_params: also return the first candidate's final parameters and this rank's batches (tests)."""
    w = wl.workloads(quick)[workload]
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = wl.make_batches(w, rank, world, 4, tiny)
    cands, errors = {}, {}
    for name, spec in specs.items():
        try:
            cands[name] = wl.build_candidate(name, spec, w, tiny)
        except Exception as e:  # a peer that cannot run here (DeepSpeed on this CPU) is reported, not fatal
            if spec["kind"] != "ds":
                raise
            errors[name] = f"{type(e).__name__}: {e}"
    times: dict[str, list[float]] = {n: [] for n in cands}
    losses: dict[str, list[float]] = {n: [] for n in cands}
    seen = 0
    names = list(cands)

    def run_steps(c: wl.Candidate, n: int, start: int) -> None:
        for i in range(n):
            losses[c.name].append(float(c.step(batches[(start + i) % len(batches)])))

    for c in cands.values():  # warm-up: DDP rebuilds its buckets, optimizers allocate their state
        run_steps(c, 1, 0)
    seen = 1
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            comm.barrier()
            t0 = time.perf_counter()
            run_steps(cands[n], k, seen)
            times[n].append((time.perf_counter() - t0) / k)
        seen += k
    ref = names[0]
    ref_params = wl.flat_params(cands[ref].inner)
    out = {"grad_bytes": wl.grad_bytes(cands[ref].inner), "steps_per_candidate": seen, "reference": ref,
           "step_s": times, "last_loss": {n: ls[-1] for n, ls in losses.items()},
           "max_loss_diff_vs_reference": {n: max(abs(a - b) for a, b in zip(ls, losses[ref])) for n, ls in losses.items()},
           "max_param_diff_vs_reference": {n: float((wl.flat_params(c.inner) - ref_params).abs().max())
                                           for n, c in cands.items()},
           "errors": errors}
    if keep_params:
        out["reference_params"], out["batches"] = ref_params, batches
    for c in cands.values():
        c.close()
    return out


def memory_rank(workload: str, name: str, spec: dict[str, Any], steps: int, quick: bool = True) -> dict[str, Any]:
    """Peak resident memory of one candidate, measured from a fresh process's baseline."""
    import gc

    w = wl.workloads(quick)[workload]
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = wl.make_batches(w, rank, world, 2)
    pinned = wl.fix_malloc_threshold()
    gc.collect()
    reset_ok = wl.reset_peak_rss()
    rss0, pss0 = wl.status_kb("VmRSS") * 1024, wl.pss_bytes()
    c = wl.build_candidate(name, spec, w)
    pss_peak, rss_bwd = [0], [0]

    def probe() -> None:  # after backward: gradients (and DDP's buckets) are all alive here
        pss_peak[0] = max(pss_peak[0], wl.pss_bytes())
        rss_bwd[0] = max(rss_bwd[0], wl.status_kb("VmRSS") * 1024)

    for i in range(steps):
        c.step(batches[i % len(batches)], probe)
    comm.barrier()
    hwm = wl.status_kb("VmHWM") * 1024
    out = {"grad_bytes": wl.grad_bytes(c.inner), "largest_grad_bytes": wl.largest_grad_bytes(c.inner),
           "baseline_rss": rss0, "peak_rss": hwm, "peak_rss_delta": hwm - rss0,
           "rss_after_backward": rss_bwd[0],
           "baseline_pss": pss0, "peak_pss_after_backward": pss_peak[0], "peak_pss_delta": pss_peak[0] - pss0,
           "vmhwm_reset": reset_ok, "malloc_mmap_threshold_pinned": pinned}
    c.close()
    return out


def _bucket_for(nbytes: int, transport: str):
    """A DataParallel whose gradient is one `nbytes` fp32 bucket; returns (wrapper, bucket)."""
    import trainlib as tl

    m = nn.Module()
    m.w = nn.Parameter(torch.zeros(nbytes // 4))
    dp = tl.DataParallel(m, sync=tl.AllReduce(bucket_mb=nbytes / wl.MB + 1, transport=transport))
    assert len(dp.buckets) == 1 and dp.buckets[0].nbytes == nbytes
    return dp, dp.buckets[0]


def iters_for(nbytes: int, quick: bool) -> int:
    budget = (8 if quick else 32) * wl.MB  # bytes per measurement: small messages repeat more
    return max(2, min(50, budget // nbytes))


def busbw_rank(sizes: list[int], transports: list[str], reps: int, quick: bool, mpi_raw: bool = False) -> dict:
    """Seconds per all-reduce of each size for each path, medians over alternating rounds."""
    out: dict[str, dict[int, list[float]]] = {}
    for s in sizes:
        fns, closers = {}, []
        for t in transports:
            dp, b = _bucket_for(s, t)
            closers.append(dp.close)
            fns[f"trainlib-{t}"] = (lambda dp=dp, b=b: (dp.sync.start(b), dp.sync.wait()))
        raw = torch.zeros(s // 4)
        fns["gloo"] = lambda: dist.all_reduce(raw)
        if mpi_raw:
            from mpi4py import MPI

            buf = torch.zeros(s // 4).numpy()
            fns["mpi"] = lambda: MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        n_it = iters_for(s, quick)
        names = list(fns)
        for name in names:
            fns[name]()  # warm-up: first touch, connection set-up
        for r in range(reps):
            for name in names[r % len(names):] + names[: r % len(names)]:
                comm.barrier()
                t0 = time.perf_counter()
                for _ in range(n_it):
                    fns[name]()
                out.setdefault(name, {}).setdefault(s, []).append((time.perf_counter() - t0) / n_it)
        for close in closers:
            close()
    return out
