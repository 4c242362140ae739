"""Detection + devices + profile + torchrun arguments -> one LaunchPlan that explains itself.

`trainlib launch` runs a plan and `trainlib env` prints one, so what the entrypoint does and
what it says it does cannot drift apart.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

from trainlib.launchers.detect import Placement, detect_placement
from trainlib.launchers.errors import LaunchConfigError
from trainlib.launchers.devices import Devices, probe
from trainlib.launchers.profiles import Profile, select_profile
from trainlib.netif import IFNAME_VARS, socket_ifname_env
from trainlib.launchers.torchrun_args import check_backend, check_world_size, resolve_nproc, torchrun_argv

# torchrun reads PET_<FLAG> as the default of each of its flags; we pass every flag explicitly and
# drop these so a stale variable cannot override the plan. RANK/WORLD_SIZE from the operator are
# node-level; torchrun sets the per-process values for its children.
STRIP_FOR_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")

MODES = {
    "torchrun-child": "exec",          # already one rank: run the command as is
    "mpijob-worker": "exec",           # the MPIJob worker runs sshd (or whatever CMD is) for mpirun
    "mpijob-launcher": "mpirun",       # start `mpirun ... trainlib launch -- CMD` over the hostfile
    "mpi-rank": "mpi-rank",            # one MPI rank = one training process
}


@dataclass
class LaunchPlan:
    placement: Placement
    devices: Devices
    mode: str                           # "torchrun" | "exec" | "mpirun" | "mpi-rank"
    cmd: list[str]
    nproc_per_node: int = 1
    nproc_reason: str = ""
    profile: Profile | None = None
    torchrun_argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)   # the environment the job will get
    kept: list[str] = field(default_factory=list)       # profile variables the user had already set
    backend: str | None = None
    net_notes: list[str] = field(default_factory=list)  # which interface a multi-node job advertises, and why

    def explain(self) -> list[str]:
        p = self.placement
        lines = [f"placement: {p.kind} (from {', '.join(p.evidence) or 'no launcher variables'})",
                 f"accelerator: {self.devices.accelerator}; " + "; ".join(self.devices.notes),
                 f"EFA devices: {', '.join(self.devices.efa) or 'none'}; OFI plugin: {self.devices.ofi_plugin or 'not found'}"]
        if self.devices.nccl_checked:
            lines.append(f"NCCL: {self.devices.nccl_version or 'not found (no CUDA torch, no nvidia-nccl wheel)'}")
        if self.mode == "torchrun":
            world = (f"{p.nnodes} nodes x {self.nproc_per_node}" if p.elastic
                     else f"{int(p.nnodes) * self.nproc_per_node} processes")
            lines.append(f"nproc_per_node: {self.nproc_per_node} ({self.nproc_reason}); world: {world}")
            lines.append("torchrun " + shlex.join(self.torchrun_argv))
        else:
            lines.append(f"mode: {self.mode}: " + shlex.join(self.cmd))
        if self.profile:
            lines.append(f"profile: {self.profile.name}: " + "; ".join(self.profile.notes))
            lines += [f"  {k}={v}" for k, v in self.profile.env.items()]
        lines += [f"  kept {k}" for k in self.kept]
        lines += [f"network: {n}" for n in self.net_notes]
        return lines

    def as_dict(self) -> dict:
        return {"placement": self.placement.kind, "evidence": list(self.placement.evidence), "mode": self.mode,
                "nnodes": self.placement.nnodes, "node_rank": self.placement.node_rank,
                "nproc_per_node": self.nproc_per_node, "nproc_reason": self.nproc_reason,
                "accelerator": self.devices.accelerator, "gpus": self.devices.gpus,
                "neuron_cores": self.devices.neuron_cores, "efa_devices": list(self.devices.efa),
                "ofi_plugin": self.devices.ofi_plugin, "nccl_version": self.devices.nccl_version,
                "profile": self.profile.name if self.profile else None,
                "profile_env": dict(self.profile.env) if self.profile else {}, "kept": self.kept,
                "torchrun_argv": self.torchrun_argv, "cmd": self.cmd, "backend": self.backend,
                "socket_ifname": {v: self.env[v] for v in IFNAME_VARS if v in self.env}}


def build_plan(cmd: list[str], env: dict[str, str] | None = None, nproc_override: int | None = None,
               root: str = "/", devices: Devices | None = None) -> LaunchPlan:
    """Decide everything; raises LaunchConfigError (exit 1) for an environment we cannot run in."""
    env = dict(os.environ if env is None else env)
    placement = detect_placement(env)
    devices = devices if devices is not None else probe(env, root)
    backend = check_backend(env, devices)
    mode = MODES.get(placement.kind, "torchrun")
    plan = LaunchPlan(placement, devices, mode, list(cmd), backend=backend)
    if mode in ("exec", "mpirun"):
        # exec: already placed; mpirun: each rank comes back through `trainlib launch` and applies
        # the profile for its own node (the launcher pod's node is not where the ranks run)
        plan.env = env
        return plan
    if mode == "torchrun":
        plan.nproc_per_node, plan.nproc_reason = resolve_nproc(placement, devices, nproc_override)
        check_world_size(placement, plan.nproc_per_node)
        plan.torchrun_argv = torchrun_argv(placement, plan.nproc_per_node, cmd)
        base = {k: v for k, v in env.items() if not k.startswith("PET_") and k not in STRIP_FOR_TORCHRUN}
    else:
        plan.nproc_per_node, plan.nproc_reason = _local_ranks(env), "one process per MPI rank"
        base = env
    plan.profile = select_profile(devices, plan.nproc_per_node, env)
    plan.env, plan.kept = plan.profile.apply(base)
    _choose_socket_ifname(plan)
    _bound_static_rendezvous(plan)
    return plan


def _bound_static_rendezvous(plan: LaunchPlan) -> None:
    """A static multi-node job waits for every node's agent to join: 600 s in torchrun, and a node
    that died before joining leaves the others waiting that long. When the user has bounded waits
    (TRAINLIB_RDZV_TIMEOUT_S, else TRAINLIB_TIMEOUT_S) the join is bounded by the same figure.
    Unset, torchrun's 600 s stays: pods of one job can take minutes to pull their images.
    TRAINLIB_TIMEOUT_S is read with the ranks' own lookup, so a bad value stops every launch here."""
    from trainlib.runtime import TIMEOUT_ENV, LaunchError, resolve_timeout_s

    try:
        collective_s = resolve_timeout_s(env=plan.env)
    except LaunchError as e:
        raise LaunchConfigError(str(e)) from None
    p = plan.placement
    if plan.mode != "torchrun" or p.elastic or p.nnodes == "1":
        return
    name = "TRAINLIB_RDZV_TIMEOUT_S"
    if plan.env.get(name):
        try:
            secs = max(1, int(float(plan.env[name])))
        except ValueError:
            raise LaunchConfigError(f"{name}={plan.env[name]!r} is not a number of seconds; e.g. {name}=300") from None
    elif plan.env.get(TIMEOUT_ENV):
        name, secs = TIMEOUT_ENV, max(1, int(collective_s))
    else:
        return
    plan.torchrun_argv[0:0] = ["--rdzv-conf", f"timeout={secs}"]
    plan.net_notes.append(f"every node must join within {secs} s ({name}; torchrun's default is 600 s)")


def _choose_socket_ifname(plan: LaunchPlan) -> None:
    """A job that spans nodes advertises the interface that routes to its master (trainlib.netif)."""
    p = plan.placement
    multi_node = p.elastic or p.nnodes != "1"
    host = p.master_addr or (p.rdzv_endpoint.rpartition(":")[0] if p.rdzv_endpoint else None)
    if not multi_node or not host:
        return
    add, why = socket_ifname_env(plan.env, host)
    plan.env.update(add)
    plan.net_notes = [why] if why else [f"{v}={plan.env[v]} (user-set)" for v in IFNAME_VARS if plan.env.get(v)]


def _local_ranks(env: dict[str, str]) -> int:
    """MPI ranks on this node (for the CPU thread split); 1 when the MPI launcher does not say."""
    from trainlib.runtime import LaunchError, detect_launch

    try:
        return detect_launch(env).local_world_size
    except LaunchError:
        return 1
