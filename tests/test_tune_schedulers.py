"""Ray Tune over trainlib runs, reported step by step: ASHA stops bad trials early and keeps the best
one; PBT clones a better trial's trainlib checkpoint into a worse one with a new learning rate.

References: plain one-rank runs of every trial's config through trainlib.testing.run_ranks — their
per-step losses (metrics JSONL), final losses and weights_sha256 — i.e. the same search without a
scheduler, trial by trial.
"""
from __future__ import annotations

import json
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.tune")

from ray import tune  # noqa: E402

from trainlib.launchers import ray as tl_ray  # noqa: E402
from trainlib.launchers.tune import search  # noqa: E402
from trainlib.testing import run_ranks  # noqa: E402

# warmup 0: the learning rate matters from the first update, so trials differ from step 2 on
BASE = {"train.steps": 4, "model.n_layer": 1, "train.log_every": 1, "train.warmup_steps": 0}


def reference_runs(configs: list[dict]) -> list[dict]:
    """Plain runs, one after another on one rank (one process start for all of them)."""
    return [tl_ray.train_trainlib(c) for c in configs]


def plain_runs(configs: list[dict], tmp_path) -> list[tuple[dict, list[dict]]]:
    """(summary, per-step metrics records) of a plain one-rank run of each config."""
    paths = [str(tmp_path / f"plain{i}.jsonl") for i in range(len(configs))]
    summaries = run_ranks(reference_runs, 1, [{**c, "train.metrics": p} for c, p in zip(configs, paths)],
                          timeout_s=180)[0]
    out = []
    for summary, path in zip(summaries, paths):
        with open(path) as f:
            out.append((summary, [json.loads(line) for line in f]))
    return out


def wait_all_released(timeout_s: float = 20.0) -> None:
    """Every CPU back: no trial's worker actor, queue or placement group outlived the search."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"resources still held: {ray.available_resources()}"
        time.sleep(0.5)


def test_asha_stops_bad_trials_early_and_keeps_the_best(local_ray, tmp_path):
    # grid order: the good trials reach each rung first (2 CPUs: two trials at a time), so the third,
    # started when one of them is done, meets step 2's rung holding a better loss and is stopped there
    # (step 1's loss is the same for every lr); the best trial always runs to the end
    lrs = [3e-3, 1e-3, 1e-6]
    scheduler = tune.schedulers.ASHAScheduler(time_attr="training_iteration", max_t=4, grace_period=1,
                                              reduction_factor=2)
    rows = search({**BASE, "train.metrics": str(tmp_path / "m.jsonl"), "train.lr": tune.grid_search(lrs)},
                  storage_path=str(tmp_path / "tune"), timeout_s=300, scheduler=scheduler, verbose=0)
    wait_all_released()
    by_lr = {r["config"]["train.lr"]: r for r in rows}
    assert sorted(by_lr) == sorted(lrs)
    iterations = {lr: r["training_iteration"] for lr, r in by_lr.items()}
    assert iterations[3e-3] == 4 and min(iterations.values()) < 4, iterations  # stopped early
    refs = dict(zip(lrs, plain_runs([{**BASE, "train.lr": lr} for lr in lrs], tmp_path)))
    for lr, row in by_lr.items():
        summary, records = refs[lr]
        # one report per log record: the last one a trial made is the plain run's loss at that step
        assert row["step"] == iterations[lr] and row["loss"] == records[iterations[lr] - 1]["loss"]
        if iterations[lr] == 4:  # a completed trial reproduces the plain run and reports its summary
            assert row["weights_sha256"] == summary["weights_sha256"] and row["loss_last"] == summary["loss_last"]
    best = min(lrs, key=lambda lr: refs[lr][0]["loss_last"])  # the search without a scheduler
    assert rows[0]["config"]["train.lr"] == best and rows[0]["weights_sha256"] == refs[best][0]["weights_sha256"]


# minutes-long tier (`pytest -m long`, ~20 s here): per-step reports and checkpoints under a scheduler run
# in the default suite through ASHA above
@pytest.mark.long
def test_pbt_clones_a_better_trials_checkpoint_with_a_new_lr(local_ray, tmp_path):
    config = {**BASE, "checkpoint.every": 2}
    # exploiting always sets train.lr to 3e-3 (a one-value list), so a clone continues exactly as its donor;
    # synch: both trials are compared at step 2 (asynchronously, a trial that gets there first is compared
    # with the other's step-1 loss, which is the same for every lr, and may be left alone)
    scheduler = tune.schedulers.PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2,
                                                        hyperparam_mutations={"train.lr": [3e-3]},
                                                        quantile_fraction=0.5, synch=True)
    rows = search({**config, "train.metrics": str(tmp_path / "m.jsonl"), "train.lr": tune.grid_search([3e-3, 1e-6])},
                  storage_path=str(tmp_path / "tune"), timeout_s=300, scheduler=scheduler, verbose=0)
    wait_all_released()
    (good, _), (poor, _) = plain_runs([{**config, "train.lr": 3e-3}, {**config, "train.lr": 1e-6}], tmp_path)
    assert good["weights_sha256"] != poor["weights_sha256"]
    assert len(rows) == 2 and all(r["steps"] == 4 and r["training_iteration"] == 4 for r in rows)
    # the trial that started at lr 1e-6 resumed from the other's checkpoint with lr 3e-3: it ends with
    # the weights of an uninterrupted lr-3e-3 run, which lr 1e-6 alone cannot reach
    assert [r["weights_sha256"] for r in rows] == [good["weights_sha256"]] * 2
    # the clone (and a trial paused at the sync point) restarted from step 2; one that arrived last may run on
    assert 2 in [r["resumed_from"] for r in rows] and {r["resumed_from"] for r in rows} <= {2, None}
    assert all(r["config"]["train.lr"] == 3e-3 for r in rows)
