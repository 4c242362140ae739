"""CPU training steps with glibc's malloc kept from re-faulting freed tensors (trainlib.cpu_malloc) vs as it comes.

    trainlib bench malloc [--quick]

The same layouts `trainlib bench plan` measures on the wide MLP (3 x Linear(2048, 2048), 16 MiB gradients and
optimizer temporaries) and the default GPT, 2 ranks, built as `trainlib train` builds them. Each allocator
setting is a process-wide, one-way switch, so each round spawns one group per setting (TRAINLIB_CPU_MALLOC=
reuse / system), in alternating order; a group steps every layout (2 warm-up steps, then `steps` timed). A
step's time is the slower rank's; its minor page faults the larger rank's. Reported: per layout the median
step over all rounds and the ratio system / reuse (above 1: the default allocator is slower).
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any

from trainlib.testing import run_ranks

from .harness import ratio_text

MODES = ("reuse", "system")
LAYOUTS = {   # model -> layouts (bench_plan's labels and flags)
    "wide-mlp": ["dp2 tp1 pp1 zero1 ar", "dp2 tp1 pp1 ar", "dp2 tp1 pp1 ar-bf16", "dp2 tp1 pp1 zero3 ar"],
    "gpt-default": ["dp2 tp1 pp1 ar", "dp1 tp1 pp2 1f1b/m4"],
}


def _worker(items: list[tuple[str, str, list[str]]], steps: int) -> dict[str, dict[str, list[float]]]:
    import torch

    import trainlib as tl
    from trainlib import comm

    from .bench_plan import _build, _one_step

    tl.init()
    torch.set_num_threads(1)
    out: dict[str, dict[str, list[float]]] = {}
    for model, label, flags in items:
        parts = _build(model, flags)
        for _ in range(2):
            _one_step(*parts)
        times, faults = [], []
        for _ in range(steps):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times.append(_one_step(*parts))
            f = torch.tensor([float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)])
            comm.all_reduce(f, op="max")
            faults.append(float(f))
        out[f"{model} / {label}"] = {"step_s": times, "faults": faults}
        parts[0].close()
        del parts
    return out


def _items(quick: bool) -> list[tuple[str, str, list[str]]]:
    from trainlib.planner.profile import load

    from .bench_plan import MODELS, _items as plan_items, local_cluster, rank_layouts

    prof, cluster, items = load("cpu"), local_cluster(), []
    for model, labels in LAYOUTS.items():
        plans = {p.layout.label(): p for p in rank_layouts(model, cluster, prof)}
        chosen = [plans[label] for label in (labels[:2] if quick else labels)]
        items += [(model, it["layout"], it["flags"]) for it in plan_items(chosen, MODELS[model][2])]
    return items


def run(quick: bool) -> dict[str, Any]:
    steps, rounds = (4, 2) if quick else (8, 3)
    items = _items(quick)
    got: dict[str, dict[str, dict[str, list[float]]]] = {m: {} for m in MODES}
    t0 = time.monotonic()
    for r in range(rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            res = run_ranks(_worker, 2, items, steps, timeout_s=900,
                            env={"OMP_NUM_THREADS": "1", "TRAINLIB_CPU_MALLOC": mode})[0]
            for key, v in res.items():
                acc = got[mode].setdefault(key, {"step_s": [], "faults": []})
                acc["step_s"] += v["step_s"]
                acc["faults"] += v["faults"]
    rows = []
    for key in got["reuse"]:
        med = {m: statistics.median(got[m][key]["step_s"]) for m in MODES}
        flt = {m: statistics.median(got[m][key]["faults"]) for m in MODES}
        rows.append({"layout": key, "reuse_s": round(med["reuse"], 5), "system_s": round(med["system"], 5),
                     "system_over_reuse": round(med["system"] / med["reuse"], 3),
                     "faults_per_step_reuse": flt["reuse"], "faults_per_step_system": flt["system"]})
    ratios = [r["system_over_reuse"] for r in rows]
    return {"config": {"ranks": 2, "steps": steps, "rounds": rounds, "omp_threads": 1, "modes": list(MODES),
                       "wall_s": round(time.monotonic() - t0, 1)},
            "rows": rows, "all": got,
            "summary": {"median_system_over_reuse": round(statistics.median(ratios), 3),
                        "max_system_over_reuse": max(ratios), "min_system_over_reuse": min(ratios),
                        "layouts": len(rows)}}


def table_headline(summary: dict) -> str:
    return (f"glibc malloc as it comes / trainlib's reuse setting: {ratio_text(summary['median_system_over_reuse'])} "
            f"step time median over {summary['layouts']} layouts (range {summary['min_system_over_reuse']:.2f}-"
            f"{summary['max_system_over_reuse']:.2f}x)")


if __name__ == "__main__":   # python -m trainlib.benchmarks.bench_malloc
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv)["summary"], indent=1))
    os._exit(0)
