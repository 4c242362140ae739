"""A Ray node dies mid-run and nothing replaces it: the run resumes its latest checkpoint on the
workers that still fit (dp 2 -> 1, resharded), as Ray Train's FailureConfig would restart it.

The cluster is real: ray.cluster_utils.Cluster runs a head and a second node (each its own raylet,
one CPU each) on this machine, and the second node is removed without grace while rank 1 trains on
it (its raylet and the worker process are killed). Reference: plain gloo ranks doing the same,
2 ranks up to the step the run resumed from, then 1 rank to the end — bitwise-identical weights.
"""
from __future__ import annotations

import threading

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.cluster_utils")

from trainlib.launchers import ray as tl_ray  # noqa: E402
from trainlib.testing import run_ranks  # noqa: E402

CFG = {"train.steps": 40, "model.n_layer": 1, "train.log_every": 1, "checkpoint.every": 5}
QUIET = {"TRAINLIB_NO_PROGRESS": "1"}


def plain_rank(config: dict) -> dict:
    return tl_ray.train_trainlib(config)


def _remove_when_training(cluster, node, metrics, removed: list) -> None:
    """Remove `node` once the job has logged 8 steps (so a checkpoint exists and steps remain)."""
    for _ in range(2400):  # bounded: 120 s
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) >= 8:
            cluster.remove_node(node, allow_graceful=False)
            removed.append(len(lines))
            return
        threading.Event().wait(0.05)


# minutes-long tier (`pytest -m long`): a second Ray node in-process is ~30 s here, and the retry/resume path
# it shares with a lost worker runs in the default suite (test_ray_launch.py::test_worker_killed_mid_run_resumes_exactly)
@pytest.mark.long
def test_node_loss_resumes_on_the_workers_left(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False,
                                      "_system_config": {"health_check_failure_threshold": 3,
                                                         "health_check_period_ms": 500}})
    try:
        node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        metrics, removed = tmp_path / "m.jsonl", []
        t = threading.Thread(target=_remove_when_training, args=(cluster, node, metrics, removed), daemon=True)
        t.start()
        results = tl_ray.run(tl_ray.train_trainlib, 2, {**CFG, "train.metrics": str(metrics)}, timeout_s=300,
                             strategy="SPREAD", max_failures=1, min_workers=1, place_timeout_s=2,
                             checkpoint_dir=str(tmp_path / "ck"), env=QUIET)
        t.join(10)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed, "the job never logged 8 steps"
    assert [a["world_size"] for a in results.attempts] == [2, 1] and results.restarts == 1
    resumed = results.attempts[1]["resumed_from"]
    assert resumed is not None and resumed >= 5 and resumed % 5 == 0 and len(results) == 1
    ref_dir = tmp_path / "ref"
    run_ranks(plain_rank, 2, {**CFG, "train.steps": resumed, "checkpoint.dir": str(ref_dir),
                              "train.metrics": str(tmp_path / "r2.jsonl")}, env=QUIET, timeout_s=240)
    ref = run_ranks(plain_rank, 1, {**CFG, "checkpoint.dir": str(ref_dir), "train.metrics": str(tmp_path / "r1.jsonl")},
                    env=QUIET, timeout_s=240)[0]
    assert ref["resumed_from"] == resumed and results[0]["weights_sha256"] == ref["weights_sha256"]
