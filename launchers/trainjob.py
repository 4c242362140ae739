"""Kubeflow Trainer v2 TrainJob and ClusterTrainingRuntime (trainer.kubeflow.org/v1alpha1, Trainer v2.3).

    trainlib k8s trainjob --name gpt --image REPO/trainlib-gpu:0.1.0 --nodes 4 --instance-type p5.48xlarge
    trainlib k8s trainjob --name gpt --image ... --with-runtime --gang volcano --queue training

How Trainer v2.3 turns these into pods (read in pkg/runtime/framework/plugins at v2.3.0):
- The runtime is a JobSet template. The replicated job labelled
  `trainer.kubeflow.org/trainjob-ancestor-step: trainer` is the trainer; its container named `node`
  takes the TrainJob's image, command, args, env and resourcesPerNode, and numNodes pods of it
  run as one Indexed Job. Its pods are `<job>-node-0-<i>` under the subdomain `<job>`.
- The torch plugin sets PET_NNODES, PET_NPROC_PER_NODE (numProcPerNode, else "auto" with GPUs,
  else the pod's CPU count: so the TrainJob always states it), PET_NODE_RANK (the Job completion
  index), PET_MASTER_ADDR=`<job>-node-0-0.<job>` and PET_MASTER_PORT=29500. A TrainJob must not
  set those itself. `trainlib launch` (the command here) reads them (launchers/detect.py) and
  starts torchrun.
- Gang scheduling is the runtime's podGroupPolicy (coscheduling or volcano; the plugin makes the
  PodGroup with minMember = numNodes, pods must name the scheduler themselves); a Volcano queue is
  the `scheduling.volcano.sh/queue-name` annotation on the runtime's JobSet template. Kueue admits
  TrainJobs labelled `kueue.x-k8s.io/queue-name`.
- Without --with-runtime the TrainJob names Trainer's stock `torch-distributed` runtime (or
  --runtime) and carries, as a runtime patch, what that runtime lacks: /dev/shm, the node selector
  and zone affinity, the scrape annotations. With it, the ClusterTrainingRuntime
  `trainlib-<name>` has them, plus the failure policy of trainlib's exit codes: exit 1 (a
  configuration error, launchers/errors.py) fails the Job through a podFailurePolicy and the JobSet
  through a rule on that reason; any other failure restarts the JobSet up to --max-restarts times
  (a static torchrun job restarts all nodes together).
"""
from __future__ import annotations

from trainlib.launchers.errors import EXIT_CONFIG
from trainlib.launchers.gang import QUEUE_LABEL, SCHEDULER_NAMES, local_queue
from trainlib.launchers.manifests import (JobSpec, _metadata, annotate, container, placement, pod_template,
                                          prometheus_annotations)

TRAINER_API = "trainer.kubeflow.org/v1alpha1"
TRAINER_GROUP = "trainer.kubeflow.org"
STOCK_RUNTIME = "torch-distributed"
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
FRAMEWORK_LABEL = "trainer.kubeflow.org/framework"
NODE = "node"                     # the trainer's replicated job and container name (Trainer constants.Node)
TRAINER_PORT = 29500              # PET_MASTER_PORT (Trainer constants.ContainerTrainerPort)
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
VOLCANO_QUEUE_ANNOTATION = "scheduling.volcano.sh/queue-name"
PATCH_MANAGER = "trainlib/k8s"   # the jobset plugin requires a domain-prefixed path (IsDomainPrefixedPath)
LAUNCH = ["trainlib", "launch", "--"]


def runtime_name(spec: JobSpec) -> str:
    return spec.runtime or (f"trainlib-{spec.name}" if spec.with_runtime else STOCK_RUNTIME)


def master_addr(job_name: str) -> str:
    """Where rank 0's node is reachable: the JobSet pod hostname under the job's subdomain."""
    return f"{job_name}-{NODE}-0-0.{job_name}"


def _node_container(spec: JobSpec) -> dict:
    c = container(spec, NODE, LAUNCH, list(spec.cmd), None)
    c["securityContext"] = {"allowPrivilegeEscalation": False}
    return c


def _patch(spec: JobSpec) -> list[dict]:
    """What the stock runtime's pod lacks, as a TrainJob runtime patch (a patch may set volumes,
    mounts, placement and pod metadata, but not the node container's env: that is trainer.env)."""
    c = _node_container(spec)
    pod: dict = {"volumes": pod_template([], spec)["spec"]["volumes"],
                 "containers": [{"name": NODE, "volumeMounts": c["volumeMounts"], "securityContext": c["securityContext"]}],
                 **placement(spec)}
    # the stock runtime's pods lack trainlib's labels, which the one-zone affinity of EFA jobs selects on
    tpl: dict = {"metadata": {"labels": dict(pod_template([], spec)["metadata"]["labels"])}, "spec": pod}
    annotate(tpl, prometheus_annotations(spec))
    rjob = {"name": NODE, "template": {"spec": {"template": tpl}}}
    return [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [rjob]}}}}]


def trainjob(spec: JobSpec) -> dict:
    c = _node_container(spec)
    trainer: dict = {"image": spec.image, "command": c["command"], "args": c.get("args", []),
                     "numNodes": spec.nodes, "numProcPerNode": spec.nproc_per_node}
    if "resources" in c:
        trainer["resourcesPerNode"] = c["resources"]
    if "env" in c:
        trainer["env"] = c["env"]
    job_spec: dict = {"runtimeRef": {"name": runtime_name(spec), "apiGroup": TRAINER_GROUP,
                                     "kind": "ClusterTrainingRuntime"}, "trainer": trainer}
    if not spec.with_runtime:
        job_spec["runtimePatches"] = _patch(spec)
    return {"apiVersion": TRAINER_API, "kind": "TrainJob", "metadata": _metadata(spec), "spec": job_spec}


def cluster_training_runtime(spec: JobSpec) -> dict:
    tpl = pod_template([_node_container(spec)], spec)
    tpl["spec"]["restartPolicy"] = "Never"   # a podFailurePolicy needs it; restarts are the JobSet's
    annotate(tpl, prometheus_annotations(spec))
    if spec.gang in SCHEDULER_NAMES:
        tpl["spec"]["schedulerName"] = SCHEDULER_NAMES[spec.gang]
    permanent = {"action": "FailJob", "onExitCodes": {"containerName": NODE, "operator": "In", "values": [EXIT_CONFIG]}}
    job = {"metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
           "spec": {"completionMode": "Indexed", "backoffLimit": 0, "podFailurePolicy": {"rules": [permanent]},
                    "template": tpl}}
    jobset: dict = {"replicatedJobs": [{"name": NODE, "replicas": 1, "template": job}],
                    "failurePolicy": {"maxRestarts": spec.max_restarts,
                                      "rules": [{"name": "configurationError", "action": "FailJobSet",
                                                 "onJobFailureReasons": ["PodFailurePolicy"]}]}}
    template: dict = {"spec": jobset}
    rt: dict = {"mlPolicy": {"numNodes": spec.nodes, "torch": {}}}
    if spec.gang == "volcano":
        rt["podGroupPolicy"] = {"volcano": {}}
        if spec.queue:
            template["metadata"] = {"annotations": {VOLCANO_QUEUE_ANNOTATION: spec.queue}}
    elif spec.gang == "coscheduling":
        rt["podGroupPolicy"] = {"coscheduling": {"scheduleTimeoutSeconds": 300}}
    rt["template"] = template
    # cluster-scoped: no namespace
    md = {"name": runtime_name(spec), "labels": {"app.kubernetes.io/name": "trainlib", FRAMEWORK_LABEL: "torch"}}
    return {"apiVersion": TRAINER_API, "kind": "ClusterTrainingRuntime", "metadata": md, "spec": rt}


def trainjob_objects(spec: JobSpec) -> list[dict]:
    """[LocalQueue], [ClusterTrainingRuntime], TrainJob — in apply order."""
    if spec.gang in SCHEDULER_NAMES and not spec.with_runtime:
        raise ValueError(f"--gang {spec.gang} is set in the ClusterTrainingRuntime (podGroupPolicy and the pods' "
                         "scheduler); add --with-runtime, or use --gang kueue, or name a runtime that has it with "
                         "--runtime and drop --gang")
    job = trainjob(spec)
    extra: list[dict] = []
    if spec.gang == "kueue":
        if not spec.queue:
            raise ValueError("--gang kueue needs --queue NAME (the LocalQueue the job is submitted to)")
        job["metadata"].setdefault("labels", {})[QUEUE_LABEL] = spec.queue
        extra = local_queue(spec)
    if spec.with_runtime:
        extra.append(cluster_training_runtime(spec))
    return extra + [job]
