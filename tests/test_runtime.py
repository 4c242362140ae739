"""tl.init(): detection from torchrun / mpiexec / plain env, and real launches."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainlib.runtime import (DEFAULT_TIMEOUT_S, LaunchError, choose_device_backend, detect_launch, free_port,
                              resolve_timeout_s)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMI_", "PMIX_", "MPI_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_",
                                "TORCHELASTIC", "TRAINLIB_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _run_script(n: int, env_for_rank, launcher=None, timeout=120):
    if launcher is not None:
        out = subprocess.run([*launcher, sys.executable, "-m", "tests.rank_scripts", "init"], env=_clean_env(),
                             cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    else:
        procs = [subprocess.Popen([sys.executable, "-m", "tests.rank_scripts", "init"], env=_clean_env(**env_for_rank(r)),
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(n)]
        lines = []
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            assert p.returncode == 0, e[-3000:]
            lines.append(json.loads(o.strip().splitlines()[-1]))
    return sorted(lines, key=lambda d: d["rank"])


def test_detect_torchrun_env():
    info = detect_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                          "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (info.source, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("torchrun", 3, 4, 1, 2)
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 29500)


@pytest.mark.parametrize("env,expect", [
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (1, 4, 1, 2)),
    ({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"}, (2, 3, 0, 1)),
])
def test_detect_mpiexec_env(env, expect):
    info = detect_launch(env)
    assert info.source == "mpi" and (info.rank, info.world_size, info.local_rank, info.local_world_size) == expect


def test_detect_single_and_errors():
    assert detect_launch({}).source == "single"
    with pytest.raises(LaunchError, match="MASTER_ADDR, MASTER_PORT is not"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="RANK='x' is not an integer"):
        detect_launch({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(LaunchError, match="rank 5 is outside world_size 2"):
        detect_launch({"RANK": "5", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(LaunchError, match="PMI_SIZE is not"):
        detect_launch({"PMI_RANK": "0"})


def test_one_timeout_lookup_precedence():
    """explicit > TRAINLIB_PS_TIMEOUT_S (PS waits only) > TRAINLIB_TIMEOUT_S > 300 s; tl.init's value
    sits between the PS variable and TRAINLIB_TIMEOUT_S once a runtime exists (tests/test_errors.py)."""
    both = {"TRAINLIB_TIMEOUT_S": "7", "TRAINLIB_PS_TIMEOUT_S": "11"}
    assert resolve_timeout_s(env={}) == DEFAULT_TIMEOUT_S == 300.0
    assert resolve_timeout_s(env={"TRAINLIB_TIMEOUT_S": ""}) == 300.0   # empty is unset, as for the other vars
    assert resolve_timeout_s(env=both) == 7.0
    assert resolve_timeout_s(env=both, ps=True) == 11.0
    assert resolve_timeout_s(env={"TRAINLIB_TIMEOUT_S": "7"}, ps=True) == 7.0
    assert resolve_timeout_s(env={"TRAINLIB_PS_TIMEOUT_S": "11"}) == 300.0   # the PS's own figure is the PS's only
    assert resolve_timeout_s(2.5, env=both, ps=True) == 2.5
    for raw in ("soon", "-5", "0", "nan", "inf"):
        with pytest.raises(LaunchError, match=rf"TRAINLIB_TIMEOUT_S='{raw}' is not a positive number of seconds; "
                                              r"set e\.g\. TRAINLIB_TIMEOUT_S=600, or unset it"):
            resolve_timeout_s(env={"TRAINLIB_TIMEOUT_S": raw})
    with pytest.raises(LaunchError, match=r"TRAINLIB_PS_TIMEOUT_S='x' is not a positive number"):
        resolve_timeout_s(env={**both, "TRAINLIB_PS_TIMEOUT_S": "x"}, ps=True)
    with pytest.raises(LaunchError, match=r"timeout_s=-1 is not a positive number of seconds; pass e\.g\."):
        resolve_timeout_s(-1, env=both)


def test_backend_choice_and_override():
    dev, backend = choose_device_backend(0, env={})
    assert (dev.type, backend) == ("cpu", "gloo")  # no GPU on this machine
    with pytest.raises(LaunchError, match="unknown backend 'foo'"):
        choose_device_backend(0, env={"TRAINLIB_BACKEND": "foo"})
    with pytest.raises(LaunchError, match="nccl needs a CUDA device"):
        choose_device_backend(0, backend="nccl", device="cpu", env={})


def test_simulated_torchrun_env_two_processes():
    port = str(free_port())
    out = _run_script(2, lambda r: {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                    "MASTER_PORT": port, "TRAINLIB_TIMEOUT_S": "42"})
    assert [o["sum"] for o in out] == [3.0, 3.0]
    assert all(o["source"] == "torchrun" and o["backend"] == "gloo" and o["timeout_s"] == 42 and o["idempotent"]
               for o in out)


def test_simulated_mpiexec_env_two_processes():
    port = str(free_port())
    out = _run_script(2, lambda r: {"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2",
                                    "OMPI_COMM_WORLD_LOCAL_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    assert [(o["rank"], o["source"], o["sum"]) for o in out] == [(0, "mpi", 3.0), (1, "mpi", 3.0)]


def test_single_process():
    out = _run_script(1, lambda r: {})
    assert out[0]["source"] == "single" and out[0]["world_size"] == 1 and out[0]["sum"] == 1.0
    assert out[0]["timeout_s"] == DEFAULT_TIMEOUT_S


def test_real_torchrun():
    out = _run_script(2, None, launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc-per-node", "2", "--no-python"])
    assert [(o["rank"], o["world_size"], o["source"], o["sum"]) for o in out] == [(0, 2, "torchrun", 3.0),
                                                                                  (1, 2, "torchrun", 3.0)]


@pytest.mark.skipif(not (shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")), reason="no mpiexec")
def test_real_mpiexec_shares_rank0_address():
    pytest.importorskip("mpi4py")
    mpiexec = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
    out = _run_script(2, None, launcher=[mpiexec, "-n", "2"])
    assert [(o["rank"], o["source"], o["sum"]) for o in out] == [(0, "mpi", 3.0), (1, "mpi", 3.0)]
