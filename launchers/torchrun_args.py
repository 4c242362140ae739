"""The torchrun command line for a placement (pure functions, no I/O).

    nproc_per_node: an explicit flag > the operator's PET_NPROC_PER_NODE (if a number) > one
    process per visible NeuronCore or GPU > 1 on CPU. torchrun's own `auto` is never passed on:
    on a Neuron node it would start one process per CPU, not per NeuronCore.

    static job:   --nnodes N --node-rank R --master-addr A --master-port P   (rendezvous `static`)
    elastic job:  --nnodes MIN:MAX --rdzv-backend c10d --rdzv-endpoint H:P [--rdzv-id ID] --max-restarts K
    one node:     --standalone (torchrun picks a free local port)

World size = nnodes x nproc_per_node; every rank owns one accelerator, so nproc_per_node must
divide the node's GPUs or NeuronCores.
"""
from __future__ import annotations

from trainlib.launchers.detect import Placement
from trainlib.launchers.devices import Devices
from trainlib.launchers.errors import LaunchConfigError

from trainlib.runtime import BACKENDS

RDZV_BACKENDS = ("c10d", "etcd", "etcd-v2")  # what the training operator knows (no CRD enum)


def resolve_nproc(placement: Placement, devices: Devices, override: int | None = None) -> tuple[int, str]:
    """(processes per node, why)."""
    # the job field that sets PET_NPROC_PER_NODE, for the error messages
    field = "spec.trainer.numProcPerNode in the TrainJob" if placement.kind == "trainjob" else "spec.nprocPerNode"
    if override is not None:
        if override < 1:
            raise LaunchConfigError(f"--nproc-per-node={override} must be >= 1")
        n, why = override, "--nproc-per-node"
    elif placement.nproc_per_node not in (None, "", "auto", "gpu", "cpu"):
        raw = placement.nproc_per_node
        if not str(raw).isdigit() or int(raw) < 1:
            raise LaunchConfigError(f"PET_NPROC_PER_NODE={raw!r} is not a positive number or auto/gpu/cpu; "
                                    f"fix {field} (in a PyTorchJob a string such as \"8\")")
        n, why = int(raw), f"PET_NPROC_PER_NODE={raw}"
    elif devices.neuron_cores:
        n, why = devices.neuron_cores, f"one per NeuronCore ({devices.neuron_cores})"
    elif devices.gpus:
        n, why = devices.gpus, f"one per GPU ({devices.gpus})"
    else:
        n, why = 1, "CPU node: one process (set --nproc-per-node or spec.nprocPerNode for more)"
    for count, what in ((devices.neuron_cores, "NeuronCores"), (devices.gpus, "GPUs")):
        if count:
            if count % n:
                raise LaunchConfigError(
                    f"nproc_per_node {n} ({why}) does not divide the {count} visible {what}: each process needs the "
                    f"same share; use a divisor of {count} (e.g. {count}) for {field} or --nproc-per-node")
            break
    return n, why


def check_world_size(placement: Placement, nproc: int) -> None:
    """The operator's WORLD_SIZE (replicas x nprocPerNode) must match what we are about to start."""
    if placement.world_size is None or ":" in placement.nnodes:
        return
    if placement.nproc_per_node is not None and not str(placement.nproc_per_node).isdigit():
        return  # nprocPerNode "auto": the operator counted 1 per pod, and says WORLD_SIZE is not used
    nnodes = int(placement.nnodes)
    if placement.world_size != nnodes * nproc:
        raise LaunchConfigError(
            f"WORLD_SIZE={placement.world_size} from the operator is not nnodes({nnodes}) x nproc_per_node({nproc}) = "
            f"{nnodes * nproc}; {placement.world_size} processes do not divide evenly over {nnodes} nodes with {nproc} "
            "each — make spec.nprocPerNode match the devices per pod (or drop --nproc-per-node)")


def check_backend(env: dict[str, str], devices: Devices) -> str | None:
    b = env.get("TRAINLIB_BACKEND") or None
    if b is None:
        return None
    if b not in BACKENDS:
        raise LaunchConfigError(f"TRAINLIB_BACKEND={b!r} is not a known backend; use one of {', '.join(BACKENDS)} "
                                "or unset it to choose from the devices (nccl on GPU, xla on Neuron, gloo on CPU)")
    if b == "nccl" and not devices.gpus:
        raise LaunchConfigError("TRAINLIB_BACKEND=nccl but this node has no visible GPU; use gloo on CPU, or request "
                                "nvidia.com/gpu in the pod's resources")
    if b == "xla" and not devices.neuron_cores:
        raise LaunchConfigError("TRAINLIB_BACKEND=xla but no NeuronCore is visible; request aws.amazon.com/neuron "
                                "in the pod's resources or unset TRAINLIB_BACKEND")
    return b


def command_args(cmd: list[str]) -> list[str]:
    """torchrun runs `python SCRIPT` by default; anything that is not a .py file is an executable."""
    if not cmd:
        raise LaunchConfigError("no command to launch; e.g. trainlib launch -- trainlib train")
    if cmd[0] in ("-m", "--module"):
        return ["--module", *cmd[1:]]
    if cmd[0].endswith(".py"):
        return list(cmd)
    return ["--no-python", *cmd]


def torchrun_argv(placement: Placement, nproc: int, cmd: list[str]) -> list[str]:
    argv = ["--nproc-per-node", str(nproc)]
    if placement.elastic:
        if placement.rdzv_backend not in RDZV_BACKENDS:
            raise LaunchConfigError(f"PET_RDZV_BACKEND={placement.rdzv_backend!r} is unknown; elasticPolicy.rdzvBackend "
                                    f"must be one of {', '.join(RDZV_BACKENDS)} (c10d needs no extra service)")
        argv += ["--nnodes", placement.nnodes, "--rdzv-backend", placement.rdzv_backend,
                 "--rdzv-endpoint", placement.rdzv_endpoint, "--max-restarts", str(placement.max_restarts or 0)]
        if placement.rdzv_id:
            argv += ["--rdzv-id", placement.rdzv_id]
        if placement.rdzv_conf:
            argv += ["--rdzv-conf", placement.rdzv_conf]
    elif int(placement.nnodes) > 1:
        argv += ["--nnodes", placement.nnodes, "--node-rank", str(placement.node_rank),
                 "--master-addr", str(placement.master_addr), "--master-port", str(placement.master_port)]
        if placement.max_restarts:   # restart this node's workers in place (they resume from a checkpoint)
            argv += ["--max-restarts", str(placement.max_restarts)]
    else:
        argv += ["--standalone", "--nnodes", "1"]
    return argv + command_args(cmd)
