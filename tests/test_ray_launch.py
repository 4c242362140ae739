"""Ray: a 2-worker gang-scheduled trainlib job and a 2-trial Tune search on a local Ray instance.

References: the same training run on 2 (and 1) plain gloo ranks through trainlib.testing.run_ranks
— the Ray path must end with bitwise-identical weights and the same losses.
"""
from __future__ import annotations

import math

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.tune")

from trainlib.launchers import ray as tl_ray  # noqa: E402
from trainlib.launchers.errors import LaunchConfigError  # noqa: E402
from trainlib.testing import run_ranks  # noqa: E402

SMALL = {"train.steps": 3, "model.n_layer": 1, "train.log_every": 1}


def reference_rank(config: dict) -> dict:
    return tl_ray.train_trainlib(config)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


def test_two_worker_job_matches_plain_ranks(local_ray, tmp_path):
    config = {**SMALL, "train.metrics": str(tmp_path / "metrics.jsonl")}
    results = tl_ray.run(tl_ray.train_trainlib, num_workers=2, config=config, timeout_s=240)
    assert [r["world_size"] for r in results] == [2, 2]
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]
    ref = run_ranks(reference_rank, 2, {**config, "train.metrics": str(tmp_path / "ref.jsonl")}, timeout_s=240)[0]
    assert results[0]["weights_sha256"] == ref["weights_sha256"]
    assert results[0]["loss_first"] == ref["loss_first"] and math.isfinite(results[0]["loss_last"])


def test_run_errors(local_ray):
    with pytest.raises(LaunchConfigError, match="num_workers=0"):
        tl_ray.run(tl_ray.train_trainlib, 0)
    # a placement group that cannot exist on a 2-CPU instance fails fast and names the free resources
    from trainlib.launchers.errors import LaunchInfraError

    with pytest.raises(LaunchInfraError, match="could not be placed together"):
        tl_ray.run(tl_ray.train_trainlib, 3, resources_per_worker={"CPU": 1}, timeout_s=1)


def test_tune_two_trials(local_ray, tmp_path):
    from ray import tune

    from trainlib.launchers.tune import search

    lrs = [1e-3, 1e-2]
    results = search({**SMALL, "train.lr": tune.grid_search(lrs)}, workers_per_trial=1, storage_path=str(tmp_path),
                     timeout_s=300)
    assert len(results) == 2 and results[0]["loss_last"] <= results[1]["loss_last"]
    by_lr = {r["config"]["train.lr"]: r for r in results}
    assert sorted(by_lr) == lrs
    for lr in lrs:  # each trial reproduces a plain one-rank run with its learning rate
        ref = run_ranks(reference_rank, 1, {**SMALL, "train.lr": lr, "train.metrics": str(tmp_path / "r.jsonl")})[0]
        assert by_lr[lr]["weights_sha256"] == ref["weights_sha256"] and by_lr[lr]["loss_last"] == ref["loss_last"]
