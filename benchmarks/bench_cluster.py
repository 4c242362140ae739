"""Parameter server vs all-reduce across real (emulated) links: the matrix, and a cost model checked on it.

    trainlib bench cluster [--quick] [--rates 1gbit,2500mbit,10gbit]      (root: network namespaces)

Nodes are namespaces of trainlib.netcluster joined by tbf-shaped veth links. Two jobs per workload,
each started once (`trainlib launch` on every node, PyTorchJob env) and timed at every NIC rate
(the links are reshaped between phases while the job runs):

  flat:  3 worker nodes x 1 process, + 3 CPU-only server nodes. Backends: compute only (floor),
         all-reduce (gloo ring) with and without bf16 compression, PS colocated (a server per
         worker node), PS dedicated (the 3 server nodes). PS has no compression.
  hier:  2 worker nodes x 2 processes. Backends: floor, flat gloo all-reduce, hierarchical
         all-reduce (shm in the node, gloo across), each with and without bf16.

Workloads: the default GPT (3.3 MiB of fp32 gradients) and a wide MLP (32 MiB). Every backend is a
model copy in the same process; steps alternate between copies (harness.alternate), medians.

Cost model (bytes on the busiest NIC in one direction, M = gradient bytes, n ranks, N nodes with
p ranks each, k dedicated servers):
  ring all-reduce          2(n-1)/n * M            (one rank per node boundary sends M/n per step)
  hierarchical             2(N-1)/N * M            (each byte crosses the network once per node)
  PS colocated             2p(N-1)/N * M           (pushes to and pulls from the other nodes' servers)
  PS dedicated             max(p*M, n*M/k)         (a worker NIC moves its M; a server NIC n*M/k)
  step = floor + max(t_free_b, kappa_b * wire / B_link)
The sync is a pipeline of CPU work (packing, summing, copies, MACs, per-message costs) and wire
time, so it takes as long as the slower of the two. Measured inputs: B_link, the goodput of one TCP
stream over the shaped link (before the job starts, median of 3: the NIC's real rate, like a
datasheet figure); t_free_b, what the backend's sync costs over an unshaped link (an extra phase,
run last: its CPU and per-message costs with the network out of the way); the floor, the
compute-only step (median over all phases of the job). One parameter per backend, kappa_b (how
far a real link's time is from wire/B_link: TCP windows, tbf bursts, idle gaps between messages),
is fitted on the 1 Gbit/s cells only. Every other cell is predicted with no refitting, and the
error is reported. BytePS's gain (up to +84%) needs n > 2 workers and
k ~ n/2 spare servers: with n = 3, k = 3 the model gives PS 0.75x the ring's bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1024 * 1024
TOKEN = "bench-cluster-" + "0123456789abcdef" * 3
SERVER_PORT = 7300
PHASE_WAIT_S = 600.0
WORKLOADS = ("gpt", "mlp")
UNSHAPED = "unshaped"       # the phase that measures each backend's own costs (t_free)


# -- cost model ---------------------------------------------------------------------------------
def wire_bytes(backend: str, m: float, nodes: int, per_node: int, servers: int) -> float:
    """Bytes on the busiest NIC, one direction, for one step's gradient sync (see the docstring)."""
    n = nodes * per_node
    base = backend.removesuffix("_bf16")
    m = m / 2 if backend.endswith("_bf16") else m
    if base == "allreduce":
        return 2 * (n - 1) / n * m
    if base == "hierarchical":
        return 2 * (nodes - 1) / nodes * m
    if base == "ps_colocated":
        return 2 * per_node * (nodes - 1) / nodes * m
    if base == "ps_dedicated":
        return max(per_node * m, n * m / servers)
    raise ValueError(backend)


def predict(c: dict, kappa: float) -> float:
    return c["floor_cal_s"] + max(c["free_s"], kappa * c["wire_bytes"] / c["link_Bps"])


def fit_kappa(cells: list[dict]) -> float:
    """kappa minimising the squared relative error of predict() over cells (a 1-D search: the max()
    makes the problem piecewise, and one parameter is cheap to scan)."""
    def loss(k: float) -> float:
        return sum(((predict(c, k) - c["median_s"]) / c["median_s"]) ** 2 for c in cells)

    grid = [i / 1000 for i in range(1, 4001)]
    return min(grid, key=loss) if cells else 1.0


def model(cells: list[dict], calibration_rate: str) -> dict:
    """Fit kappa per backend on the calibration-rate cells, predict every cell ('predicted_s', 'error')."""
    params = {}
    for b in sorted({c["backend"] for c in cells}):
        params[b] = {"kappa": fit_kappa([c for c in cells if c["backend"] == b and c["rate"] == calibration_rate])}
    for c in cells:
        c["predicted_s"] = round(predict(c, params[c["backend"]]["kappa"]), 5)
        c["error"] = round(abs(c["predicted_s"] - c["median_s"]) / c["median_s"], 4)
    checked = [c["error"] for c in cells if c["rate"] != calibration_rate]
    return {"params": params, "calibrated_on": calibration_rate,
            "median_error": round(statistics.median(checked), 4) if checked else None,
            "worst_error": round(max(checked), 4) if checked else None, "cells_checked": len(checked)}


# -- worker side (one process per rank, started by `trainlib launch` on each node) --------------------
def _workload(which: str):
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    if which == "gpt":
        from trainlib.config import Config
        from trainlib.models.gpt import lm_loss
        from trainlib.trainer import build_model

        cfg = Config()
        model = build_model(cfg)
        g = torch.Generator().manual_seed(1)
        # batch 2: the gradients (what the network carries) do not depend on it, the compute floor does
        x = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len), generator=g)
        return model, lambda m: lm_loss(m(x), x)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024))   # 32 MiB of grads
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(1))
    return model, lambda m: m(x).pow(2).mean()


def _backends(layout: str, servers: list[str]) -> dict:
    import trainlib as tl

    if layout == "flat":
        return {"floor": None, "allreduce": tl.AllReduce(transport="torch"),
                "allreduce_bf16": tl.AllReduce(transport="torch", compress="bf16"),
                "ps_colocated": tl.ParameterServer(timeout_s=300),
                "ps_dedicated": tl.ParameterServer(servers=servers, token=TOKEN, timeout_s=300)}
    return {"floor": None, "allreduce": tl.AllReduce(transport="torch"),
            "allreduce_bf16": tl.AllReduce(transport="torch", compress="bf16"),
            "hierarchical": tl.AllReduce(transport="hierarchical"),
            "hierarchical_bf16": tl.AllReduce(transport="hierarchical", compress="bf16")}


def worker(args: argparse.Namespace) -> int:
    import torch

    import trainlib as tl
    from trainlib import comm
    from trainlib.benchmarks.harness import alternate

    rt = tl.init()
    phases = Path(args.phases)
    out = {}
    for which in WORKLOADS:
        base, loss_fn = _workload(which)
        grad_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
        models, opts = {}, {}
        for name, sync in _backends(args.layout, args.servers.split(",") if args.servers else []).items():
            m, _ = _workload(which)
            models[name] = m if sync is None else tl.DataParallel(m, sync=sync)
            opts[name] = torch.optim.SGD(models[name].parameters(), lr=1e-4)

        def one(name: str):
            def step() -> float:
                comm.barrier()
                t0 = time.perf_counter()
                opts[name].zero_grad(set_to_none=True)
                loss_fn(models[name]).backward()
                opts[name].step()
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                comm.all_reduce(dt, op="max")     # the step is as slow as its slowest rank
                return float(dt)
            return step

        cands = {n: one(n) for n in models}
        for _ in range(4):   # warm-up: connections, allocations, first-touch page faults
            for fn in cands.values():
                fn()
        for k, rate in enumerate(args.rates.split(",")):
            flag = torch.tensor([0])
            if rt.rank == 0:   # the driver reshapes the links, then says go
                deadline = time.monotonic() + PHASE_WAIT_S
                while not (phases / f"go-{which}-{k}").exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no go-{which}-{k} from the driver within {PHASE_WAIT_S}s")
                    time.sleep(0.1)
                flag[0] = 1
            comm.broadcast(flag, src=0)
            res = alternate(cands, args.reps)
            if rt.rank == 0:
                out = {"workload": which, "rate": rate, "grad_bytes": grad_bytes,
                       "median_s": {n: r["median_s"] for n, r in res.items()},
                       "all_s": {n: r["all_s"] for n, r in res.items()}}
                tmp = phases / f".res-{which}-{k}"
                tmp.write_text(json.dumps(out))
                tmp.rename(phases / f"res-{which}-{k}.json")
        for m in models.values():
            if hasattr(m, "close"):
                m.close()
    from trainlib.runtime import shutdown

    shutdown()
    return 0


# -- driver side -------------------------------------------------------------------------------------
def _shape_all(c, rate: str) -> None:
    for node in c.nodes:
        c.shape(node.index, rate=None if rate == UNSHAPED else rate)


def _run_layout(layout: str, rates: list[str], reps: int, log) -> list[dict]:
    from trainlib.netcluster import NetCluster

    worker_nodes, per_node, servers = (3, 1, 3) if layout == "flat" else (2, 2, 0)
    with NetCluster(worker_nodes + servers) as c, tempfile.TemporaryDirectory() as phases:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))}
        env.update(OMP_NUM_THREADS="1", TRAINLIB_TIMEOUT_S="600", TRAINLIB_PS_TOKEN=TOKEN)
        links = {}
        for rate in rates:   # the links' real rates, measured before any job process runs
            _shape_all(c, rate)
            links[rate] = statistics.median(c.goodput(seconds=1.0) for _ in range(3))
        log(f"{layout}: measured link goodput " + ", ".join(f"{r} {b * 8 / 1e9:.2f} Gbit/s" for r, b in links.items()))
        srv_procs, addrs = [], []
        for s in range(servers):
            node = c.nodes[worker_nodes + s]
            addrs.append(f"{node.ip}:{SERVER_PORT}")
            srv_procs.append(c.run(node.index, [sys.executable, "-m", "trainlib.cli", "ps-server", "--bind", addrs[-1],
                                                "--worker-timeout", "900"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL))
        cmd = [sys.executable, "-m", "trainlib.benchmarks.bench_cluster", "--worker", "--layout", layout,
               "--rates", ",".join(rates), "--reps", str(reps), "--phases", phases, "--servers", ",".join(addrs)]
        logs = [tempfile.TemporaryFile(mode="w+") for _ in range(worker_nodes)]
        procs = [c.launch(i, cmd, nproc_per_node=per_node, env=env, nnodes=worker_nodes, stdout=logs[i],
                          stderr=subprocess.STDOUT) for i in range(worker_nodes)]
        results = []
        try:
            for which in WORKLOADS:
                for k, rate in enumerate(rates):
                    _shape_all(c, rate)
                    link = links[rate]
                    Path(phases, f"go-{which}-{k}").touch()
                    res_path = Path(phases, f"res-{which}-{k}.json")
                    deadline = time.monotonic() + PHASE_WAIT_S
                    while not res_path.exists():
                        dead = [i for i, p in enumerate(procs) if p.poll() is not None]
                        if dead or time.monotonic() > deadline:
                            logs[dead[0] if dead else 0].seek(0)
                            raise RuntimeError(f"bench cluster {layout}/{which}/{rate}: worker node(s) {dead} exited "
                                               f"or timed out:\n{logs[dead[0] if dead else 0].read()[-3000:]}")
                        time.sleep(0.2)
                    r = json.loads(res_path.read_text())
                    log(f"{layout} {which} {rate}: link {link * 8 / 1e9:.2f} Gbit/s, "
                        + ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in r["median_s"].items()))
                    for backend, t in r["median_s"].items():
                        if backend == "floor":
                            continue
                        results.append({"layout": layout, "workload": which, "rate": rate, "backend": backend,
                                        "nodes": worker_nodes, "per_node": per_node, "servers": servers,
                                        "grad_bytes": r["grad_bytes"], "link_Bps": link, "median_s": t,
                                        "floor_s": r["median_s"]["floor"], "all_s": r["all_s"][backend],
                                        "wire_bytes": wire_bytes(backend, r["grad_bytes"], worker_nodes, per_node,
                                                                 max(servers, 1))})
            c.wait_all(procs, 120)
        finally:
            for p in srv_procs:
                p.terminate()
    return results


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainlib bench cluster")
    p.add_argument("--rates", default="1gbit,2500mbit,10gbit", help="NIC rates (tc syntax); the first calibrates")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--layouts", default="flat,hier")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--phases", help=argparse.SUPPRESS)
    p.add_argument("--servers", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(quick: bool, argv: list[str] | None = None) -> dict:
    from trainlib import netcluster

    args = _parse(argv or [])
    reason = netcluster.unavailable_reason()
    if reason:
        raise SystemExit(f"trainlib bench cluster: {reason}")
    rates = args.rates.split(",")
    reps = 2 if quick else args.reps
    if quick:
        rates = rates[:1] + rates[-1:]

    def log(msg: str) -> None:
        print(f"bench cluster: {msg}", file=sys.stderr, flush=True)

    measured = []
    for layout in args.layouts.split(","):
        measured += _run_layout(layout, [*rates, UNSHAPED], reps, log)
    cal = rates[0]
    free = {(c["layout"], c["workload"], c["backend"]): max(0.0, c["median_s"] - c["floor_s"])
            for c in measured if c["rate"] == UNSHAPED}
    phase_floors: dict[tuple, list[float]] = {}
    for c in measured:
        phase_floors.setdefault((c["layout"], c["workload"]), []).append(c["floor_s"])
    floors = {k: statistics.median(v) for k, v in phase_floors.items()}
    cells = [c for c in measured if c["rate"] != UNSHAPED]
    for c in cells:
        c["floor_cal_s"] = floors[(c["layout"], c["workload"])]
        c["free_s"] = free[(c["layout"], c["workload"], c["backend"])]
    fitted = model(cells, cal)
    wins = {}
    for c in cells:
        key = f'{c["layout"]}/{c["workload"]}/{c["rate"]}'
        if key not in wins or c["median_s"] < wins[key][1]:
            wins[key] = (c["backend"], c["median_s"])
    summary = {"median_error": fitted["median_error"], "worst_error": fitted["worst_error"],
               "winners": {k: v[0] for k, v in wins.items()}}
    return {"rates": rates, "reps": reps, "cells": cells, "model": fitted, "summary": summary,
            "unshaped": [c for c in measured if c["rate"] == UNSHAPED]}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    panels = sorted({(c["layout"], c["workload"]) for c in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (layout, which) in zip(axes[0], panels):
        mine = [c for c in cells if c["layout"] == layout and c["workload"] == which]
        for b in sorted({c["backend"] for c in mine}):
            pts = sorted((c["link_Bps"] * 8 / 1e9, c["median_s"] * 1e3, c["predicted_s"] * 1e3)
                         for c in mine if c["backend"] == b)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=b)
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=line.get_color(), alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("measured link goodput (Gbit/s)")
        ax.set_ylabel("step time (ms); x-- predicted")
        ax.set_title(f"{layout}: {which}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    ns = _parse(sys.argv[1:])
    if not ns.worker:
        raise SystemExit("run it as `trainlib bench cluster`")
    sys.exit(worker(ns))


def table_headline(s: dict) -> str:
    """This benchmark's line in `trainlib bench table` (benchmarks/README.md), from a result's summary."""
    wins = "; ".join(f"{k} {v}" for k, v in s["winners"].items() if "/mlp/" in k)
    return (f"cost model (calibrated at the first rate) vs measured step time: median error "
            f"{s['median_error'] * 100:.0f}%, worst {s['worst_error'] * 100:.0f}%; fastest for the wide MLP: {wins}")
