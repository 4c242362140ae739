"""Fused bucket kernels vs per-tensor torch ops, with memcpy as the physical limit.

    trainlib bench kernels [--quick]

Question: is packing gradients into a bucket (scale by 1/dp, optionally cast to bf16) with one
fused kernel worth it, and how close does it get to memory bandwidth?
  * 1000 small tensors (1k-4k elements): fused `kernels.pack/unpack` vs a Python loop of per-tensor
    torch ops (`out[o:o+n].copy_(t.flatten()).mul_(s)`), where per-op overhead dominates;
    `epilogue` vs `isfinite(x).all()` + `x.float().pow(2).sum()` on the packed buffer;
    `unscale_epilogue` (bf16 bucket -> fp32 master gradient, and fp32 -> fp32, times 1/loss_scale)
    vs the torch chain `dst.copy_(src * s)` + the same two reductions on dst.
  * 50 large tensors (1M elements), fp32 and fp32<->bf16: the same peers, plus `dst.copy_(src)`
    of the same bytes (torch's parallel memcpy), measured in the same run. The bandwidth fraction
    is (bytes read + written by the kernel / its time) / (2 * bytes / memcpy time).
Every candidate of a case runs in alternating order (`harness.alternate`), medians of >= 5 reps.
On a CUDA machine the same cases also run for the Triton kernels against a device-to-device copy.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import torch

import trainlib.kernels as K
from trainlib.benchmarks.harness import alternate

SCALE = 0.5  # 1/dp for dp=2
UNSCALE = 2.0 ** -16  # 1/loss_scale, fp16's usual initial loss scale
TARGET_SMALL_SPEEDUP = 3.0
TARGET_MEMCPY_FRACTION = 0.70


def _timer(fn: Callable[[], Any], min_sample_s: float, sync: Callable[[], None]) -> Callable[[], float]:
    """A candidate for `alternate`: seconds per call, averaged over enough calls that one sample
    lasts >= min_sample_s (so a preemption on this shared machine is a fraction of a sample)."""
    fn()  # warm-up: builds/compiles kernels, faults pages in
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    inner = max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-6)))

    def timed() -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        return (time.perf_counter() - t0) / inner
    return timed


def _make(sizes: list[int], dtype: torch.dtype, device: torch.device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(device=device, dtype=dtype) for n in sizes]


def _loop_pack(ts: list[torch.Tensor], out: torch.Tensor) -> None:
    o = 0
    for t in ts:
        n = t.numel()
        out[o: o + n].copy_(t.flatten()).mul_(SCALE)
        o += n


def _loop_unpack(flat: torch.Tensor, outs: list[torch.Tensor]) -> None:
    o = 0
    for t in outs:
        n = t.numel()
        t.copy_(flat[o: o + n].view_as(t)).mul_(SCALE)
        o += n


def _torch_epilogue(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ~torch.isfinite(x).all(), x.float().pow(2).sum()


def _torch_unscale_epilogue(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the same values as the kernel (the fp32 product of the exact upcast): copy (cast), then scale
    if src.dtype == dst.dtype:
        torch.mul(src, UNSCALE, out=dst)
    else:
        dst.copy_(src).mul_(UNSCALE)
    return _torch_epilogue(dst)


def _measure(cands: dict[str, Callable[[], float]], reps: int, peer: str, moved: int,
             memcpy_bytes: int) -> dict[str, Any]:
    """Alternate the candidates; medians (the headline) and best-of (the machine's capability when
    others leave it alone: this box is shared) of fused vs `peer`, and vs memcpy if measured."""
    r = alternate(cands, reps)
    med = {k: v["median_s"] for k, v in r.items()}
    best = {k: min(v["all_s"]) for k, v in r.items()}
    case: dict[str, Any] = {**med, "all_s": {k: v["all_s"] for k, v in r.items()}, "bytes_moved": moved,
                            f"speedup_vs_{peer}": med[peer] / med["fused"],
                            f"speedup_vs_{peer}_best": best[peer] / best["fused"]}
    if "memcpy_fp32" in med:  # memcpy reads and writes memcpy_bytes
        case["fused_GBps"] = moved / med["fused"] / 1e9
        case["memcpy_GBps"] = 2 * memcpy_bytes / med["memcpy_fp32"] / 1e9
        case["fraction_of_memcpy_bw"] = case["fused_GBps"] / case["memcpy_GBps"]
        case["fraction_of_memcpy_bw_best"] = (moved / best["fused"]) / (2 * memcpy_bytes / best["memcpy_fp32"])
    return case


def _cases(sizes: list[int], device: torch.device, reps: int, sample_s: float, with_memcpy: bool) -> dict[str, Any]:
    """pack/unpack fp32->fp32 and fp32<->bf16, and epilogue: fused vs per-tensor (vs memcpy)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ts = _make(sizes, torch.float32, device, seed=0)
    total = sum(sizes)
    res: dict[str, Any] = {"tensors": len(sizes), "elements": total}
    src_flat = torch.randn(total, device=device)
    dst = torch.empty_like(src_flat)
    memcpy = {"memcpy_fp32": _timer(lambda: dst.copy_(src_flat), sample_s, sync)} if with_memcpy else {}
    for name, flat_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        flat = torch.empty(total, dtype=flat_dtype, device=device)
        outs = [torch.empty_like(t) for t in ts]
        moved = total * (4 + flat.element_size())  # bytes read + written by pack (and by unpack)
        for op, fused, loop in (("pack", lambda: K.pack(ts, flat, SCALE), lambda: _loop_pack(ts, flat)),
                                ("unpack", lambda: K.unpack(flat, outs, SCALE), lambda: _loop_unpack(flat, outs))):
            cands = {"fused": _timer(fused, sample_s, sync), "per_tensor": _timer(loop, sample_s, sync), **memcpy}
            res[f"{op}_{name}"] = _measure(cands, reps, "per_tensor", moved, total * 4)
    cands = {"fused": _timer(lambda: K.epilogue(src_flat), sample_s, sync),
             "torch_ops": _timer(lambda: _torch_epilogue(src_flat), sample_s, sync), **memcpy}
    res["epilogue_fp32"] = _measure(cands, reps, "torch_ops", total * 4, total * 4)
    master = torch.empty_like(src_flat)  # the fp32 master gradient
    for name, src_dtype in (("bf16_to_fp32", torch.bfloat16), ("fp32_to_fp32", torch.float32)):
        src = src_flat.to(src_dtype)
        cands = {"fused": _timer(lambda: K.unscale_epilogue(src, master, UNSCALE), sample_s, sync),
                 "torch_ops": _timer(lambda: _torch_unscale_epilogue(src, master), sample_s, sync), **memcpy}
        res[f"unscale_epilogue_{name}"] = _measure(cands, reps, "torch_ops", total * (src.element_size() + 4),
                                                   total * 4)
    return res


def _device_run(device: torch.device, quick: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(42)
    n_small = 1000
    small_sizes = torch.randint(1024, 4097, (n_small,), generator=g).tolist()
    n_large, large_n = (10, 1 << 18) if quick else (50, 1 << 20)
    reps = 5 if quick else 9
    out: dict[str, Any] = {"backend": K.backend_for(torch.zeros(1, device=device)), "threads": torch.get_num_threads(),
                           "scale": SCALE}
    sample_s = 0.01 if quick else 0.03
    out["small"] = _cases(small_sizes, device, reps, sample_s, with_memcpy=False)
    out["large"] = _cases([large_n] * n_large, device, reps, sample_s, with_memcpy=True)
    return out


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    def pick(part: str, key: str, prefix: tuple[str, ...] = ("pack", "unpack")) -> dict[str, float]:
        return {k: round(v[key], 3) for k, v in r[part].items() if k.startswith(prefix)}

    small, small_best = pick("small", "speedup_vs_per_tensor"), pick("small", "speedup_vs_per_tensor_best")
    frac, frac_best = pick("large", "fraction_of_memcpy_bw"), pick("large", "fraction_of_memcpy_bw_best")
    return {"backend": r["backend"], "threads": r["threads"],
            "small_1000_speedup_vs_per_tensor": small, "small_speedup_min": min(small.values()),
            "small_1000_speedup_vs_per_tensor_best_of": small_best,
            "large_fraction_of_memcpy_bw": frac, "large_fraction_min": min(frac.values()),
            "large_fraction_of_memcpy_bw_best_of": frac_best,
            "epilogue_speedup_vs_torch_ops": {"small": round(r["small"]["epilogue_fp32"]["speedup_vs_torch_ops"], 2),
                                              "large": round(r["large"]["epilogue_fp32"]["speedup_vs_torch_ops"], 2)},
            "epilogue_read_fraction_of_memcpy_bw": round(r["large"]["epilogue_fp32"]["fraction_of_memcpy_bw"], 3),
            "unscale_epilogue_speedup_vs_torch_ops": {
                part: {k[len("unscale_epilogue_"):]: round(v["speedup_vs_torch_ops"], 2)
                       for k, v in r[part].items() if k.startswith("unscale_epilogue_")} for part in ("small", "large")},
            "unscale_epilogue_fraction_of_memcpy_bw": pick("large", "fraction_of_memcpy_bw", ("unscale_epilogue_",)),
            "targets": {"small_speedup": TARGET_SMALL_SPEEDUP, "large_fraction": TARGET_MEMCPY_FRACTION},
            "targets_met_by_medians": min(small.values()) >= TARGET_SMALL_SPEEDUP
            and min(frac.values()) >= TARGET_MEMCPY_FRACTION}


def _cpu_runs(quick: bool) -> dict[str, Any]:
    """One run per thread count: 1 (a data-parallel rank with OMP_NUM_THREADS=1) and torch's default.
    The kernels, the per-tensor ops and memcpy all use the same torch.get_num_threads()."""
    default = torch.get_num_threads()
    runs = {}
    try:
        for nt in sorted({1, default}):
            torch.set_num_threads(nt)
            runs[f"threads_{nt}"] = _device_run(torch.device("cpu"), quick)
    finally:
        torch.set_num_threads(default)
    return runs


def run(quick: bool) -> dict[str, Any]:
    load_before = os.getloadavg()
    result: dict[str, Any] = {"cpu": _cpu_runs(quick)}
    result["load_average"] = {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()}
    # libgomp's default (active) waiting spins idle workers: on an oversubscribed machine that
    # slows every multi-threaded candidate; PASSIVE makes them sleep. Recorded, never changed here.
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    summary = {f"cpu_{k}": _summary(v) for k, v in result["cpu"].items()}
    if torch.cuda.is_available():  # Triton kernels vs device-to-device copy
        result["cuda"] = {"gpu": _device_run(torch.device("cuda"), quick)}
        summary["cuda"] = _summary(result["cuda"]["gpu"])
    result["summary"] = summary
    return result


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(dev, k, r) for dev in ("cpu", "cuda") for k, r in result.get(dev, {}).items()]
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4.2 * len(panels)), squeeze=False)
    for row, (dev, key, r) in zip(axes, panels):
        label = f"{dev} {key.replace('_', ' ')} ({r['backend']})"
        ops = [k for k, v in r["small"].items() if isinstance(v, dict) and "per_tensor" in v]
        speed = [r["small"][k]["speedup_vs_per_tensor"] for k in ops]
        row[0].bar(ops, speed, color="tab:blue", label="median")
        row[0].scatter(ops, [r["small"][k]["speedup_vs_per_tensor_best"] for k in ops], marker="x", color="black",
                       zorder=3, label="best of reps")
        row[0].axhline(TARGET_SMALL_SPEEDUP, color="tab:red", ls="--", label=f"target {TARGET_SMALL_SPEEDUP:g}x")
        row[0].set_ylabel("per-tensor time / fused time")
        row[0].set_title(f"{label}: 1000 small tensors")
        row[0].legend()
        ops = [k for k in r["large"] if k.startswith(("pack", "unpack"))]
        frac = [r["large"][k]["fraction_of_memcpy_bw"] for k in ops]
        row[1].bar(ops, frac, color="tab:green", label="median")
        row[1].scatter(ops, [r["large"][k]["fraction_of_memcpy_bw_best"] for k in ops], marker="x", color="black",
                       zorder=3, label="best of reps")
        row[1].axhline(1.0, color="black", lw=1, label="memcpy (same run)")
        row[1].axhline(TARGET_MEMCPY_FRACTION, color="tab:red", ls="--", label=f"target {TARGET_MEMCPY_FRACTION:g}")
        row[1].set_title(f"{label}: {r['large']['tensors']} large tensors")
        row[1].set_ylabel("fraction of memcpy bandwidth")
        row[1].legend()
        for ax in row:
            ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"trainlib bench kernels — {result.get('meta', {}).get('date', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_headline(s: dict) -> str:
    """This benchmark's line in `trainlib bench table` (benchmarks/README.md), from a result's summary."""
    out = []
    for key, r in s.items():
        if not isinstance(r, dict) or "small_speedup_min" not in r:
            continue
        ep = r["epilogue_speedup_vs_torch_ops"]
        out.append(f"{r['threads']} thread(s): 1000 small tensors >= {r['small_speedup_min']:.1f}x vs per-tensor "
                   f"copies, large >= {r['large_fraction_min']:.2f} of memcpy, epilogue {ep['small']:.0f}x/"
                   f"{ep['large']:.0f}x vs torch ops")
    return "; ".join(out)
