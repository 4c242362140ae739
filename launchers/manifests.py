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
  NCCL's shared-memory transport and for data-loader workers. Its pages are charged to the pod's
  memory, so a memory *limit* must leave room for /dev/shm plus every rank's RSS: with
  --instance-type both are sized to the host (launchers/instances.py); without it, memory is only
  requested (no limit), so 8 ranks on a 2 TiB p5 are not OOM-killed at an arbitrary 16Gi.
- Placement: --instance-type adds the well-known `node.kubernetes.io/instance-type` node
  selector; EFA traffic does not cross availability zones, so EFA jobs either pin
  `topology.kubernetes.io/zone` (--zone) or require all their pods in one zone (pod affinity on
  the job label; the first pod matches itself, which Kubernetes allows).
- runPolicy.cleanPodPolicy is `Running`: when the job ends, pods still running (a hung rank
  holding 8 GPUs) are deleted; finished pods stay for their logs.
- Prometheus (--prometheus-port): the pods that host rank 0 carry the prometheus.io/scrape, /port
  and /path annotations that the common `kubernetes-pods` scrape config reads, and `trainlib train`
  gets --observe.prometheus=0.0.0.0:PORT: its endpoint binds loopback otherwise, which a scraper in
  another pod cannot reach.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trainlib.launchers.instances import EFA_HUGEPAGES, INSTANCE_ENV, InstanceType, lookup

PYTORCHJOB_PORT = 23456
DEFAULT_SHM = "16Gi"
EFA_MEMORY_REQUEST = "16Gi"   # without --instance-type: a scheduling hint (request, no limit)
INSTANCE_LABEL = "node.kubernetes.io/instance-type"
ZONE_LABEL = "topology.kubernetes.io/zone"
JOB_LABEL = "trainlib/job"
LAUNCHER_REQUESTS = {"cpu": "1", "memory": "1Gi"}


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
    shm_size: str | None = None           # None: sized to the instance type, else DEFAULT_SHM
    cpu: str | None = None                # None: sized to the instance type, else not requested
    memory: str | None = None             # request = limit; None: sized to the instance type
    instance_type: str | None = None      # node selector + TRAINLIB_INSTANCE_TYPE in the pod
    zone: str | None = None               # topology.kubernetes.io/zone node selector
    port: int = PYTORCHJOB_PORT
    extra_env: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    prometheus_port: int | None = None    # scrape annotations + --observe.prometheus=0.0.0.0:PORT
    # RayJob (launchers/rayjob.py)
    max_failures: int = 0                 # worker failures the Ray run survives (resume from checkpoint_dir)
    checkpoint_dir: str | None = None
    ttl_seconds: int = 600                # RayJob ttlSecondsAfterFinished: the cluster outlives the job this long
    # TrainJob (launchers/trainjob.py)
    runtime: str | None = None            # the (Cluster)TrainingRuntime the TrainJob names
    with_runtime: bool = False            # also emit that ClusterTrainingRuntime

    @property
    def nproc_per_node(self) -> int:
        return self.neuron_cores or self.gpus_per_node or 1

    @property
    def neuron_devices(self) -> int:
        return self.neuron_cores // self.neuron_cores_per_device

    @property
    def instance(self) -> InstanceType | None:
        return lookup(self.instance_type) if self.instance_type else None

    @property
    def pod_memory(self) -> str | None:
        it = self.instance
        return self.memory or (f"{it.pod_memory_gi()}Gi" if it else None)

    @property
    def pod_cpu(self) -> str | None:
        it = self.instance
        return self.cpu or (str(it.pod_cpu()) if it else None)

    @property
    def pod_shm(self) -> str:
        it = self.instance
        return self.shm_size or (f"{it.shm_gi()}Gi" if it else DEFAULT_SHM)


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
    if spec.pod_memory:
        limits["memory"] = requests["memory"] = spec.pod_memory
    elif spec.efa:  # huge pages need a memory (or cpu) request; no limit, so /dev/shm cannot OOM the ranks
        requests["memory"] = EFA_MEMORY_REQUEST
    if spec.pod_cpu:  # a request only: a CPU limit throttles data loaders and NCCL proxy threads
        requests["cpu"] = spec.pod_cpu
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
    if spec.instance_type:
        env.append({"name": INSTANCE_ENV, "value": spec.instance_type})
    env += [{"name": k, "value": v} for k, v in spec.extra_env]
    if env:
        c["env"] = env
    if with_resources and (res := resources(spec)):
        c["resources"] = res
    c["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    return c


def placement(spec: JobSpec) -> dict:
    """nodeSelector / affinity: the instance type, and one availability zone for EFA jobs."""
    out: dict = {}
    selector = {}
    if spec.instance_type:
        selector[INSTANCE_LABEL] = spec.instance_type
    if spec.zone:
        selector[ZONE_LABEL] = spec.zone
    if selector:
        out["nodeSelector"] = selector
    if spec.efa and not spec.zone:
        term = {"labelSelector": {"matchLabels": {JOB_LABEL: spec.name}}, "topologyKey": ZONE_LABEL}
        out["affinity"] = {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    return out


def pod_template(containers: list[dict], spec: JobSpec, volumes: list[dict] | None = None) -> dict:
    vols = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.pod_shm}}] + list(volumes or [])
    # Training pods never call the Kubernetes API (rendezvous is c10d or ssh), so no token is mounted.
    return {"metadata": {"labels": {"app.kubernetes.io/name": "trainlib", JOB_LABEL: spec.name}},
            "spec": {"automountServiceAccountToken": False, "containers": containers, "volumes": vols,
                     **placement(spec)}}


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
        # nothing in a training pod needs setuid binaries; MPIJob containers (sshd) keep the default
        c["securityContext"] = {"allowPrivilegeEscalation": False}
        return pod_template([c], spec, volumes)

    replicas: dict = {}
    job_spec: dict = {"nprocPerNode": str(spec.nproc_per_node),
                      "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": max(3, spec.max_restarts)}}
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
    # the launcher only runs mpirun (ssh fan-out, output forwarding); a request keeps it from being the
    # first pod evicted under node pressure, which would end the whole job
    launcher["resources"] = {"requests": dict(LAUNCHER_REQUESTS)}
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


PROMETHEUS_PATH = "/metrics"


def prometheus_annotations(spec: JobSpec) -> dict[str, str]:
    """The pod annotations Prometheus' `kubernetes-pods` job scrapes by (empty without a port)."""
    if spec.prometheus_port is None:
        return {}
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(spec.prometheus_port),
            "prometheus.io/path": PROMETHEUS_PATH}


def annotate(template: dict, annotations: dict[str, str]) -> None:
    if annotations:
        template.setdefault("metadata", {}).setdefault("annotations", {}).update(annotations)


def with_prometheus(cmd: list[str], port: int | None) -> list[str]:
    """`trainlib train` serving /metrics on every interface of its pod (the scraper is another pod)."""
    if port is None:
        return list(cmd)
    from trainlib.launchers.launch import train_args

    if train_args(cmd) is None:
        raise ValueError(f"--prometheus-port {port} needs a `trainlib train` command (it adds "
                         f"--observe.prometheus=0.0.0.0:{port}); the command is {' '.join(cmd)!r}")
    if any(a.startswith("--observe.prometheus") for a in cmd):
        raise ValueError("--prometheus-port and --observe.prometheus in the training command both set the endpoint; "
                         "keep one")
    return [*cmd, f"--observe.prometheus=0.0.0.0:{port}"]


def replica_templates(job: dict) -> list[dict]:
    specs = job["spec"].get("pytorchReplicaSpecs") or job["spec"].get("mpiReplicaSpecs") or {}
    return [r["template"] for r in specs.values()]


def total_pods(job: dict) -> int:
    specs = job["spec"].get("pytorchReplicaSpecs") or job["spec"].get("mpiReplicaSpecs") or {}
    return sum(int(r.get("replicas", 1)) for r in specs.values())
