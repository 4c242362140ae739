"""PyTorchJob (kubeflow.org/v1) and MPIJob (kubeflow.org/v2beta1) objects as plain dicts.

Conventions the operators rely on (training-operator v1.9, mpi-operator v0.8):
- PyTorchJob: the container must be named `pytorch` and expose a port named `pytorchjob-port`
  (the operator derives MASTER_PORT, or the elastic rendezvous port, from it); Master has exactly
  1 replica; `spec.nprocPerNode` is a string. Elastic jobs have Workers only: the rendezvous
  endpoint is `<job>-worker-0:<port>`.
- `restartPolicy: ExitCode` on PyTorchJob replicas: exit 1-127 fails the job, >= 128 restarts the
  pod — matching trainlib launch's exit codes. MPIJob only accepts Never/OnFailure.
- Accelerators are extended resources (nvidia.com/gpu, aws.amazon.com/neuron,
  vpc.amazonaws.com/efa), set as limits (requests default to limits for extended resources).
  EFA pods also get 2 MiB huge pages (libfabric registers buffers in them) and a memory request,
  which Kubernetes requires next to huge pages.
- /dev/shm is a memory-backed emptyDir: the container runtime's 64 MiB default is too small for
  NCCL's shared-memory transport and for data-loader workers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PYTORCHJOB_PORT = 23456
EFA_HUGEPAGES = "5120Mi"


@dataclass(frozen=True)
class JobSpec:
    name: str
    image: str
    nodes: int = 2
    gpus_per_node: int = 0
    efa: int = 0                          # EFA interfaces per node
    neuron_cores: int = 0                 # NeuronCores per node
    neuron_cores_per_device: int = 2      # Trn1/Inf2: 2; Trn2 (LNC=2): 4
    namespace: str | None = None
    gang: str | None = None               # volcano | coscheduling | kueue
    queue: str | None = None
    cluster_queue: str | None = None      # with kueue: also emit the LocalQueue pointing at it
    elastic: tuple[int, int] | None = None
    max_restarts: int = 3
    cmd: tuple[str, ...] = ("trainlib", "train")
    ps_servers: int = 0
    ps_port: int = 5555
    ps_token_secret: str | None = None    # an existing Secret (key `token`); None: emit one
    shm_size: str = "16Gi"
    cpu: str | None = None
    memory: str | None = None
    port: int = PYTORCHJOB_PORT
    extra_env: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def nproc_per_node(self) -> int:
        return self.neuron_cores or self.gpus_per_node or 1

    @property
    def neuron_devices(self) -> int:
        return self.neuron_cores // self.neuron_cores_per_device


def resources(spec: JobSpec) -> dict:
    limits: dict[str, object] = {}
    requests: dict[str, object] = {}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = spec.gpus_per_node
    if spec.neuron_cores:
        limits["aws.amazon.com/neuron"] = spec.neuron_devices
    if spec.efa:
        limits["vpc.amazonaws.com/efa"] = spec.efa
        limits["hugepages-2Mi"] = requests["hugepages-2Mi"] = EFA_HUGEPAGES
    memory = spec.memory or ("16Gi" if spec.efa else None)
    if memory:
        limits["memory"] = requests["memory"] = memory
    if spec.cpu:
        requests["cpu"] = spec.cpu
    out = {"limits": limits} if limits else {}
    if requests:
        out["requests"] = requests
    return out


def container(spec: JobSpec, name: str, command: list[str], args: list[str] | None, port_name: str | None,
              env: list[dict] | None = None, with_resources: bool = True) -> dict:
    c: dict = {"name": name, "image": spec.image, "imagePullPolicy": "IfNotPresent", "command": command}
    if args:
        c["args"] = args
    if port_name:
        c["ports"] = [{"name": port_name, "containerPort": spec.port, "protocol": "TCP"}]
    env = list(env or [])
    if spec.neuron_cores:
        env.append({"name": "TRAINLIB_NEURON_CORES_PER_DEVICE", "value": str(spec.neuron_cores_per_device)})
    env += [{"name": k, "value": v} for k, v in spec.extra_env]
    if env:
        c["env"] = env
    if with_resources and (res := resources(spec)):
        c["resources"] = res
    c["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    return c


def pod_template(containers: list[dict], spec: JobSpec, volumes: list[dict] | None = None) -> dict:
    vols = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}] + list(volumes or [])
    return {"metadata": {"labels": {"app.kubernetes.io/name": "trainlib", "trainlib/job": spec.name}},
            "spec": {"containers": containers, "volumes": vols}}


def _metadata(spec: JobSpec) -> dict:
    md: dict = {"name": spec.name, "labels": {"app.kubernetes.io/name": "trainlib"}}
    if spec.namespace:
        md["namespace"] = spec.namespace
    return md


def pytorchjob(spec: JobSpec, env: list[dict] | None = None, volumes: list[dict] | None = None,
               mounts: list[dict] | None = None) -> dict:
    """Master (1) + Workers (nodes - 1), or Workers only with elasticPolicy."""
    def template() -> dict:
        c = container(spec, "pytorch", ["trainlib", "launch", "--"], list(spec.cmd), "pytorchjob-port", env)
        c["volumeMounts"] += list(mounts or [])
        return pod_template([c], spec, volumes)

    replicas: dict = {}
    job_spec: dict = {"nprocPerNode": str(spec.nproc_per_node),
                      "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": max(3, spec.max_restarts)}}
    if spec.elastic:
        lo, hi = spec.elastic
        replicas["Worker"] = {"replicas": min(max(spec.nodes, lo), hi), "restartPolicy": "ExitCode", "template": template()}
        job_spec["elasticPolicy"] = {"minReplicas": lo, "maxReplicas": hi, "rdzvBackend": "c10d",
                                     "maxRestarts": spec.max_restarts}
    else:
        replicas["Master"] = {"replicas": 1, "restartPolicy": "ExitCode", "template": template()}
        if spec.nodes > 1:
            replicas["Worker"] = {"replicas": spec.nodes - 1, "restartPolicy": "ExitCode", "template": template()}
    job_spec["pytorchReplicaSpecs"] = replicas
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _metadata(spec), "spec": job_spec}


def mpijob(spec: JobSpec, env: list[dict] | None = None, volumes: list[dict] | None = None,
           mounts: list[dict] | None = None) -> dict:
    """Launcher (runs mpirun through trainlib launch) + Workers (sshd, one slot per process)."""
    launcher = container(spec, "launcher", ["trainlib", "launch", "--"], list(spec.cmd), None, env, with_resources=False)
    worker = container(spec, "worker", ["trainlib", "launch", "--"], ["/usr/sbin/sshd", "-De"], None, env)
    worker["volumeMounts"] += list(mounts or [])
    launcher["volumeMounts"] += list(mounts or [])
    # sshd (the worker's process for mpirun) needs root; the images default to a non-root user.
    for c in (launcher, worker):
        c["securityContext"] = {"runAsUser": 0}
    return {"apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob", "metadata": _metadata(spec),
            "spec": {"slotsPerWorker": spec.nproc_per_node, "mpiImplementation": "OpenMPI",
                     "sshAuthMountPath": "/root/.ssh",
                     "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": max(3, spec.max_restarts)},
                     "mpiReplicaSpecs": {
                         "Launcher": {"replicas": 1, "restartPolicy": "OnFailure",
                                      "template": pod_template([launcher], spec, volumes)},
                         "Worker": {"replicas": spec.nodes, "restartPolicy": "OnFailure",
                                    "template": pod_template([worker], spec, volumes)}}}}


def replica_templates(job: dict) -> list[dict]:
    specs = job["spec"].get("pytorchReplicaSpecs") or job["spec"].get("mpiReplicaSpecs") or {}
    return [r["template"] for r in specs.values()]


def total_pods(job: dict) -> int:
    specs = job["spec"].get("pytorchReplicaSpecs") or job["spec"].get("mpiReplicaSpecs") or {}
    return sum(int(r.get("replicas", 1)) for r in specs.values())
