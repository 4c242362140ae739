"""End to end: `trainlib launch` in the environments the operators create, on loopback.

Two `trainlib launch` processes get exactly the variables training-operator v1.9 injects into the
Master and Worker pods of a 2-replica PyTorchJob (nprocPerNode "1", MASTER_ADDR resolving to
loopback); the same for an elastic PyTorchJob (PET_RDZV_*); and an MPIJob launcher pod turning
its hostfile into a real `mpiexec -n 2 trainlib launch`. Each must train the default job with
world size 2 and end with the same weights (sha256) and first loss as the reference: the same
settings on 2 local ranks (what a plain `trainlib train --nproc-per-node 2` runs: the trainer on 2
real gloo ranks, trainlib.testing.run_ranks, without the ~13 s of CPU a `trainlib train` job costs in
imports and torchrun). Exit codes are checked with real failing and killed workers.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainlib.runtime import free_port
from trainlib.testing import run_ranks
from tests.trainer_ranks import train_one

BIN = Path(sys.executable).parent
TRAIN = ["trainlib", "train", "--train.steps", "3", "--model.n_layer", "1", "--train.log_every", "1"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "K_MPI_JOB_ROLE", "TRAINLIB_BACKEND")
TIMEOUT_S = 180


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(("PET_", "OMPI_", "PMI_", "PMIX_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=TIMEOUT_S)
            out.append((p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def summary(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON summary line in stdout:\n{stdout[-2000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """TRAIN on 2 local gloo ranks (a plain `trainlib train --nproc-per-node 2`): the reference every
    launcher must reproduce. Its metrics go to a temporary directory, not ./runs (no effect on the weights)."""
    tmp = tmp_path_factory.mktemp("ref")
    s = run_ranks(train_one, 2, [*TRAIN[2:], "--train.metrics", str(tmp / "metrics.jsonl")],
                  env={"TRAINLIB_NO_PROGRESS": "1"}, timeout_s=TIMEOUT_S)[0]
    assert s["world_size"] == 2 and s["steps"] == 3
    return s


def check_against_reference(results: list[tuple[int, str, str]], reference: dict) -> dict:
    for rc, so, se in results:
        assert rc == 0, se[-3000:]
    sums = [summary(so) for _, so, _ in results if "{" in so]
    assert len(sums) == 1, "exactly rank 0 prints the summary"
    s = sums[0]
    assert s["world_size"] == 2 and s["steps"] == 3
    assert math.isfinite(s["loss_first"]) and math.isfinite(s["loss_last"])
    assert s["loss_first"] == reference["loss_first"]
    assert s["weights_sha256"] == reference["weights_sha256"]
    return s


def test_pytorchjob_master_and_worker(tmp_path, reference):
    port = free_port()
    common = {"PYTHONUNBUFFERED": "0", "MASTER_PORT": str(port), "MASTER_ADDR": "localhost",
              "PET_MASTER_PORT": str(port), "PET_MASTER_ADDR": "localhost", "WORLD_SIZE": "2",
              "PET_NPROC_PER_NODE": "1", "PET_NNODES": "2"}
    procs = [start(["trainlib", "launch", "--", *TRAIN], clean_env(tmp_path, **common, RANK=str(r), PET_NODE_RANK=str(r)),
                   tmp_path) for r in (0, 1)]
    results = finish(procs)
    check_against_reference(results, reference)
    assert "placement: pytorchjob" in results[1][2] and "--node-rank 1" in results[1][2]


def test_elastic_pytorchjob(tmp_path, reference):
    env = {"PYTHONUNBUFFERED": "0", "PET_RDZV_ENDPOINT": f"localhost:{free_port()}", "PET_RDZV_BACKEND": "c10d",
           "PET_NNODES": "1:2", "PET_MAX_RESTARTS": "1", "PET_RDZV_ID": "gpt", "PET_NPROC_PER_NODE": "1"}
    results = finish([start(["trainlib", "launch", "--", *TRAIN], clean_env(tmp_path, **env), tmp_path) for _ in range(2)])
    check_against_reference(results, reference)
    assert all("placement: pytorchjob-elastic" in se for _, _, se in results)


@pytest.mark.skipif(shutil.which("mpiexec", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}") is None,
                    reason="no mpiexec (pip install mpich mpi4py)")
def test_mpijob_launcher_runs_mpiexec_ranks(tmp_path, reference):
    """MPIJob style: the launcher pod's `trainlib launch` turns the hostfile into a real
    `mpiexec -f HOSTFILE -n 2 trainlib launch -- CMD`; each MPI rank becomes one training process,
    with rank 0's address broadcast over MPI."""
    pytest.importorskip("mpi4py")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost:2\n")  # MPICH's format; what mpi-operator writes for mpiImplementation: MPICH
    env = clean_env(tmp_path, K_MPI_JOB_ROLE="launcher", HYDRA_HOST_FILE=str(hostfile))
    (rc, so, se), = finish([start(["trainlib", "launch", "--", *TRAIN], env, tmp_path)])
    check_against_reference([(rc, so, se)], reference)
    assert f"mpirun: mpiexec -f {hostfile} -n 2 trainlib launch -- trainlib train" in se
    assert se.count("placement: mpi-rank") == 2
    assert se.count("2 local processes") == 2  # each rank splits the node's cores between the 2 local ranks


def test_exit_codes_follow_kubeflow_exitcode_policy(tmp_path):
    """A failing script is permanent (1); a worker killed by a signal, or the pod being
    stopped with SIGTERM, is retryable."""
    cases = [("import sys; sys.exit(1)", 1),
             ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 138)]
    procs = [start(["trainlib", "launch", "--quiet", "--", sys.executable, "-c", code], clean_env(tmp_path), tmp_path)
             for code, _ in cases]
    # Kubernetes stops a pod (eviction, pre-emption) with SIGTERM: the launcher stops its workers, exits 138
    sleeper = start(["trainlib", "launch", "--quiet", "--", sys.executable, "-c",
                     "import time; print('started', flush=True); time.sleep(120)"], clean_env(tmp_path), tmp_path)
    assert sleeper.stdout.readline().strip() == "started"
    sleeper.send_signal(signal.SIGTERM)
    for (rc, _, se), (_, want) in zip(finish([*procs, sleeper]), [*cases, (None, 138)]):
        assert rc == want, se[-2000:]
    # a bad environment through the real command: exit 1, the message names what is missing and the fix
    env = clean_env(tmp_path, PET_NNODES="2", PET_NODE_RANK="1", RANK="1", WORLD_SIZE="2", MASTER_PORT="1234")
    ((rc, _, se),) = finish([start(["trainlib", "launch", "--", *TRAIN], env, tmp_path)])
    assert rc == 1 and "MASTER_ADDR is not set" in se and "pytorchjob-port" in se
