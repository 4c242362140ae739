"""Pipeline schedules: measured bubble vs theory, per-action overhead vs torch.distributed.pipelining.

    trainlib bench pp [--quick] [--stage-ms 100] [--reps 3] [--dp-overlap]

1. Bubble. p = 4 ranks, stages that emulate equal compute by sleeping (so the shared 2-core
   machine does not distort it): forward sleeps t, the input-gradient path sleeps t and the
   weight-gradient path sleeps t (a full backward = 2t; ZB-H1's I and W = t each). Per rank the
   ideal step is 3 m t (v chunks of t/v each when interleaved), so
       bubble_measured = step_time / (3 m t) - 1
   against (p-1)/m (GPipe, 1F1B), (p-1)/(v m) (interleaved), (p-1)/(3m) (ZB-H1).
   The runtime also reports peak in-flight activations per stage (1F1B: p - stage, GPipe: m).
2. Overhead. Tiny Linear stages (compute ~ nothing), the same schedule run by trainlib's runtime
   and by torch.distributed.pipelining (PipelineStage + ScheduleGPipe / Schedule1F1B /
   ScheduleInterleaved1F1B) on the same stages, alternating, medians: seconds per compute action.
3. --dp-overlap (only this): dp2 x pp2 step time of tl.parallelize's composed step, where each
   stage's gradient buckets start reducing right after that stage's last backward ("per-stage"),
   against one sync_gradients() after the whole pipeline ("after-flush", the previous behaviour),
   alternating in the same processes, medians; 1F1B and interleaved (v=2: two stages per rank).
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from trainlib.benchmarks.harness import alternate, median
from trainlib.testing import run_ranks

P = 4


class _SleepInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t_fwd, t_bwd):
        ctx.t_bwd = t_bwd
        time.sleep(t_fwd)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.t_bwd)
        return g, None, None


class _SleepWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, shape, t_bwd):
        ctx.t_bwd = t_bwd
        return torch.zeros(shape)  # depends on w only: the input gradient must not pass through here

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.t_bwd)
        return torch.zeros(1), None, None


class SleepStage(nn.Module):
    """Forward t; backward to the input t (the I path); backward to the weight t (the W path)."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return _SleepInput.apply(x, self.t, self.t) + _SleepWeight.apply(self.w, tuple(x.shape), self.t)


def _loss(y, t):
    return (y * t).mean()


def _timed_step(run, group) -> float:
    """Seconds from a common start to the last rank's finish (a barrier, then the max over ranks)."""
    from trainlib import comm

    comm.barrier(group)
    t0 = time.perf_counter()
    run()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    comm.all_reduce(dt, op="max", group=group)
    return float(dt.item())


def _bubble_worker(t: float, ms: list[int], reps: int) -> dict:
    import trainlib as tl
    from trainlib.pipeline import Pipeline, theory_bubble

    mesh = tl.Mesh(pp=P, dp=1, tp=1)
    out = {}
    for name in ("gpipe", "1f1b", "interleaved", "zb-h1"):
        v = 2 if name == "interleaved" else 1
        for m in ms:
            layers = [SleepStage(t / v) for _ in range(P * v)]
            pipe = Pipeline(layers, mesh, schedule=name, microbatches=m, loss_fn=_loss,
                            boundaries=list(range(P * v + 1)), virtual_stages=v if v > 1 else None)
            x = torch.randn(m, 4, requires_grad=True)  # so stage 0 also has an input-gradient path
            tgt = torch.ones(m, 4)
            pipe.step(x, tgt)  # warm-up: connections, headers
            times = [_timed_step(lambda: pipe.step(x, tgt), None) for _ in range(reps)]
            step = median(times)
            out[f"{name}/m={m}"] = {"schedule": name, "p": P, "m": m, "v": v, "step_s": step,
                                    "ideal_s": 3 * m * t, "bubble": step / (3 * m * t) - 1,
                                    "theory": theory_bubble(name, P, m, v),
                                    "peak_inflight": pipe.stats()["peak_inflight"]}
    return out


def _tiny_layers(n: int, d: int = 16) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n)]


def _overhead_worker(m: int, reps: int, steps: int) -> dict:
    import trainlib as tl
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    from trainlib.pipeline import Pipeline

    mesh = tl.Mesh(pp=P, dp=1, tp=1)
    r = mesh.rank("pp")
    x, tgt = torch.randn(4 * m, 16), torch.randn(4 * m, 16)
    mse = nn.functional.mse_loss
    out = {}
    for name, torch_cls, v in (("gpipe", ScheduleGPipe, 1), ("1f1b", Schedule1F1B, 1),
                               ("interleaved", ScheduleInterleaved1F1B, 2)):
        layers = _tiny_layers(P * v)
        # broadcast_loss=False: torch's schedules return the loss on the last stage only
        ours = Pipeline(layers, mesh, schedule=name, microbatches=m, loss_fn=mse, boundaries=list(range(P * v + 1)),
                        virtual_stages=v if v > 1 else None, broadcast_loss=False)
        peer_layers = _tiny_layers(P * v)
        stages = [PipelineStage(peer_layers[s], s, P * v, torch.device("cpu")) for s in range(r, P * v, P)]
        peer = torch_cls(stages if v > 1 else stages[0], n_microbatches=m, loss_fn=mse)

        def run_peer():
            losses = []
            if r == 0:
                peer.step(x)
            elif r == P - 1:
                peer.step(target=tgt, losses=losses)
            else:
                peer.step()

        def timed(fn):
            return lambda: _timed_step(lambda: [fn() for _ in range(steps)], None) / steps

        for _ in range(3):  # warm-up: torch infers shapes on its first step, gloo pairs connect, allocators fill
            ours.step(x, tgt)
            run_peer()
        res = alternate({"trainlib": timed(lambda: ours.step(x, tgt)), "torch": timed(run_peer)}, reps)
        n_actions = len(ours.schedule.actions[r])
        out[name] = {"m": m, "v": v, "actions_per_rank": n_actions,
                     "trainlib_s_per_action": res["trainlib"]["median_s"] / n_actions,
                     "torch_s_per_action": res["torch"]["median_s"] / n_actions,
                     "ratio": res["trainlib"]["median_s"] / res["torch"]["median_s"]}
    return out


def run_overhead(quick: bool) -> dict:
    # quick: 7 alternating rounds of 3 steps -- fewer gave medians that swung 0.6-1.6x on a loaded 2-core box
    return run_ranks(_overhead_worker, P, 8, 7 if quick else 15, 3 if quick else 10, timeout_s=900)[0]


def _dp_overlap_worker(reps: int, width: int, n_layers: int, m: int) -> dict:
    import trainlib as tl

    mesh = tl.Mesh(pp=2, dp=2, tp=1)
    out = {}
    for name, v in (("1f1b", None), ("interleaved", 2)):
        torch.manual_seed(0)
        layers = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n_layers)]
        pm = tl.parallelize(layers, mesh, loss_fn=nn.functional.mse_loss, schedule=name, microbatches=m,
                            virtual_stages=v, bucket_mb=1.0)
        x, tgt = torch.randn(8 * m, width), torch.randn(8 * m, width)

        def after_flush():  # the previous ParallelModel.step: one sync after the pipeline flush
            with pm.dp_model.no_sync():
                pm.pipe.step(x, tgt)
            pm.dp_model.sync_gradients()

        def timed(fn):
            return lambda: _timed_step(fn, None)

        pm.step(x, tgt)
        after_flush()  # warm-up
        res = alternate({"per-stage": timed(lambda: pm.step(x, tgt)), "after-flush": timed(after_flush)}, reps)
        out[name] = {"per_stage_s": res["per-stage"]["median_s"], "after_flush_s": res["after-flush"]["median_s"],
                     "speedup": res["after-flush"]["median_s"] / res["per-stage"]["median_s"],
                     "all_s": {k: r["all_s"] for k, r in res.items()}, "buckets": len(pm.dp_model.buckets)}
    return out


def run_dp_overlap(quick: bool, reps: int | None = None) -> dict:
    reps = reps if reps is not None else (7 if quick else 21)
    res = run_ranks(_dp_overlap_worker, 4, reps, 512, 8, 4, timeout_s=1800)[0]
    summary = {f"dp2xpp2_{k}": f"per-stage {v['per_stage_s'] * 1e3:.1f} ms, after-flush "
                               f"{v['after_flush_s'] * 1e3:.1f} ms ({v['speedup']:.3f}x)" for k, v in res.items()}
    return {"dp_overlap": res, "summary": summary, "result_suffix": "-dp-overlap"}


def run(quick: bool, argv: list[str] | None = None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(prog="trainlib bench pp")
    ap.add_argument("--stage-ms", type=float, default=20.0 if quick else 100.0,
                    help="emulated forward time of one stage (ms); larger hides more of the p2p latency")
    ap.add_argument("--reps", type=int, default=2 if quick else 3, help="timed steps per configuration (median)")
    ap.add_argument("--dp-overlap", action="store_true",
                    help="only the dp2 x pp2 step: per-stage gradient reduction vs one sync after the flush")
    opts = ap.parse_args(argv or [])
    if opts.dp_overlap:
        return run_dp_overlap(quick)
    t = opts.stage_ms / 1e3
    ms = [8] if quick else [8, 16]
    per_rank = run_ranks(_bubble_worker, P, t, ms, opts.reps, timeout_s=1800)
    bubble = per_rank[0]
    for key, row in bubble.items():  # each rank reports its own stages' peaks: merge them
        row["peak_inflight"] = {s: n for r in per_rank for s, n in r[key]["peak_inflight"].items()}
    overhead = run_overhead(quick)
    summary = {f"bubble_{k}": f"{v['bubble']:.3f} (theory {v['theory']:.3f})" for k, v in bubble.items()}
    summary.update({f"overhead_ratio_{k}": round(v["ratio"], 3) for k, v in overhead.items()})
    worst = max(abs(v["bubble"] - v["theory"]) for v in bubble.values())
    summary["max_bubble_error_points"] = round(100 * worst, 2)
    return {"stage_time_s": t, "bubble": bubble, "overhead": overhead, "summary": summary}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "dp_overlap" in result:
        rows = result["dp_overlap"]
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = range(len(rows))
        ax.bar([i - 0.2 for i in xs], [r["after_flush_s"] * 1e3 for r in rows.values()], 0.4, label="after flush")
        ax.bar([i + 0.2 for i in xs], [r["per_stage_s"] * 1e3 for r in rows.values()], 0.4, label="per stage")
        ax.set_xticks(list(xs), list(rows))
        ax.set_ylabel("dp2 x pp2 step (ms, median)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return
    rows = list(result["bubble"].values())
    labels = [f"{r['schedule']}\nm={r['m']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([i - 0.2 for i in xs], [r["theory"] for r in rows], 0.4, label="theory")
    ax.bar([i + 0.2 for i in xs], [r["bubble"] for r in rows], 0.4, label="measured")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("bubble fraction")
    ax.set_title(f"pipeline bubble, p={P}, sleeping stages")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table_headline(s: dict) -> str:
    """This benchmark's line in `trainlib bench table` (benchmarks/README.md), from a result's summary."""
    bubbles = ", ".join(f"{k.split('_', 1)[1]} {v}" for k, v in s.items() if k.startswith("bubble_") and "m=8" in k)
    over = ", ".join(f"{k.split('_')[-1]} {v}" for k, v in s.items() if k.startswith("overhead_ratio"))
    return (f"bubble (p=4): {bubbles}; worst error {s['max_bubble_error_points']} points; per-action overhead "
            f"vs torch.distributed.pipelining: {over}")
