"""The winning layout as something to run: a `trainlib train` command, or a Kubernetes manifest from
trainlib.launchers.k8s (the same generator as `trainlib k8s`, so the manifest is the one it prints)."""
from __future__ import annotations

import contextlib
import io
import shlex

from .layouts import Layout
from .spec import ClusterSpec, PlanError

# the instance type whose pods a device profile describes (launchers/instances.py has their facts)
INSTANCE_FOR = {"h100": "p5.48xlarge", "h200": "p5e.48xlarge", "trn1": "trn1.32xlarge", "trn2": "trn2.48xlarge"}
IMAGE_FOR = {"trn1": "trainlib-neuron:latest", "trn2": "trainlib-neuron:latest", "cpu": "trainlib-cpu:latest"}


JOB_KINDS = ("pytorchjob", "mpijob", "rayjob", "trainjob")   # kinds that run a job (a RayCluster does not)


def k8s_kinds() -> tuple[str, ...]:
    """The job kinds `trainlib k8s` can print here (pytorchjob, mpijob, and rayjob/trainjob where present)."""
    from trainlib.launchers.k8s import KINDS

    return tuple(k for k in JOB_KINDS if k in KINDS)


def train_argv(layout: Layout, global_batch: int) -> list[str]:
    return ["trainlib", "train", *layout.train_flags(global_batch)]


def train_command(layout: Layout, cluster: ClusterSpec, global_batch: int) -> str:
    """One node: `trainlib train --nproc-per-node G ...` (it starts torchrun); several: the command each
    pod runs under `trainlib launch --` (PyTorchJob/MPIJob env gives the ranks)."""
    argv = train_argv(layout, global_batch)
    if cluster.nodes == 1:
        argv[2:2] = [f"--nproc-per-node={cluster.devices_per_node}"]
    return shlex.join(argv)


def k8s_argv(kind: str, layout: Layout, cluster: ClusterSpec, global_batch: int, name: str,
             image: str | None) -> list[str]:
    from trainlib.launchers.instances import TABLE

    argv = [kind, "--name", name, "--image", image or IMAGE_FOR.get(cluster.device, "trainlib-gpu:latest"),
            "--nodes", str(cluster.nodes)]
    it = TABLE.get(INSTANCE_FOR.get(cluster.device, ""))
    if cluster.device.startswith("trn"):
        argv += ["--neuron-cores", str(cluster.devices_per_node)]
        if it is not None and it.neuron_devices * it.neuron_cores_per_device == cluster.devices_per_node:
            argv += ["--instance-type", it.name]
    elif cluster.device != "cpu":
        argv += ["--gpus-per-node", str(cluster.devices_per_node)]
        if it is not None and it.gpus == cluster.devices_per_node:
            argv += ["--instance-type", it.name]
    return argv + ["--", *train_argv(layout, global_batch)]


def manifest(kind: str, layout: Layout, cluster: ClusterSpec, global_batch: int, name: str = "trainlib-plan",
             image: str | None = None) -> str:
    """YAML (JSON where PyYAML is absent) from `trainlib k8s KIND ...`; PlanError with its message if it refuses."""
    from trainlib.launchers import k8s

    if kind not in k8s_kinds():
        raise PlanError(f"--emit {kind}: `trainlib k8s` here makes {', '.join(k8s_kinds())}; pick one of those or "
                        "--emit train")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = k8s.main(k8s_argv(kind, layout, cluster, global_batch, name, image))
        except SystemExit as e:   # argparse: a flag this kind does not take
            rc = e.code if isinstance(e.code, int) else 1
    if rc != 0:
        raise PlanError(f"--emit {kind}: trainlib k8s refused the winner: {err.getvalue().strip()}")
    return out.getvalue()
