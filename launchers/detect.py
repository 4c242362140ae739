"""Where does this process run? Read the launcher's or operator's environment (pure, no I/O).

What each launcher injects (read from the operators' sources, summarised):

- Kubeflow training-operator PyTorchJob (v1.7+): every pod gets MASTER_ADDR/MASTER_PORT (the
  Master pod's Service and the port named `pytorchjob-port`), PET_MASTER_ADDR/PET_MASTER_PORT,
  PET_NNODES (replicas), PET_NPROC_PER_NODE (spec.nprocPerNode), PET_NODE_RANK, and *node-level*
  RANK (Master 0, Worker i -> i+1) and WORLD_SIZE (replicas x nprocPerNode). Older operators set
  only MASTER_*, RANK and WORLD_SIZE, both counted in pods.
- PyTorchJob with elasticPolicy: PET_RDZV_ENDPOINT (`<job>-worker-0:<port>` unless rdzvHost),
  PET_RDZV_BACKEND (c10d unless set), PET_NNODES as `min:max`, optional PET_MAX_RESTARTS,
  PET_RDZV_ID, PET_RDZV_CONF (`k=v,k=v`), PET_STANDALONE.
- Kubeflow Trainer v2 TrainJob (torch plugin, v2.3): PET_NNODES, PET_NPROC_PER_NODE (numProcPerNode;
  without it "auto" when the pod asks for a resource named *gpu*, else its CPU request — even on
  a Neuron node), PET_NODE_RANK (the Indexed Job's completion index, also JOB_COMPLETION_INDEX),
  PET_MASTER_ADDR (`<job>-node-0-0.<job>`, the JobSet pod hostname), PET_MASTER_PORT (29500);
  no MASTER_ADDR and no RANK.
- MPIJob v2beta1 (mpi-operator): K_MPI_JOB_ROLE=launcher|worker, the hostfile in
  OMPI_MCA_orte_default_hostfile / I_MPI_HYDRA_HOST_FILE / HYDRA_HOST_FILE; processes started by
  mpirun/mpiexec carry OMPI_COMM_WORLD_* (Open MPI) or PMI_RANK/PMI_SIZE (MPICH, Intel MPI).
- torchrun children: TORCHELASTIC_RUN_ID, GROUP_RANK, LOCAL_RANK, RANK, WORLD_SIZE. Any process
  with RANK, WORLD_SIZE and LOCAL_RANK (Ray workers, hand-made launchers) is treated the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from trainlib.launchers.errors import LaunchConfigError

KINDS = ("torchrun-child", "pytorchjob", "pytorchjob-elastic", "trainjob", "mpi-rank", "mpijob-launcher",
         "mpijob-worker", "plain")
HOSTFILE_VARS = ("OMPI_MCA_orte_default_hostfile", "I_MPI_HYDRA_HOST_FILE", "HYDRA_HOST_FILE")
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


@dataclass(frozen=True)
class Placement:
    """This node's place in the job, in torchrun's terms. `nnodes` is "N" or "MIN:MAX" (elastic)."""

    kind: str
    nnodes: str = "1"
    node_rank: int | None = 0
    nproc_per_node: str | None = None      # as the operator wrote it: "8", "auto", "gpu", "cpu" or None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_backend: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_conf: str | None = None
    max_restarts: int | None = None
    world_size: int | None = None          # total processes when the operator states it
    hostfile: str | None = None
    evidence: tuple[str, ...] = field(default_factory=tuple)  # the variables that decided `kind`

    @property
    def elastic(self) -> bool:
        return self.rdzv_endpoint is not None


def _int(env: dict[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise LaunchConfigError(f"{name}={raw!r} is not an integer; it must be a rank, a size or a port "
                                "(check the job spec or unset it)") from None


def _opt_int(env: dict[str, str], *names: str) -> int | None:
    for n in names:
        if env.get(n, "") != "":
            return _int(env, n)
    return None


def _opt(env: dict[str, str], *names: str) -> str | None:
    for n in names:
        if env.get(n, "") != "":
            return env[n]
    return None


def _nnodes_ok(value: str, source: str) -> str:
    parts = value.split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(parts) not in (1, 2) or not nums or any(n < 1 for n in nums) or (len(nums) == 2 and nums[0] > nums[1]):
        raise LaunchConfigError(f"{source}={value!r} is not a node count: use N or MIN:MAX with 1 <= MIN <= MAX "
                                "(elasticPolicy.minReplicas/maxReplicas in the PyTorchJob)")
    return value


def detect_placement(env: dict[str, str] | None = None) -> Placement:
    """Classify the environment. Narrow signals are checked first: a torchrun child also carries RANK
    and MASTER_ADDR, and an MPI rank started inside an MPIJob also carries K_MPI_JOB_ROLE."""
    env = dict(os.environ if env is None else env)
    if env.get("TORCHELASTIC_RUN_ID"):
        return Placement("torchrun-child", evidence=("TORCHELASTIC_RUN_ID",))
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        # already one rank of a job (torchrun, Ray workers, a hand-written launcher): never nest another
        return Placement("torchrun-child", evidence=("RANK+WORLD_SIZE+LOCAL_RANK",))
    nproc = _opt(env, "PET_NPROC_PER_NODE", "PET_N_PROC_PER_NODE")
    if env.get("PET_RDZV_ENDPOINT"):
        nnodes = _nnodes_ok(env.get("PET_NNODES") or "1", "PET_NNODES")
        return Placement(
            "pytorchjob-elastic", nnodes=nnodes, node_rank=None, nproc_per_node=nproc,
            rdzv_backend=env.get("PET_RDZV_BACKEND") or "c10d", rdzv_endpoint=env["PET_RDZV_ENDPOINT"],
            rdzv_id=env.get("PET_RDZV_ID") or None, rdzv_conf=env.get("PET_RDZV_CONF") or None,
            max_restarts=_opt_int(env, "PET_MAX_RESTARTS"), evidence=("PET_RDZV_ENDPOINT", "PET_NNODES"))
    pet = [n for n in ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR") if env.get(n)]
    if pet or ("RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" not in env):
        return _pytorchjob(env, nproc, pet)
    if (r := _opt_name(env, MPI_RANK_VARS)) is not None:
        return Placement("mpi-rank", nnodes="1", node_rank=None, evidence=(r,))
    role = env.get("K_MPI_JOB_ROLE", "")
    hostfile = _opt(env, *HOSTFILE_VARS)
    if role == "worker":
        return Placement("mpijob-worker", evidence=("K_MPI_JOB_ROLE=worker",))
    if role == "launcher" or hostfile:
        if not hostfile:
            raise LaunchConfigError("K_MPI_JOB_ROLE=launcher but no hostfile variable is set "
                                    f"({', '.join(HOSTFILE_VARS)}); the MPIJob operator mounts /etc/mpi/hostfile "
                                    "and sets OMPI_MCA_orte_default_hostfile — check mpiImplementation")
        return Placement("mpijob-launcher", hostfile=hostfile,
                         evidence=("K_MPI_JOB_ROLE=launcher" if role else next(n for n in HOSTFILE_VARS if env.get(n)),))
    return Placement("plain", nnodes="1", node_rank=0, nproc_per_node=nproc, evidence=())


def _opt_name(env: dict[str, str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if env.get(n, "") != ""), None)


def _pytorchjob(env: dict[str, str], nproc: str | None, pet: list[str]) -> Placement:
    """Static PyTorchJob (or TrainJob, which has PET_* but no MASTER_ADDR and no RANK)."""
    trainjob = "MASTER_ADDR" not in env and "RANK" not in env and "PET_MASTER_ADDR" in env
    kind = "trainjob" if trainjob else "pytorchjob"
    legacy = "PET_NNODES" not in env       # pre-1.7 operators: RANK/WORLD_SIZE count pods
    if legacy and "WORLD_SIZE" in env:
        nnodes = str(_int(env, "WORLD_SIZE"))
        world = None
    else:
        nnodes = env.get("PET_NNODES") or "1"
        world = _opt_int(env, "WORLD_SIZE")
    nnodes = _nnodes_ok(nnodes, "PET_NNODES" if not legacy else "WORLD_SIZE")
    if ":" in nnodes:
        raise LaunchConfigError(f"PET_NNODES={nnodes!r} is a range but PET_RDZV_ENDPOINT is not set; an elastic "
                                "PyTorchJob needs elasticPolicy (the operator then sets PET_RDZV_ENDPOINT)")
    node_rank = _opt_int(env, "PET_NODE_RANK", "JOB_COMPLETION_INDEX", "RANK")
    addr = _opt(env, "MASTER_ADDR", "PET_MASTER_ADDR")
    port = _opt_int(env, "MASTER_PORT", "PET_MASTER_PORT")
    n = int(nnodes)
    if node_rank is None:
        raise LaunchConfigError(f"{kind}: PET_NNODES={nnodes} is set but the node rank is not; set PET_NODE_RANK "
                                "(the operator sets it per pod) or RANK")
    if not 0 <= node_rank < n:
        raise LaunchConfigError(f"node rank {node_rank} is outside 0..{n - 1} (PET_NNODES={nnodes}); "
                                "check PET_NODE_RANK/RANK and the replica counts")
    missing = [name for name, v in (("MASTER_ADDR", addr), ("MASTER_PORT", port)) if v is None]
    if missing and n > 1:
        raise LaunchConfigError(
            f"{kind} with {n} nodes but {' and '.join(missing)} is not set; the operator derives them from the "
            "Master replica's container named 'pytorch' and its port named 'pytorchjob-port' — add both to the "
            "PyTorchJob (trainlib k8s pytorchjob does), or export MASTER_ADDR=<rank-0 host> MASTER_PORT=<port>")
    return Placement(kind, nnodes=nnodes, node_rank=node_rank, nproc_per_node=nproc, master_addr=addr,
                     master_port=port, world_size=world, max_restarts=_opt_int(env, "PET_MAX_RESTARTS"),
                     evidence=tuple(pet) or ("RANK", "WORLD_SIZE"))
