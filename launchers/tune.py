"""Distributed hyper-parameter search with Ray Tune over trainlib runs.

    import ray
    from ray import tune
    from trainlib.launchers.tune import search
    ray.init()
    results = search({"train.lr": tune.loguniform(1e-4, 1e-2), "train.steps": 200},
                     num_samples=8, workers_per_trial=2)
    best = results[0]      # sorted by `metric` (default: the run's last loss), best first

Each trial is a complete trainlib run on `workers_per_trial` Ray actors: Tune reserves one
placement group per trial (an empty head bundle for the trial itself, which only coordinates, plus
one bundle per worker), and trainlib.launchers.ray.run starts the ranks inside that group, so a
trial's ranks are gang scheduled and trials never steal each other's workers. The trial reports
rank 0's summary (steps, loss_first, loss_last, tokens_per_s, weights_sha256, ...) to Tune.
"""
from __future__ import annotations

from typing import Any, Callable

from trainlib.launchers import ray as tl_ray


def _trial(fn: Callable[[dict], dict], workers: int, timeout_s: float) -> Callable[[dict], None]:
    def trainable(config: dict) -> None:
        from ray import tune
        from ray.util import get_current_placement_group

        results = tl_ray.run(fn, workers, config, placement_group=get_current_placement_group(), timeout_s=timeout_s)
        report = getattr(tune, "report", None)
        if report is None:  # Ray < 2.40 reported through ray.train
            from ray.train import report
        report(dict(results[0]))

    return trainable


def search(param_space: dict[str, Any], num_samples: int = 1, workers_per_trial: int = 1,
           fn: Callable[[dict], dict] = tl_ray.train_trainlib, metric: str = "loss_last", mode: str = "min",
           resources_per_worker: dict[str, float] | None = None, max_concurrent: int | None = None,
           timeout_s: float = 3600.0, storage_path: str | None = None) -> list[dict]:
    """Run the search; return every trial's final report, best first. A failed trial raises."""
    from ray import tune

    bundle = dict(resources_per_worker or {"CPU": 1})
    pgf = tune.PlacementGroupFactory([{}] + [dict(bundle) for _ in range(workers_per_trial)])
    trainable = tune.with_resources(_trial(fn, workers_per_trial, timeout_s), pgf)
    run_config = {"storage_path": storage_path} if storage_path else {}
    tuner = tune.Tuner(trainable, param_space=param_space,
                       tune_config=tune.TuneConfig(num_samples=num_samples, metric=metric, mode=mode,
                                                   max_concurrent_trials=max_concurrent, time_budget_s=timeout_s),
                       run_config=tune.RunConfig(**run_config) if hasattr(tune, "RunConfig") else None)
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(grid)} trials failed; first: {errors[0]}")
    rows = [dict(r.metrics) for r in grid]
    return sorted(rows, key=lambda m: m[metric], reverse=(mode == "max"))
