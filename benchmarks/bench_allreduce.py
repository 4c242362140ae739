"""All-reduce bandwidth sweep, nccl-tests definitions, with memcpy as the physical limit.

    trainlib bench allreduce [--quick]
    trainlib bench allreduce --hier [--quick]    hierarchical vs flat gloo, 4 ranks as 2 emulated nodes
    trainlib bench allreduce --zero [--quick]    reduce-scatter + all-gather (sharded DP) vs all-reduce, per transport

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


def run(quick: bool, argv: list[str] | None = None) -> dict:
    if argv and "--hier" in argv:
        return run_hier(quick)
    if argv and "--zero" in argv:
        return run_zero(quick)
    if argv:
        raise SystemExit(f"bench allreduce: unknown arguments {argv}; the options are --hier and --zero")
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
    if "zero" in result["definitions"]:
        return None  # three ratios per transport: the JSON's table says it
    if "hierarchical" in result["definitions"]:
        return plot_hier(result, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("memcpy", "mpi", "gloo"):
        pts = [(r["bytes"], r[name]["busbw_GBps"]) for r in rows if name in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name if name != "memcpy" else "memcpy (limit)")
    _finish_busbw_plot(fig, ax, f"all-reduce, {N_RANKS} ranks, one node (CPU)", path)


# ---- hierarchical vs flat, 4 ranks as 2 emulated nodes ------------------------------------------
HIER_RANKS, HIER_NODES = 4, 2
HIER_TRANSPORTS = ("gloo", "hierarchical", "shm")


def hier_sizes(quick: bool) -> list[int]:
    return [64 * KB, 1 * MB, 4 * MB] if quick else [16 * KB, 256 * KB, 4 * MB, 16 * MB, 64 * MB]


def hier_child(size_list: list[int], quick: bool, reps: int) -> dict[str, list[dict[int, float]]]:
    """Per rank: {transport: [{size: seconds per all-reduce} per round]}, transports alternating.

    gloo: comm.all_reduce over the 4 ranks (TCP loopback); hierarchical: the transport's own
    ShmGroup (shm in each emulated node, gloo between the 2 nodes); shm: one ShmGroup over all 4
    ranks, the single-node transport, for scale. Buffers hold zeros so repeated sums stay finite."""
    import torch.distributed as dist

    from trainlib import comm, runtime
    from trainlib.sync import hierarchical, shm

    rank = dist.get_rank()
    os.environ[shm.NODE_ID_ENV] = f"emulated-node-{rank * HIER_NODES // HIER_RANKS}"
    group, timeout_s = dist.group.WORLD, runtime.get_runtime().timeout_s
    facts = shm.gather_node_facts(group, 4 * sum(size_list))
    layout = hierarchical.NodeLayout.from_facts(facts, list(range(HIER_RANKS)), rank)
    assert len(layout.nodes) == HIER_NODES, layout
    groups = {"hierarchical": hierarchical.build_group(group, timeout_s, layout), "shm": shm.ShmGroup(group, timeout_s)}
    for g in groups.values():
        for i, s in enumerate(size_list):
            g.alloc(i, s // 4, torch.float32)
        g.map_peers()
    # the figures are only worth having if the transport sums right: check once against gloo
    x = torch.randn(size_list[0] // 4, generator=torch.Generator().manual_seed(rank))
    groups["hierarchical"].buffers[0][groups["hierarchical"].me].copy_(x)
    groups["hierarchical"].allreduce(0)
    comm.all_reduce(x)
    assert torch.allclose(groups["hierarchical"].buffers[0][groups["hierarchical"].me], x, atol=1e-5)
    groups["hierarchical"].buffers[0][groups["hierarchical"].me].zero_()
    flat = {s: torch.zeros(s // 4) for s in size_list}
    run_one = {"gloo": lambda i, s: comm.all_reduce(flat[s]),
               "hierarchical": lambda i, s: groups["hierarchical"].allreduce(i),
               "shm": lambda i, s: groups["shm"].allreduce(i)}
    out: dict[str, list[dict[int, float]]] = {n: [] for n in HIER_TRANSPORTS}
    for r in range(reps):
        order = HIER_TRANSPORTS[r % 3:] + HIER_TRANSPORTS[:r % 3]  # rotate: a slow phase hits all
        for name in order:
            res = {}
            for i, s in enumerate(size_list):
                comm.barrier()
                res[s] = _time_loop(lambda: run_one[name](i, s), iters_for(s, quick))
            out[name].append(res)
    for g in groups.values():
        g.close()
    return out


def run_hier(quick: bool) -> dict:
    size_list, reps = hier_sizes(quick), 3 if quick else 5
    per_rank = run_ranks(hier_child, HIER_RANKS, size_list, quick, reps, timeout_s=900)
    factor = 2 * (HIER_RANKS - 1) / HIER_RANKS
    rows = []
    for s in size_list:
        row: dict = {"bytes": s}
        for name in HIER_TRANSPORTS:
            # a collective ends when its slowest rank does: per round, the slowest rank's time
            t = median([max(pr[name][k][s] for pr in per_rank) for k in range(reps)])
            bw = s / t / 1e9
            row[name] = {"time_us": round(t * 1e6, 2), "algbw_GBps": round(bw, 4), "busbw_GBps": round(bw * factor, 4)}
        row["hierarchical_speedup_over_gloo"] = round(row["gloo"]["time_us"] / row["hierarchical"]["time_us"], 2)
        rows.append(row)
    return {"result_suffix": "-hier",
            "definitions": {"hierarchical": "shm reduce-scatter in the node, gloo all-reduce of each chunk across "
                                            "nodes, shm all-gather in the node",
                            "gloo": "flat comm.all_reduce over all ranks", "shm": "single-node shm transport",
                            "ranks": HIER_RANKS, "nodes": HIER_NODES, "node_emulation": "$TRAINLIB_NODE_ID per rank",
                            "caveat": "one machine: the cross-node step runs over TCP loopback, so this mostly "
                                      "measures shared memory against loopback TCP, not a network link",
                            "algbw": "bytes / time", "busbw": "algbw * 2(n-1)/n", "dtype": "float32",
                            "repetitions": reps, "statistic": "median over rounds of the slowest rank's time"},
            "rows": rows,
            "summary": {f"hierarchical_speedup_over_gloo_{r['bytes'] // KB}KB": r["hierarchical_speedup_over_gloo"]
                        for r in rows}}


def plot_hier(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in HIER_TRANSPORTS:
        ax.plot([r["bytes"] for r in rows], [r[name]["busbw_GBps"] for r in rows], marker="o", label=name)
    _finish_busbw_plot(fig, ax, f"all-reduce, {HIER_RANKS} ranks as {HIER_NODES} emulated nodes on one machine (CPU)",
                       path)


def _finish_busbw_plot(fig, ax, title: str, path: str) -> None:
    """Log-log busbw against message size, as nccl-tests plots it; saved and closed."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- sharded DP: reduce-scatter + all-gather vs all-reduce, per transport ----------------------
# "torch:IMPL": the torch transport with gloo's flat collectives forced to one implementation at
# every size (comm.GLOO_IMPL), beside the default size-based choice: the data behind that choice
ZERO_TRANSPORTS = ("torch", "torch:native", "torch:p2p", "shm", "hierarchical")
_GLOO_FORCED = {"native": {"reduce_scatter": ("native", "native"), "all_gather": ("native", "native")},
                "p2p": {"reduce_scatter": ("p2p", "p2p"), "all_gather": ("p2p", "p2p")}}


def zero_sizes(quick: bool) -> list[int]:
    return [1 * MB, 4 * MB] if quick else [4 * MB, 16 * MB, 64 * MB]


def zero_child(transports: tuple[str, ...], size_list: list[int], quick: bool, reps: int) -> dict:
    """Per rank: {transport: {"ar"|"rs_ag": [{size: seconds} per round]}}, the two alternating in
    each round. Buffers come from the transport's alloc() and are reduced through AllReduce's own
    start()/start_reduce_scatter()/start_all_gather()/wait(), as the wrappers drive them.
    hierarchical runs as 2 emulated nodes of 1 rank ($TRAINLIB_NODE_ID)."""
    import types

    import torch.distributed as dist

    import trainlib as tl
    from trainlib import comm
    from trainlib.sync import shm

    out: dict = {}
    default_impl = dict(comm.GLOO_IMPL)
    for t in transports:
        if t == "hierarchical":
            os.environ[shm.NODE_ID_ENV] = f"zero-node-{dist.get_rank()}"
        comm.GLOO_IMPL.update(_GLOO_FORCED.get(t.partition(":")[2], default_impl))
        sync = tl.AllReduce(transport=t.partition(":")[0])
        sync.bind_group(dist.group.WORLD, need_bytes=sum(size_list))
        flats = {s: sync.alloc(s // 4, torch.float32, "cpu") for s in size_list}

        def ar(s: int) -> None:
            sync.start(types.SimpleNamespace(comm=flats[s]))
            sync.wait()

        def rs_ag(s: int) -> None:
            sync.start_reduce_scatter(flats[s])
            sync.wait()
            sync.start_all_gather(flats[s])
            sync.wait()

        runs = {"ar": ar, "rs_ag": rs_ag}
        out[t] = {"ar": [], "rs_ag": []}
        for r in range(reps):
            for name in (("ar", "rs_ag") if r % 2 == 0 else ("rs_ag", "ar")):
                res = {}
                for s in size_list:
                    comm.barrier()
                    res[s] = _time_loop(lambda: runs[name](s), iters_for(s, quick))
                out[t][name].append(res)
        sync.close()
        os.environ.pop(shm.NODE_ID_ENV, None)
    comm.GLOO_IMPL.update(default_impl)
    return out


def zero_mpi_child(quick: bool) -> None:
    """Under mpiexec: zero_child over the MPI transport; every rank prints one JSON line."""
    import trainlib as tl

    rt = tl.init()
    res = zero_child(("mpi",), zero_sizes(quick), quick, 3 if quick else 5)
    sys.stdout.write(json.dumps({"rank": rt.rank, "result": res}) + "\n")  # one write: no interleaving
    sys.stdout.flush()


def run_zero(quick: bool) -> dict:
    size_list, reps = zero_sizes(quick), 3 if quick else 5
    per_rank = run_ranks(zero_child, N_RANKS, ZERO_TRANSPORTS, size_list, quick, reps, timeout_s=1800)
    exe = _mpiexec()
    if exe is not None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([exe, "-n", str(N_RANKS), sys.executable, "-m", "trainlib.benchmarks.bench_allreduce",
                              "--zero-mpi-child", "--quick" if quick else "--full"], env=env, capture_output=True,
                             text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"mpiexec --zero run failed: {out.stderr[-2000:]}")
        lines = sorted((json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")), key=lambda d: d["rank"])
        mpi_ranks = [d["result"] for d in lines]
        per_rank = [{**a, **{t: {k: [{int(s): v for s, v in rnd.items()} for rnd in rounds]
                                 for k, rounds in b.items()} for t, b in m.items()}}
                    for a, m in zip(per_rank, mpi_ranks)]
    rows, summary = [], {}
    for t in per_rank[0]:
        for s in size_list:
            # a collective ends when its slowest rank does: per round, the slowest rank's time
            med = {k: median([max(pr[t][k][i][s] for pr in per_rank) for i in range(reps)]) for k in ("ar", "rs_ag")}
            ratio = round(med["rs_ag"] / med["ar"], 3)
            rows.append({"transport": t, "bytes": s, "all_reduce_ms": round(med["ar"] * 1e3, 3),
                         "reduce_scatter_plus_all_gather_ms": round(med["rs_ag"] * 1e3, 3), "ratio": ratio})
            summary[f"{t}_rs_ag_over_ar_{s // MB}MB"] = ratio
    return {"result_suffix": "-zero",
            "definitions": {"zero": "reduce-scatter then all-gather of one flat fp32 buffer (what sharded DP does "
                                    "per bucket and step) against one all-reduce of it, through tl.AllReduce",
                            "ratio": "(reduce-scatter + all-gather time) / all-reduce time; 1.0 = no price",
                            "hierarchical": "2 emulated nodes of 1 rank: the cross-node gloo step only",
                            "torch:native / torch:p2p": "torch transport, gloo's reduce_scatter_tensor/"
                                                        "all_gather_into_tensor or point-to-point at every size "
                                                        "(plain torch: comm.GLOO_IMPL's size-based choice)",
                            "ranks": N_RANKS, "dtype": "float32", "repetitions": reps,
                            "statistic": "median over alternating rounds of the slowest rank's time"},
            "rows": rows, "summary": summary}


if __name__ == "__main__":
    if "--zero-mpi-child" in sys.argv:
        zero_mpi_child("--quick" in sys.argv)
        sys.exit(0)
    if "--mpi-child" in sys.argv:
        mpi_child(sizes("--quick" in sys.argv), "--quick" in sys.argv)


def table_headline(s: dict) -> str:
    """This benchmark's line in `trainlib bench table` (benchmarks/README.md), from a result's summary."""
    mb = s["largest_bytes"] / 2**20
    mpi = f", MPI {s['mpi_busbw_GBps']:.2f}" if s.get("mpi_busbw_GBps") else ""
    small = f"; at 4 KB MPI is {s['small_4KB_mpi_over_gloo_speedup']}x faster than gloo" \
        if s.get("small_4KB_mpi_over_gloo_speedup") else ""
    return (f"busbw at {mb:g} MB: gloo {s['gloo_busbw_GBps']:.2f}{mpi} GB/s; memcpy {s['memcpy_GBps']:.1f} GB/s "
            f"(gloo = {s['gloo_fraction_of_memcpy']:.3f} of memcpy){small}")
