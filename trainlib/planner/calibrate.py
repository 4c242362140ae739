"""`trainlib plan --calibrate`: measure this machine's profile on 2 local ranks (about a minute).

Each figure is taken the way training uses it, with both ranks busy at once (OMP_NUM_THREADS =
cores / 2, as `trainlib train` sets it): matmul FLOP/s per dtype on the shapes of GPT blocks (d 128 to
512, 2048 tokens), memcpy bandwidth, the cost of one tiny op, the gloo all-reduce (TP, PP, compressed
and ZeRO-2/3 gradients) and shared-memory all-reduce (whole fp32 buckets) as alpha-beta fits over
64 KiB..8 MiB, reduce-scatter + all-gather over all-reduce at 8 MiB, the pipeline runtime's cost per
action (tiny layers, 1F1B, m = 8) and the colocated parameter server's cost per message and per byte
(a gradient sync of 1 and 4 partitions). Inter-node efficiency is not measurable without a second
node: it comes from `trainlib bench cluster` (benchmarks/results/cluster.json) when present.
The load average is recorded with the profile: a calibration is only as good as its conditions.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import torch

from .profile import Profile

SIZES = (64 * 1024, 1 << 20, 8 << 20)


def _median_time(fn, reps: int, inner: int = 1) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t0) / inner)
    return statistics.median(ts)


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares t = a + b * x; returns (a, b) with both clamped >= 0."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(t for _, t in points) / n
    b = sum((x - mx) * (t - my) for x, t in points) / max(1e-30, sum((x - mx) ** 2 for x, _ in points))
    b = max(b, 1e-15)
    return max(0.0, my - b * mx), b


def _matmul(dtype: torch.dtype) -> float:
    rates = []
    for d in (128, 256, 512):
        a, w = torch.randn(2048, d, dtype=dtype), torch.randn(d, 4 * d, dtype=dtype)
        a @ w
        t = _median_time(lambda: a @ w, 5, 3)
        rates.append(2 * 2048 * d * 4 * d / t)
    return statistics.median(rates)


def _collectives() -> dict[str, float]:
    import torch.distributed as dist

    from trainlib import comm, runtime
    from trainlib.sync import shm

    group, timeout_s = dist.group.WORLD, runtime.get_runtime().timeout_s
    flats = {s: torch.zeros(s // 4) for s in SIZES}
    gloo = []
    for s in SIZES:
        comm.barrier()
        gloo.append((s, _median_time(lambda: comm.all_reduce(flats[s]), 5, 3)))
    out = {}
    a, b = _fit(gloo)
    out["intra_alpha_s"], out["intra_Bps"] = a / 2, 1 / b          # n = 2: t = 2 alpha + M / B
    try:
        g = shm.ShmGroup(group, timeout_s)
        for i, s in enumerate(SIZES):
            g.alloc(i, s // 4, torch.float32)
        g.map_peers()
        pts = []
        for i, s in enumerate(SIZES):
            comm.barrier()
            pts.append((s, _median_time(lambda: g.allreduce(i), 5, 3)))
        g.close()
        a, b = _fit(pts)
        out["sync_alpha_s"], out["sync_Bps"] = a / 2, 1 / b
    except Exception:   # no /dev/shm room: the dp sync falls back to gloo, and so does the profile
        out["sync_alpha_s"], out["sync_Bps"] = out["intra_alpha_s"], out["intra_Bps"]
    big = flats[SIZES[-1]]
    half = torch.zeros(big.numel() // 2)
    comm.barrier()
    ar = _median_time(lambda: comm.all_reduce(big), 5)

    def rs_ag():
        comm.reduce_scatter_tensor(half, big)
        comm.all_gather_into_tensor(big, half)

    comm.barrier()
    out["rs_ag_over_ar"] = _median_time(rs_ag, 5) / ar
    return out


def _pipeline_action() -> float:
    import torch.nn as nn

    import trainlib as tl
    from trainlib.pipeline import Pipeline

    mesh = tl.Mesh(pp=2, dp=1, tp=1)
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(2)]
    pipe = Pipeline(layers, mesh, schedule="1f1b", microbatches=8, loss_fn=nn.functional.mse_loss,
                    boundaries=[0, 1, 2])
    x, y = torch.randn(32, 16), torch.randn(32, 16)
    for _ in range(3):
        pipe.step(x, y)
    t = _median_time(lambda: pipe.step(x, y), 7)
    pipe.close() if hasattr(pipe, "close") else None
    return t / len(pipe.schedule.actions[mesh.rank("pp")])


def _parameter_server() -> tuple[float, float]:
    """(seconds per partition message, bytes/s) of the colocated PS for 2 workers, from syncs of 1 and 4
    partitions minus the same backward without a sync."""
    import torch.nn as nn

    import trainlib as tl

    pts = []
    for n_floats in (1 << 20, 4 << 20):          # 4 MiB = 1 partition, 16 MiB = 4 partitions
        torch.manual_seed(0)
        plain = nn.Linear(1024, n_floats // 1024, bias=False)
        torch.manual_seed(0)
        ps = tl.DataParallel(nn.Linear(1024, n_floats // 1024, bias=False), sync=tl.ParameterServer(timeout_s=120))
        x = torch.randn(2, 1024)

        def step(m):
            m.zero_grad(set_to_none=True)
            m(x).sum().backward()

        for _ in range(2):
            step(plain), step(ps)
        t_plain = _median_time(lambda: step(plain), 5)
        t_ps = _median_time(lambda: step(ps), 5)
        pts.append((n_floats * 4, max(1e-6, t_ps - t_plain)))
        ps.close()
    # t = msgs * c + load / B with load = 2 M (both workers' pushes through the one server)
    (m1, t1), (m4, t4) = pts
    per_byte = max(1e-15, (t4 - t1) / (2 * (m4 - m1)) - 0.0)
    c = max(0.0, t1 - 2 * m1 * per_byte)
    return c, 1 / per_byte


def _rank_measure() -> dict:
    from trainlib import comm

    out: dict = {}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    comm.barrier()
    out["matmul_fp32_flops"] = _matmul(torch.float32)
    comm.barrier()
    out["matmul_bf16_flops"] = _matmul(torch.bfloat16)
    src, dst = torch.randn(8 << 20), torch.empty(8 << 20)
    comm.barrier()
    out["mem_Bps"] = 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src), 7)
    tiny = torch.zeros(1)
    out["op_s"] = _median_time(lambda: tiny.add_(1.0), 5, 2000)
    out.update(_collectives())
    out["pp_action_s"] = max(0.0, _pipeline_action() - out["intra_alpha_s"])
    out["ps_msg_s"], out["ps_Bps"] = _parameter_server()
    return out


def _inter_node() -> tuple[float, str]:
    from trainlib.benchmarks.paths import results_dir

    path = results_dir() / "cluster.json"
    try:
        kappa = json.loads(path.read_text())["model"]["params"]["allreduce"]["kappa"]
        return 1 / kappa, f"1/kappa of the ring all-reduce fitted by `trainlib bench cluster` ({path.name})"
    except (OSError, KeyError, ValueError):
        return 0.85, "assumed (no benchmarks/results/cluster.json): NCCL/gloo reach ~85% of line rate"


def calibrate(ranks: int = 2) -> Profile:
    from trainlib.testing import run_ranks

    load_before = os.getloadavg()
    t0 = time.time()
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    per_rank = run_ranks(_rank_measure, ranks, timeout_s=600, env={"OMP_NUM_THREADS": threads})
    keys = per_rank[0].keys()
    # per-rank rates: the slower rank sets the pace of a synchronous step
    values = {k: (min if k.endswith(("flops", "Bps")) else max)(r[k] for r in per_rank) for k in keys}
    eff, eff_src = _inter_node()
    values.update(inter_alpha_s=values["intra_alpha_s"], inter_efficiency=eff, overlap=0.0, runtime_bytes=0.0,
                  compute_efficiency=1.0)
    how = f"measured on {ranks} ranks at once, OMP_NUM_THREADS={threads}"
    sources = {
        "matmul_fp32_flops": f"measured: torch.mm (2048 x d) @ (d x 4d), d in 128/256/512, median; {how}",
        "matmul_bf16_flops": f"measured: as fp32, bfloat16 tensors; {how}",
        "mem_Bps": f"measured: copy_ of 32 MiB, 2 x bytes / time; {how}",
        "op_s": "measured: 1-element add_ in a loop",
        "intra_alpha_s": "measured: gloo all-reduce 64 KiB..8 MiB, fit t = 2a + M/B (n = 2)",
        "intra_Bps": "measured: as intra_alpha_s",
        "sync_alpha_s": "measured: shared-memory all-reduce (trainlib.sync.shm) 64 KiB..8 MiB, same fit",
        "sync_Bps": "measured: as sync_alpha_s",
        "rs_ag_over_ar": "measured: gloo reduce-scatter + all-gather over all-reduce, 8 MiB",
        "pp_action_s": "measured: trainlib Pipeline, 2 tiny stages, 1F1B m=8, step time / actions minus intra_alpha",
        "ps_msg_s": "measured: colocated ParameterServer sync of 1 and 4 partitions (4 MiB) minus the backward, "
                    "2 workers; fit t = msgs * c + 2M / B",
        "ps_Bps": "measured: as ps_msg_s",
        "inter_alpha_s": "assumed = intra_alpha_s (TCP over the emulated cluster's veth links)",
        "inter_efficiency": eff_src,
        "overlap": "assumed 0: on CPU the sync's copies and sums run on the cores the backward uses",
        "runtime_bytes": "0: the validation measures memory as a delta over the process before the model",
        "compute_efficiency": "1: the matmuls above are measured on model-sized shapes",
    }
    measured = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__, "ranks": ranks,
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.time() - t0, 1),
                "per_rank": per_rank}
    return Profile(f"cpu measured {measured['date'][:16]}", "cpu", True, values, sources, measured)
