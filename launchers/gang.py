"""Gang scheduling: all pods of a job start together or none do (no half-started job holding GPUs).

- volcano: pods use schedulerName `volcano`; the job's runPolicy.schedulingPolicy carries
  minAvailable and the queue (the training operator copies them into the PodGroup it manages);
  the PodGroup (scheduling.volcano.sh/v1beta1) is also emitted so the manifest is complete on its
  own, and pods name it with the `scheduling.k8s.io/group-name` annotation.
- coscheduling (kubernetes-sigs/scheduler-plugins): schedulerName `scheduler-plugins-scheduler`,
  a PodGroup (scheduling.x-k8s.io/v1alpha1) with minMember, pods labelled
  `scheduling.x-k8s.io/pod-group`.
- kueue: the job carries the `kueue.x-k8s.io/queue-name` label; Kueue admits it by toggling
  spec.runPolicy.suspend. With a ClusterQueue name, the LocalQueue is emitted too.

minAvailable is every pod of a static job, and minReplicas for an elastic one. RayJob/RayCluster
and TrainJob reach the same schedulers their operators' way (labels for KubeRay's batch scheduler,
the runtime's podGroupPolicy): launchers/rayjob.py and launchers/trainjob.py.
"""
from __future__ import annotations

from trainlib.launchers.manifests import JobSpec, replica_templates, total_pods

GANGS = ("volcano", "coscheduling", "kueue")
SCHEDULER_NAMES = {"volcano": "volcano", "coscheduling": "scheduler-plugins-scheduler"}
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
COSCHED_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"


def local_queue(spec: JobSpec) -> list[dict]:
    """The Kueue LocalQueue named by --queue, pointing at --cluster-queue; none without a ClusterQueue."""
    if not spec.cluster_queue:
        return []
    md = {"name": spec.queue, **({"namespace": spec.namespace} if spec.namespace else {})}
    return [{"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue", "metadata": md,
             "spec": {"clusterQueue": spec.cluster_queue}}]


def min_available(job: dict, spec: JobSpec) -> int:
    return spec.elastic[0] if spec.elastic else total_pods(job)


def apply_gang(job: dict, spec: JobSpec) -> list[dict]:
    """Mutate `job` for the chosen gang scheduler; return the extra objects (PodGroup, LocalQueue)."""
    if spec.gang is None:
        return []
    if spec.gang not in GANGS:
        raise ValueError(f"--gang {spec.gang!r} is not one of {', '.join(GANGS)}")
    md = {"name": spec.name, **({"namespace": spec.namespace} if spec.namespace else {})}
    n = min_available(job, spec)
    if spec.gang == "kueue":
        if not spec.queue:
            raise ValueError("--gang kueue needs --queue NAME (the LocalQueue the job is submitted to)")
        job["metadata"].setdefault("labels", {})[QUEUE_LABEL] = spec.queue
        return local_queue(spec)
    policy = {"minAvailable": n}
    for tpl in replica_templates(job):
        tpl["spec"]["schedulerName"] = SCHEDULER_NAMES[spec.gang]
        if spec.gang == "volcano":
            tpl["metadata"].setdefault("annotations", {})[VOLCANO_GROUP_ANNOTATION] = spec.name
        else:
            tpl["metadata"].setdefault("labels", {})[COSCHED_GROUP_LABEL] = spec.name
    if spec.gang == "volcano":
        policy["queue"] = spec.queue or "default"
        group = {"apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "PodGroup", "metadata": md,
                 "spec": {"minMember": n, "queue": policy["queue"]}}
    else:
        policy["scheduleTimeoutSeconds"] = 300
        group = {"apiVersion": "scheduling.x-k8s.io/v1alpha1", "kind": "PodGroup", "metadata": md,
                 "spec": {"minMember": n, "scheduleTimeoutSeconds": 300}}
    job["spec"]["runPolicy"]["schedulingPolicy"] = policy
    return [group]
