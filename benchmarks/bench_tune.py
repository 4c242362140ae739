"""Hyper-parameter search with and without early stopping: Ray Tune's ASHA over trainlib runs.

    trainlib bench tune [--quick]

The same grid search over train.lr of the default job (a 1-layer GPT, one Ray worker per trial, on a
local Ray instance with this machine's CPUs) runs twice per round: with no scheduler (every trial trains
all its steps) and with ASHAScheduler (time in steps, grace period 1/8 of the steps, reduction factor
2), which stops a trial at a rung when its per-step loss (trainlib reports every train.log_every steps
through trainlib.launchers.tune) is worse than the rung's better half. Rounds alternate the order;
figures are medians over rounds. Reported per search: wall time of the whole search, the steps all
trials trained together, how many trials stopped early, and the best trial (its lr, final loss and
weights_sha256: same_best_trial says whether the same trial won both, with the same weights; a trial
that starts slowly and would have won can be stopped at an early rung). The ratio is the median of
per-round paired ratios asha/none wall time. Absolute times on a shared 2-core machine are noise; the
ratio is the figure.
"""
from __future__ import annotations

import tempfile
import time

from trainlib.benchmarks.harness import median

QUICK = {"lrs": [3e-3, 1e-3, 1e-5, 1e-6], "steps": 4, "log_every": 1, "rounds": 1}
FULL = {"lrs": [3e-3, 2e-3, 1e-3, 5e-4, 1e-4, 3e-5, 1e-5, 1e-6], "steps": 60, "log_every": 2, "rounds": 2}


def _search(kind: str, p: dict, tmp: str) -> dict:
    from ray import tune

    from trainlib.launchers.tune import search

    scheduler = None
    if kind == "asha":
        # time in training steps (the reports' "step"), not reports: a run reports at step 1 and every
        # log_every steps, so counting reports would put max_t short of the last step
        scheduler = tune.schedulers.ASHAScheduler(time_attr="step", max_t=p["steps"],
                                                  grace_period=max(1, p["steps"] // 8), reduction_factor=2)
    space = {"train.steps": p["steps"], "model.n_layer": 1, "train.log_every": p["log_every"],
             "train.warmup_steps": 0, "train.metrics": f"{tmp}/metrics.jsonl", "train.lr": tune.grid_search(p["lrs"])}
    t0 = time.perf_counter()
    rows = search(space, storage_path=f"{tmp}/{kind}", timeout_s=1800, scheduler=scheduler, verbose=0)
    wall = time.perf_counter() - t0
    best = rows[0]
    return {"wall_s": round(wall, 2), "trials": len(rows),
            "stopped_early": sum(r["step"] < p["steps"] for r in rows),
            "steps_trained": sum(r["step"] for r in rows),
            "best": {"lr": best["config"]["train.lr"], "loss_last": best["loss_last"],
                     "weights_sha256": best.get("weights_sha256")}}


def run(quick: bool) -> dict:
    import os

    import ray

    p = QUICK if quick else FULL
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rounds = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
            for r in range(p["rounds"]):
                order = ["none", "asha"] if r % 2 == 0 else ["asha", "none"]
                rounds.append({k: _search(k, p, f"{tmp}/r{r}") for k in order})
    finally:
        ray.shutdown()
    same_best = all(rd["none"]["best"] == rd["asha"]["best"] for rd in rounds)
    summary = {"trials": len(p["lrs"]), "steps_per_trial": p["steps"], "rounds": p["rounds"],
               "none_wall_s": median([rd["none"]["wall_s"] for rd in rounds]),
               "asha_wall_s": median([rd["asha"]["wall_s"] for rd in rounds]),
               "ratio_asha/none_wall": round(median([rd["asha"]["wall_s"] / rd["none"]["wall_s"] for rd in rounds]), 3),
               "none_steps_trained": median([rd["none"]["steps_trained"] for rd in rounds]),
               "asha_steps_trained": median([rd["asha"]["steps_trained"] for rd in rounds]),
               "asha_stopped_early": median([rd["asha"]["stopped_early"] for rd in rounds]),
               "best_lr": rounds[0]["none"]["best"]["lr"], "same_best_trial": same_best}
    return {"params": p, "rounds": rounds, "summary": summary}


def table_headline(s: dict) -> str:
    """This benchmark's line in `trainlib bench table` (benchmarks/README.md), from a result's summary."""
    from trainlib.benchmarks.harness import ratio_text

    return (f"{s['trials']}-trial lr search, {s['steps_per_trial']} steps each: ASHA "
            f"{ratio_text(s['ratio_asha/none_wall'])} the wall time of no scheduler ({s['asha_wall_s']:.0f} vs "
            f"{s['none_wall_s']:.0f} s), {s['asha_stopped_early']:.0f} trials stopped early, "
            f"{s['asha_steps_trained']:.0f} vs {s['none_steps_trained']:.0f} steps trained; same best trial: "
            f"{s['same_best_trial']} (lr {s['best_lr']})")
