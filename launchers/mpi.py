"""MPI: map mpiexec ranks onto torch.distributed, and build the MPIJob launcher's mpirun line.

Under mpiexec every MPI rank becomes one training process: RANK/WORLD_SIZE/LOCAL_RANK come from
the MPI launcher's variables (via trainlib.runtime.detect_launch), and rank 0's address and a free
port are broadcast over MPI when MASTER_ADDR/MASTER_PORT are not given.

In an MPIJob (mpi-operator v2beta1) the launcher pod runs `trainlib launch -- CMD`; it turns
that into `mpirun` over the hostfile the operator mounted, with `trainlib launch -- CMD` as the
program, so each rank comes back here as an `mpi-rank`.

Which mpirun: the GPU image's Open MPI comes with the EFA installer (/opt/amazon/openmpi, built
against its libfabric) and mpi4py is built against it; a `mpirun` found first on PATH may be
another MPI (the PyPI `mpich` wheel puts one in the venv's bin/) that understands neither `-x`
nor `slots=`. So Open MPI's mpirun is called by its absolute path when it is there. Open MPI
refuses to start as root without `--allow-run-as-root`, and MPIJob launchers run as root (sshd).
"""
from __future__ import annotations

import os
import re

from trainlib.launchers.errors import LaunchConfigError
from trainlib.runtime import LaunchError, detect_launch

# Variables of the MPI process manager. A child that inherited them would try to join the same
# PMI session a second time; the launcher process already did (mpi4py), so they are removed.
MPI_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "HYDI_", "MPI_LOCAL", "PALS_", "I_MPI_")


def parse_hostfile(text: str) -> list[tuple[str, int]]:
    """Hosts and slots from an Open MPI (`host slots=N`) or MPICH/Intel (`host:N`) hostfile."""
    hosts = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+?)(?::(\d+))?(?:\s+slots\s*=\s*(\d+))?(?:\s+\S+=\S+)*", line)
        if not m:
            raise LaunchConfigError(f"cannot read hostfile line {line!r}; expected 'host slots=N' or 'host:N'")
        hosts.append((m.group(1), int(m.group(2) or m.group(3) or 1)))
    if not hosts:
        raise LaunchConfigError("the MPI hostfile lists no hosts; check the MPIJob's Worker replicas")
    return hosts


OPEN_MPI_DIRS = ("/opt/amazon/openmpi/bin", "/opt/amazon/openmpi5/bin")


def open_mpi_mpirun(root: str = "/") -> str:
    """The EFA installer's Open MPI mpirun (absolute path) when installed, else plain `mpirun` from PATH."""
    for d in OPEN_MPI_DIRS:
        path = os.path.join(root, d.lstrip("/"), "mpirun")
        if os.access(path, os.X_OK):
            return os.path.join(d, "mpirun") if root == "/" else path
    return "mpirun"


def mpirun_argv(hostfile: str, hostfile_text: str, cmd: list[str], env_names: list[str], open_mpi: bool,
                launcher: str = "trainlib", root: str = "/", as_root: bool | None = None) -> list[str]:
    """mpirun over every slot of the hostfile, each slot running `trainlib launch -- CMD`."""
    np_ = sum(s for _, s in parse_hostfile(hostfile_text))
    inner = [launcher, "launch", "--", *cmd]
    if open_mpi:
        exports = [a for n in env_names for a in ("-x", n)]
        as_root = os.geteuid() == 0 if as_root is None else as_root
        root_flag = ["--allow-run-as-root"] if as_root else []
        return [open_mpi_mpirun(root), *root_flag, "--hostfile", hostfile, "-np", str(np_), "--bind-to", "none",
                "--map-by", "slot", *exports, *inner]
    # MPICH / Intel MPI hydra pass the whole environment on by default.
    return ["mpiexec", "-f", hostfile, "-n", str(np_), *inner]


def rank_env(env: dict[str, str]) -> tuple[dict[str, str], bool]:
    """The torch.distributed variables for this MPI rank, and whether MPI was used to find the master."""
    try:
        info = detect_launch(env)
    except LaunchError as e:
        raise LaunchConfigError(str(e)) from None
    addr, port, used_mpi = env.get("MASTER_ADDR"), env.get("MASTER_PORT"), False
    if not addr or not port:
        from trainlib.runtime import _share_master_over_mpi  # one implementation of the broadcast

        try:
            addr, port = _share_master_over_mpi(info)
        except LaunchError as e:
            raise LaunchConfigError(str(e)) from None
        used_mpi = True
    out = {k: v for k, v in env.items() if not (used_mpi and k.startswith(MPI_PREFIXES))}
    out.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
               LOCAL_WORLD_SIZE=str(info.local_world_size), MASTER_ADDR=str(addr), MASTER_PORT=str(port))
    return out, used_mpi
