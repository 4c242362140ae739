"""How far below DeepSpeed can any data-parallel runtime go on `trainlib bench zero`'s step model?

    python -m trainlib.benchmarks.zero_floor [--reps 9] [--model step_comm]

Issue 11 sets trainlib's step time at <= 0.7x DeepSpeed ZeRO's at the same stage. A step is the
model's forward, backward and optimizer (the same torch ops under every runtime) plus what the
runtime adds (sync, sharding, bookkeeping). This runs, in one spawned group of 2 gloo ranks and in
rotating order, bench zero's step model (3.3M-param GPT, batch 8 x 128 tokens per rank, fp32 AdamW)
under trainlib (unsharded and stages 1-3), under DeepSpeed ZeRO-1/2/3, and as the floor: the bare
model and AdamW with no wrapper and no communication, each rank on its own batch. floor / DeepSpeed
is the lowest ratio any runtime could reach here: if it is above 0.7, the target cannot be met on
this model by making the runtime faster. Writes benchmarks/results/zero-floor.json; with --model
step_comm, bench zero's communication-bound model (1 sequence per rank), zero-floor-comm.json.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

N_RANKS = 2


def specs(ds_ok: bool) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"trainlib-none": {"kind": "tl", "stage": 0},
                                      "floor": {"kind": "floor", "stage": 0}}
    for s, name in ((1, "optimizer"), (2, "gradients"), (3, "parameters")):
        out[f"trainlib-{name}"] = {"kind": "tl", "stage": s}
        if ds_ok:
            out[f"deepspeed-zero{s}"] = {"kind": "ds", "stage": s}
    for spec in out.values():
        spec["precision"] = "fp32"
    return out


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    from trainlib.benchmarks.harness import median

    med = {n: median(ts) for n, ts in res["step_s"].items()}
    out: dict[str, Any] = {"median_step_ms": {n: round(t * 1e3, 2) for n, t in med.items()}}
    for s, name in ((1, "optimizer"), (2, "gradients"), (3, "parameters")):
        ds = med.get(f"deepspeed-zero{s}")
        if ds:
            out[f"stage{s}"] = {"trainlib_over_deepspeed": round(med[f"trainlib-{name}"] / ds, 4),
                                "floor_over_deepspeed": round(med["floor"] / ds, 4),
                                "trainlib_over_floor": round(med[f"trainlib-{name}"] / med["floor"], 4)}
    out["max_loss_diff_vs_trainlib-none"] = {n: d for n, d in res["max_loss_diff_vs_reference"].items() if n != "floor"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainlib.benchmarks.zero_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=9, help="rotations of every candidate (one step each)")
    p.add_argument("--model", default="step", choices=["step", "step_comm"],
                   help="bench zero's step model, or its 1-sequence communication-bound one")
    p.add_argument("--json", default=None, help="default benchmarks/results/zero-floor.json")
    args = p.parse_args(argv)
    from trainlib.benchmarks.bench_zero import ENV, MODELS, deepspeed_status
    from trainlib.benchmarks.harness import git_state
    from trainlib.benchmarks.paths import results_dir
    from trainlib.benchmarks.zero_ranks import group
    from trainlib.testing import run_ranks

    ds_error = deepspeed_status()
    ranks = run_ranks(group, N_RANKS, None, {}, 0, 0, MODELS[args.model], specs(ds_error is None), args.reps, 1,
                      timeout_s=1800, env={**ENV, "OMP_NUM_THREADS": "1"})
    res = ranks[0]["steps"]
    command = f"python -m trainlib.benchmarks.zero_floor --reps {args.reps}" + (
        f" --model {args.model}" if args.model != "step" else "")
    out = {"command": command, "git": git_state(),
           "date": time.strftime("%Y-%m-%dT%H:%M", time.gmtime()), "model": MODELS[args.model], "world": N_RANKS,
           "deepspeed_error": ds_error, "errors": res["errors"],
           "step_s": res["step_s"], **summarize(res)}
    path = args.json or str(results_dir() / ("zero-floor.json" if args.model == "step" else "zero-floor-comm.json"))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k.startswith(("stage", "median"))}))
    return 0


def table_headline(result: dict) -> str:
    """The results table's line (benchmarks/table.py) for zero-floor.json."""
    parts = [f"stage {s}: trainlib {result[f'stage{s}']['trainlib_over_deepspeed']}x DeepSpeed, floor "
             f"{result[f'stage{s}']['floor_over_deepspeed']}x" for s in (1, 2, 3) if f"stage{s}" in result]
    batch = result.get("model", {}).get("batch")
    which = "step model" if batch != 1 else "1-sequence step model"
    return f"no-communication floor vs DeepSpeed ZeRO (bench zero's {which}): " + "; ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
