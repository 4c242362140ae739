"""All-reduce bandwidth sweep, nccl-tests definitions, with memcpy as the physical limit.

    trainlib bench allreduce [--quick]

For a message of S bytes reduced over n ranks in t seconds (nccl-tests, PERFORMANCE.md):
    algbw = S / t                      busbw = algbw * 2(n-1)/n
busbw is comparable with the hardware's bandwidth whatever n is. The reference limit is
single-process memcpy bandwidth (torch copy_ of S bytes) measured in the same run. Transports:
gloo (torch.distributed over TCP loopback) on 2 ranks, and MPI (mpi4py Allreduce) when mpiexec
and mpi4py are present: the benchmark starts `mpiexec -n 2` itself so all three are measured in
one run, in alternating rounds.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from trainlib.benchmarks.harness import median
from trainlib.testing import run_ranks

N_RANKS = 2
KB, MB = 1024, 1024 * 1024


def sizes(quick: bool) -> list[int]:
    top = 4 * MB if quick else 256 * MB
    out, s = [], 4 * KB
    while s <= top:
        out.append(s)
        s *= 4
    return out


def iters_for(nbytes: int, quick: bool) -> int:
    budget = 8 * MB if quick else 64 * MB  # bytes moved per measurement: small sizes repeat more
    return max(2, min(200, budget // nbytes))


def _time_loop(fn, iters: int) -> float:
    fn()  # warm-up: first-touch page faults, connection set-up
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def gloo_sweep(size_list: list[int], quick: bool) -> dict[int, float]:
    """Per rank: seconds per all-reduce of each size (fp32)."""
    from trainlib import comm

    out = {}
    for s in size_list:
        t = torch.ones(s // 4)
        comm.barrier()
        out[s] = _time_loop(lambda: comm.all_reduce(t), iters_for(s, quick))
    return out


def memcpy_sweep(size_list: list[int], quick: bool) -> dict[int, float]:
    out = {}
    for s in size_list:
        src, dst = torch.ones(s // 4), torch.empty(s // 4)
        out[s] = _time_loop(lambda: dst.copy_(src), iters_for(s, quick))
    return out


def mpi_child(size_list: list[int], quick: bool) -> None:
    """Run under mpiexec: rank 0 prints {size: seconds} as JSON."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    res = {}
    for s in size_list:
        buf = torch.ones(s // 4).numpy()
        comm.Barrier()
        res[s] = _time_loop(lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), iters_for(s, quick))
    if comm.Get_rank() == 0:
        print(json.dumps(res), flush=True)


def _mpiexec() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


def mpi_sweep(size_list: list[int], quick: bool) -> dict[int, float] | None:
    exe = _mpiexec()
    if exe is None:
        return None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([exe, "-n", str(N_RANKS), sys.executable, "-m", "trainlib.benchmarks.bench_allreduce",
                          "--mpi-child", "--quick" if quick else "--full"], env=env, capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"mpiexec sweep failed: {out.stderr[-2000:]}")
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def run(quick: bool) -> dict:
    size_list = sizes(quick)
    reps = 3 if quick else 5
    rounds: dict[str, list[dict[int, float]]] = {"gloo": [], "mpi": [], "memcpy": []}
    for r in range(reps):
        # alternate the order each round so a slow phase of the shared machine hits all of them
        order = ["gloo", "mpi", "memcpy"] if r % 2 == 0 else ["memcpy", "mpi", "gloo"]
        for name in order:
            if name == "gloo":
                rounds["gloo"].append(run_ranks(gloo_sweep, N_RANKS, size_list, quick, timeout_s=900)[0])
            elif name == "mpi":
                res = mpi_sweep(size_list, quick)
                if res is not None:
                    rounds["mpi"].append(res)
            else:
                rounds["memcpy"].append(memcpy_sweep(size_list, quick))
    factor = 2 * (N_RANKS - 1) / N_RANKS
    rows = []
    for s in size_list:
        row = {"bytes": s}
        for name, rs in rounds.items():
            if not rs:
                continue
            t = median([x[s] for x in rs])
            bw = s / t / 1e9
            row[name] = {"time_us": round(t * 1e6, 2), "algbw_GBps": round(bw, 4),
                         "busbw_GBps": round(bw * factor if name != "memcpy" else bw, 4)}
        rows.append(row)
    big = rows[-1]
    summary = {"largest_bytes": big["bytes"], "gloo_busbw_GBps": big["gloo"]["busbw_GBps"],
               "memcpy_GBps": big["memcpy"]["busbw_GBps"],
               "gloo_fraction_of_memcpy": round(big["gloo"]["busbw_GBps"] / big["memcpy"]["busbw_GBps"], 4)}
    if "mpi" in big:
        summary.update(mpi_busbw_GBps=big["mpi"]["busbw_GBps"],
                       mpi_fraction_of_memcpy=round(big["mpi"]["busbw_GBps"] / big["memcpy"]["busbw_GBps"], 4),
                       small_4KB_mpi_over_gloo_speedup=round(rows[0]["gloo"]["time_us"] / rows[0]["mpi"]["time_us"], 1))
    return {"definitions": {"algbw": "bytes / time", "busbw": "algbw * 2(n-1)/n (memcpy: bytes / time)",
                            "ranks": N_RANKS, "dtype": "float32", "repetitions": reps, "statistic": "median"},
            "rows": rows, "summary": summary}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("memcpy", "mpi", "gloo"):
        pts = [(r["bytes"], r[name]["busbw_GBps"]) for r in rows if name in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name if name != "memcpy" else "memcpy (limit)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"all-reduce, {N_RANKS} ranks, one node (CPU)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if "--mpi-child" in sys.argv:
        mpi_child(sizes("--quick" in sys.argv), "--quick" in sys.argv)
