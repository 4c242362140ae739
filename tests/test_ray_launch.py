"""Ray on a local instance: a 2-worker gang-scheduled trainlib job whose worker is SIGKILLed mid-run,
restarted from its checkpoint; shrinking when the full group cannot be placed; the
`python -m trainlib.launchers.ray_main` entrypoint. (Tune: tests/test_tune_schedulers.py.)

References: the same training run on 2 (and 1) plain gloo ranks through trainlib.testing.run_ranks
— the Ray path, killed and resumed or not, must end with bitwise-identical weights.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.tune")

from trainlib.launchers import ray as tl_ray  # noqa: E402
from trainlib.launchers.errors import LaunchConfigError  # noqa: E402
from trainlib.testing import run_ranks  # noqa: E402

SMALL = {"train.steps": 3, "model.n_layer": 1, "train.log_every": 1}
FAULT = {**SMALL, "train.steps": 4, "checkpoint.every": 1, "train.log_every": 1}
QUIET = {"TRAINLIB_NO_PROGRESS": "1"}


def reference_rank(config: dict) -> dict:
    return tl_ray.train_trainlib(config)


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory) -> dict:
    """FAULT on two plain gloo ranks, uninterrupted (no checkpoint.dir: nothing saved)."""
    path = tmp_path_factory.mktemp("ref") / "m.jsonl"
    return run_ranks(reference_rank, 2, {**FAULT, "train.metrics": str(path)}, timeout_s=240)[0]


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory) -> dict:
    """SMALL on one plain rank (train.log_every does not change the weights)."""
    path = tmp_path_factory.mktemp("ref") / "m.jsonl"
    return run_ranks(reference_rank, 1, {**SMALL, "train.metrics": str(path)}, timeout_s=240)[0]


def test_run_errors(local_ray):
    with pytest.raises(LaunchConfigError, match="num_workers=0"):
        tl_ray.run(tl_ray.train_trainlib, 0)
    # a placement group that cannot exist on a 2-CPU instance fails fast and names the free resources
    from trainlib.launchers.errors import LaunchInfraError

    with pytest.raises(LaunchInfraError, match="could not be placed together"):
        tl_ray.run(tl_ray.train_trainlib, 3, resources_per_worker={"CPU": 1}, timeout_s=1)



def test_worker_killed_mid_run_resumes_exactly(local_ray, tmp_path, two_rank_reference):
    # rank 1's actor process SIGKILLs itself after step 3's optimizer step, before step 3 is saved
    # (trainlib.testing's fault hook; a restarted worker has TORCHELASTIC_RESTART_COUNT=1 and runs through)
    config = {**FAULT, "train.metrics": str(tmp_path / "m.jsonl")}
    results = tl_ray.run(tl_ray.train_trainlib, 2, config, timeout_s=240, max_failures=1,
                         checkpoint_dir=str(tmp_path / "ck"), env={**QUIET, "TRAINLIB_FAULT_KILL_AT_STEP": "1:3"})
    assert results.restarts == 1 and [r["world_size"] for r in results] == [2, 2]
    assert [a["world_size"] for a in results.attempts] == [2, 2]
    assert results.attempts[0]["outcome"].startswith(("ActorDiedError", "RayActorError"))
    assert results.attempts[1]["resumed_from"] == 2 and results[0]["resumed_from"] == 2
    assert two_rank_reference["resumed_from"] is None
    assert results[0]["weights_sha256"] == two_rank_reference["weights_sha256"] == results[1]["weights_sha256"]
    assert results[0]["loss_first"] == two_rank_reference["loss_first"] and math.isfinite(results[0]["loss_last"])


def test_failures_that_are_not_retried(local_ray, tmp_path, caplog):
    # max_failures=0: the dead worker's error is the run's
    with pytest.raises(ray.exceptions.RayActorError):
        tl_ray.run(tl_ray.train_trainlib, 1, {**FAULT, "train.metrics": str(tmp_path / "m.jsonl")}, timeout_s=240,
                   checkpoint_dir=str(tmp_path / "ck"), env={**QUIET, "TRAINLIB_FAULT_KILL_AT_STEP": "0:1"})
    # a user error is raised at once, whatever max_failures says: a restart would repeat it
    from trainlib.config import ConfigError

    caplog.set_level("WARNING", logger="trainlib")
    with pytest.raises(ConfigError, match="train.nonfinite='bogus'"):
        tl_ray.run(tl_ray.train_trainlib, 1, {**SMALL, "train.nonfinite": "bogus"}, timeout_s=240, max_failures=3)
    assert not [r for r in caplog.records if r.getMessage().startswith("Ray run: restart")]


def test_shrinks_when_the_full_group_cannot_be_placed(local_ray, tmp_path, one_rank_reference):
    from ray.util.placement_group import placement_group, remove_placement_group

    blocker = placement_group([{"CPU": 1}])  # one of the instance's 2 CPUs is taken
    ray.get(blocker.ready(), timeout=60)
    try:
        config = {**SMALL, "train.metrics": str(tmp_path / "m.jsonl")}
        results = tl_ray.run(tl_ray.train_trainlib, 2, config, timeout_s=240, min_workers=1, place_timeout_s=2,
                             env=QUIET)
    finally:
        remove_placement_group(blocker)
    assert len(results) == 1 and results[0]["world_size"] == 1 and results.attempts[0]["world_size"] == 1
    assert results[0]["weights_sha256"] == one_rank_reference["weights_sha256"]


def test_run_argument_errors(local_ray):
    with pytest.raises(LaunchConfigError, match="max_failures=-1"):
        tl_ray.run(tl_ray.train_trainlib, 2, max_failures=-1)
    with pytest.raises(LaunchConfigError, match="min_workers=3 must be between 1 and num_workers=2"):
        tl_ray.run(tl_ray.train_trainlib, 2, min_workers=3)


def test_ray_main_entrypoint(local_ray, tmp_path, one_rank_reference):
    """The RayJob entrypoint: joins the running instance (RAY_ADDRESS), last stdout line is the summary."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "OMP_NUM_THREADS": "1"}
    flags = [f"--{k}={v}" for k, v in SMALL.items()] + [f"--train.metrics={tmp_path / 'm.jsonl'}"]
    out = subprocess.run([sys.executable, "-m", "trainlib.launchers.ray_main", "--num-workers", "1",
                          "--checkpoint-dir", str(tmp_path / "ck"), "--max-failures", "1", "--", *flags],
                         capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["restarts"] == 0 and summary["attempts"][0]["outcome"] == "ok"
    assert summary["weights_sha256"] == one_rank_reference["weights_sha256"]


@pytest.mark.parametrize("argv, message", [
    (["--num-workers", "2", "--", "--train.nonfinite=bogus"], "train.nonfinite='bogus' is not one of"),
    (["--num-workers", "2", "--", "steps=3"], "'steps=3' after `--` is not a trainlib train flag"),
    (["--num-workers", "2", "--resources-per-worker", "CPU=1"], "--resources-per-worker='CPU=1' is not JSON"),
    (["--num-workers", "0"], "--num-workers=0 must be >= 1"),
])
def test_ray_main_errors(argv, message, capsys):
    from trainlib.launchers import ray_main

    assert ray_main.main(argv) == 1  # before Ray is touched
    err = capsys.readouterr().err
    assert message in err and err.startswith("python -m trainlib.launchers.ray_main: error:")


def test_ray_main_help(capsys):
    from trainlib.launchers import ray_main

    with pytest.raises(SystemExit) as exit_:
        ray_main.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--num-workers N" in out and "--max-failures" in out and "--address" in out


def test_ray_main_unreachable_address_fails_retryably_and_says_so(capsys):
    import socket
    import time

    from trainlib.launchers import ray_main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    code = ray_main.main(["--num-workers", "1", "--address", f"127.0.0.1:{port}", "--connect-timeout-s", "1", "--",
                          "--train.steps=1"])
    err = capsys.readouterr().err
    assert code == 138 and time.monotonic() - t0 < 30
    assert f"'127.0.0.1:{port}' accepted no connection within 1s" in err and "--connect-timeout-s" in err
