"""Data parallel: trainlib's DataParallel vs torch DDP and DeepSpeed -- step time, peak memory, bus bandwidth.

    trainlib bench dp [--quick]

1. Step time (forward + backward + optimizer step), 2 ranks, on the default GPT (AdamW) and on a
   communication-bound wide MLP (3 x Linear(2048, 2048), 48 MiB of fp32 gradients, batch 8, SGD).
   One process group builds every candidate from the same weights -- trainlib over gloo, with bf16
   compression and over shared memory; DDP with its defaults and over bucket_cap_mb {1, 25, 100} x
   gradient_as_bucket_view; DeepSpeed's engine (ZeRO 0 and 1, CPU accelerator, gloo) -- and steps
   them in rotating order, K steps each per repetition (medians). trainlib's MPI transport runs under
   a real `mpiexec -n 2` started from here, against DDP over gloo inside the same job. Every candidate
   also reports its final-parameter distance from DDP's: they trained the same model.
2. Peak memory on the wide MLP, each candidate in a fresh process: peak RSS (VmHWM) and PSS after
   backward (PSS splits shared-memory pages among the processes that map them; RSS counts them fully).
   trainlib's param.grad are views of its buckets; DDP's default keeps gradients and buckets apart.
3. Bus bandwidth of trainlib's bucket path (sync.start + sync.wait on one S-byte bucket) vs raw gloo
   all_reduce and MPI Allreduce of S bytes: busbw = algbw * 2(n-1)/n (nccl-tests' definition).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainlib.benchmarks import dp_workloads as wl
from trainlib.benchmarks.harness import median
from trainlib.testing import run_ranks

N_RANKS = 2
REFERENCE = "ddp-default"
TARGETS = {"gpt": 1.0, "wide_mlp": 0.67}  # trainlib (best transport) / DDP step time


def deepspeed_status() -> str | None:
    """None when DeepSpeed imports; else the error (recorded in the result)."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed torch==<your torch>)"
    r = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=120)
    return None if r.returncode == 0 else r.stderr.strip()[-1500:]


def _mpiexec() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return None
    return shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


def ordered(specs: dict[str, dict]) -> dict[str, dict]:
    """DDP default first: it is the reference the others' final weights are compared with."""
    return {REFERENCE: specs[REFERENCE], **{k: v for k, v in specs.items() if k != REFERENCE}}


def step_time(workload: str, specs: dict[str, dict], reps: int, k: int, tiny: bool = False,
              quick: bool = True) -> dict[str, Any]:
    """One spawned group of 2 ranks: every candidate side by side (see dp_ranks.step_group)."""
    from trainlib.benchmarks.dp_ranks import step_group

    res = run_ranks(step_group, N_RANKS, workload, ordered(specs), reps, k, tiny, quick, timeout_s=900,
                    env={"DS_ACCELERATOR": "cpu"})[0]
    return summarize_steps(res)


def summarize_steps(res: dict[str, Any]) -> dict[str, Any]:
    med = {n: median(ts) for n, ts in res["step_s"].items()}
    ddp = {n: t for n, t in med.items() if n.startswith("ddp")}
    best = min(ddp, key=ddp.get)
    res["median_step_ms"] = {n: round(t * 1e3, 3) for n, t in med.items()}
    res["ddp_best"] = best
    res["ratio_vs_ddp_default"] = {n: round(t / med[REFERENCE], 4) for n, t in med.items() if not n.startswith("ddp")}
    res["ratio_vs_ddp_best"] = {n: round(t / med[best], 4) for n, t in med.items() if not n.startswith("ddp")}
    return res


def mpi_step_and_busbw(cfg: dict[str, Any]) -> dict[str, Any]:
    """Start `mpiexec -n 2` running this module's --mpi-child; rank 0 prints the JSON result."""
    exe = _mpiexec()
    if exe is None:
        return {"error": "mpi4py/mpiexec not found (pip install mpi4py mpich)"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAINLIB_BENCH_DP_MPI": json.dumps(cfg)}
    out = subprocess.run([exe, "-n", str(N_RANKS), sys.executable, "-m", "trainlib.benchmarks.bench_dp", "--mpi-child"],
                         env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"error": f"mpiexec exited {out.returncode}: {out.stderr[-2000:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def mpi_child() -> None:
    """Under mpiexec: tl.init() brings up gloo beside MPI; trainlib over MPI vs DDP over gloo, same job."""
    import torch.distributed as dist

    import trainlib as tl
    from trainlib.benchmarks.dp_ranks import busbw_rank, step_group

    cfg = json.loads(os.environ["TRAINLIB_BENCH_DP_MPI"])
    tl.init(backend="gloo", device="cpu")
    res: dict[str, Any] = {"steps": {}}
    for workload, ddp_best in cfg["ddp_best"].items():
        specs = {REFERENCE: {"kind": "ddp"}, "trainlib-mpi": {"kind": "tl", "transport": "mpi"},
                 "trainlib": {"kind": "tl", "transport": "torch"}}
        if ddp_best != REFERENCE:
            specs[ddp_best] = cfg["specs"][ddp_best]
        res["steps"][workload] = summarize_steps(step_group(workload, specs, cfg["reps"], cfg["k"], False,
                                                            cfg["quick"]))
    res["busbw"] = busbw_rank(cfg["sizes"], ["mpi"], cfg["reps"], cfg["quick"], mpi_raw=True)
    if dist.get_rank() == 0:
        print(json.dumps(res), flush=True)
    from trainlib import runtime

    runtime.shutdown()


def memory(specs: dict[str, dict], steps: int, reps: int) -> dict[str, Any]:
    """Each candidate in fresh processes, alternating; medians of the per-run maxima over ranks."""
    from trainlib.benchmarks.dp_ranks import memory_rank

    runs: dict[str, list[dict]] = {n: [] for n in specs}
    for r in range(reps):
        names = list(specs)
        for n in names[r % len(names):] + names[: r % len(names)]:
            per_rank = run_ranks(memory_rank, N_RANKS, "wide_mlp", n, specs[n], steps, timeout_s=600)
            runs[n].append({k: max(pr[k] for pr in per_rank) for k in per_rank[0]})
    out = {n: {k: (median([x[k] for x in rs]) if isinstance(rs[0][k], (int, float)) and not isinstance(rs[0][k], bool)
                   else rs[0][k]) for k in rs[0]} for n, rs in runs.items()}
    g = out[REFERENCE]["grad_bytes"]
    for n, m in out.items():
        m["peak_rss_saving_vs_ddp_default_bytes"] = out[REFERENCE]["peak_rss"] - m["peak_rss"]
        m["peak_pss_saving_vs_ddp_default_bytes"] = out[REFERENCE]["peak_pss_after_backward"] - m["peak_pss_after_backward"]
        m["rss_saving_in_grad_bytes"] = round(m["peak_rss_saving_vs_ddp_default_bytes"] / g, 3)
        m["rss_after_backward_saving_in_grad_bytes"] = round(
            (out[REFERENCE]["rss_after_backward"] - m["rss_after_backward"]) / g, 3)
        m["pss_saving_in_grad_bytes"] = round(m["peak_pss_saving_vs_ddp_default_bytes"] / g, 3)
    return out


def busbw(sizes: list[int], transports: list[str], reps: int, quick: bool) -> dict[str, Any]:
    from trainlib.benchmarks.dp_ranks import busbw_rank

    return run_ranks(busbw_rank, N_RANKS, sizes, transports, reps, quick, timeout_s=900)[0]


def busbw_rows(raw: dict[str, dict], sizes: list[int]) -> list[dict[str, Any]]:
    factor = 2 * (N_RANKS - 1) / N_RANKS
    rows = []
    for s in sizes:
        row: dict[str, Any] = {"bytes": s}
        for name, by_size in raw.items():
            ts = by_size.get(s, by_size.get(str(s)))
            if ts:
                t = median(ts)
                row[name] = {"time_ms": round(t * 1e3, 3), "busbw_GBps": round(s / t / 1e9 * factor, 4)}
        rows.append(row)
    return rows


def run(quick: bool) -> dict:
    # one step per candidate per round, many rounds: a slow phase of the shared machine (seconds) then
    # lands on every candidate instead of on the few that a longer round would have been timing
    reps, k = (5, 1) if quick else (21, 1)
    # DeepSpeed's import costs ~10 s per spawned group here: the full run has it, --quick (CI) does not
    ds_error = deepspeed_status() if not quick else "skipped in --quick (run without --quick)"
    specs = wl.candidate_specs(with_shm=wl.shm_available(), with_ds=ds_error is None, ddp_grid=True)
    steps = {name: step_time(name, specs, reps, k, quick=quick) for name in wl.workloads(quick)}
    sizes = [m * wl.MB for m in ((1, 4) if quick else (1, 4, 16, 64))]
    mpi = mpi_step_and_busbw({"ddp_best": {n: s["ddp_best"] for n, s in steps.items()}, "specs": specs,
                              "reps": reps, "k": k, "quick": quick, "sizes": sizes})
    mem_specs = {n: specs[n] for n in (REFERENCE, "ddp-bucket25-view", "trainlib", "trainlib-shm") if n in specs}
    mem = memory(mem_specs, steps=2 if quick else 3, reps=1 if quick else 3)
    transports = ["torch"] + (["shm"] if wl.shm_available() else [])
    bw_raw = busbw(sizes, transports, 3 if quick else 5, quick)
    if "busbw" in mpi:
        bw_raw.update(mpi.pop("busbw"))
    summary = headline(steps, mpi, mem)
    return {"definitions": {"ranks": N_RANKS, "repetitions": reps, "steps_per_repetition": k, "statistic": "median",
                            "busbw": "algbw * 2(n-1)/n", "ddp_default": "DistributedDataParallel(model)",
                            "targets": {"step_time_vs_ddp": TARGETS, "peak_rss": "<= DDP default - 0.9 x grad bytes"}},
            "deepspeed_error": ds_error, "step_time": steps, "mpi": mpi, "memory": mem,
            "busbw": busbw_rows(bw_raw, sizes), "summary": summary}


def headline(steps: dict, mpi: dict, mem: dict) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for wname, st in steps.items():
        for n in st["ratio_vs_ddp_default"]:
            if n.startswith("trainlib") or n.startswith("deepspeed"):
                s[f"{wname}:{n}/ddp_default"] = st["ratio_vs_ddp_default"][n]
                s[f"{wname}:{n}/ddp_best"] = st["ratio_vs_ddp_best"][n]
        s[f"{wname}:ddp_best"] = st["ddp_best"]
        cands = {n: st["ratio_vs_ddp_best"][n] for n in st["ratio_vs_ddp_best"]
                 if n.startswith("trainlib") and n != "trainlib-bf16"}  # bf16 changes the numbers: not a transport
        m = mpi.get("steps", {}).get(wname)
        if m:
            s[f"{wname}:trainlib-mpi/ddp_default (mpiexec job)"] = m["ratio_vs_ddp_default"]["trainlib-mpi"]
            s[f"{wname}:trainlib-mpi/ddp_best (mpiexec job)"] = m["ratio_vs_ddp_best"]["trainlib-mpi"]
            cands["trainlib-mpi"] = m["ratio_vs_ddp_best"]["trainlib-mpi"]
        best = min(cands, key=cands.get)
        s[f"{wname}:best_transport"] = best
        s[f"{wname}:best_vs_ddp_best"] = cands[best]
        s[f"{wname}:meets_target_{TARGETS[wname]}"] = cands[best] <= TARGETS[wname]
        s[f"{wname}:max_param_diff_trainlib_vs_ddp"] = st["max_param_diff_vs_reference"].get("trainlib")
    for n, m in mem.items():
        if n != REFERENCE:
            s[f"memory:{n}:peak_rss_saving_in_grad_bytes"] = m["rss_saving_in_grad_bytes"]
            s[f"memory:{n}:peak_pss_saving_in_grad_bytes"] = m["pss_saving_in_grad_bytes"]
            s[f"memory:{n}:rss_after_backward_saving_in_grad_bytes"] = m["rss_after_backward_saving_in_grad_bytes"]
    g, big = mem[REFERENCE]["grad_bytes"], mem[REFERENCE]["largest_grad_bytes"]
    s["memory:grad_bytes"] = g
    # after zero_grad(set_to_none=True) autograd allocates each gradient afresh: the largest one is a
    # transient at the peak for every wrapper, so the attainable peak saving is 1 - largest/total
    s["memory:attainable_peak_saving_in_grad_bytes"] = round(1 - big / g, 3)
    return s


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["step_time"]
    fig, grid = plt.subplots(2, 2, figsize=(13, 9))
    axes = list(grid.flat)
    for ax, (wname, st) in zip(axes, steps.items()):
        med = st["median_step_ms"]
        names = sorted(med, key=med.get)
        mpi = result.get("mpi", {}).get("steps", {}).get(wname)
        vals = [med[n] / med[REFERENCE] for n in names]
        if mpi:  # the mpiexec job's own DDP is its reference
            names.append("trainlib-mpi*")
            vals.append(mpi["ratio_vs_ddp_default"]["trainlib-mpi"])
        colors = ["tab:blue" if n.startswith("trainlib") else "tab:orange" if n.startswith("ddp") else "tab:green"
                  for n in names]
        ax.barh(names, vals, color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"{wname}: step time / DDP default (median)")
        ax.set_xlabel("ratio (lower is faster); * = measured in the mpiexec job")
    ax = axes[len(steps)]
    mem = result["memory"]
    ax.bar(list(mem), [m["peak_rss"] / 2**20 for m in mem.values()], label="peak RSS")
    ax.bar(list(mem), [m["peak_pss_after_backward"] / 2**20 for m in mem.values()], width=0.4, label="PSS after backward")
    ax.set_ylabel("MiB")
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_title("wide MLP: memory per rank (fresh processes)")
    ax.legend()
    ax = axes[-1]
    rows = result["busbw"]
    for name in sorted({k for r in rows for k in r if k != "bytes"}):
        pts = [(r["bytes"], r[name]["busbw_GBps"]) for r in rows if name in r]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bucket bytes")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title("bucket all-reduce, 2 ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if "--mpi-child" in sys.argv:
        mpi_child()


def table_headline(s: dict) -> str:
    """This benchmark's line in `trainlib bench table` (benchmarks/README.md), from a result's summary."""
    from trainlib.benchmarks.harness import ratio_text

    parts = []
    for w in ("gpt", "wide_mlp"):
        if f"{w}:best_vs_ddp_best" in s:
            parts.append(f"{w} step time {ratio_text(s[f'{w}:best_vs_ddp_best'])} of the best DDP config "
                         f"({s[f'{w}:best_transport']}; {ratio_text(s[f'{w}:trainlib-shm/ddp_default'])} of default DDP with shm)")
    mem = s.get("memory:trainlib:peak_rss_saving_in_grad_bytes")
    if mem is not None:
        parts.append(f"peak RSS below DDP default by {mem:.2f} x grad bytes "
                     f"(attainable {s['memory:attainable_peak_saving_in_grad_bytes']:.2f})")
    return "; ".join(parts)
