"""KubeRay RayJob and RayCluster (ray.io/v1, KubeRay v1.7) that run trainlib's Ray launcher.

    trainlib k8s rayjob --name gpt --image REPO/trainlib-gpu:0.1.0 --nodes 4 --instance-type p5.48xlarge \
        --max-failures 2 --checkpoint-dir s3://bucket/gpt --gang kueue --queue team-a -- trainlib train --train.steps=1000

What KubeRay does with these objects (read in ray-operator/controllers/ray at v1.7.0):
- The first container of each pod is the Ray container. KubeRay replaces its command with
  `/bin/bash -c -- "ulimit -n 65536; ray start ..."` (a `command` of ours would run *before*
  `ray start`), so the image needs `ray` (pip install 'trainlib[ray]') and bash; its ENTRYPOINT is
  not used. `ray start` reads --num-cpus from the container's cpu request/limit and --num-gpus
  from nvidia.com/gpu; NeuronCores are only derived from `aws.amazon.com/neuroncore`, so Neuron
  workers (which ask for whole `aws.amazon.com/neuron` devices, like the PyTorchJob) declare
  `neuron_cores` through the group's `resources` field.
- K8sJobMode (the default): when the cluster is ready a submitter Job runs
  `ray job submit -- <entrypoint>` with the head's image; the entrypoint (the job driver) runs on
  the head. `shutdownAfterJobFinishes` deletes the cluster `ttlSecondsAfterFinished` seconds after
  the job ends; `backoffLimit` retries the whole RayJob on a new cluster.
- Gang scheduling is done by the operator's batch scheduler, not by objects of ours: with
  `batchScheduler.name=volcano` KubeRay creates the PodGroup `ray-<name>-pg` (minMember = head +
  workers) and reads the queue from the `volcano.sh/queue-name` label; with
  `batchScheduler.name=scheduler-plugins` the `ray.io/gang-scheduling-enabled` label asks for a
  coscheduling PodGroup. Kueue admits RayJobs and RayClusters labelled `kueue.x-k8s.io/queue-name`
  (it toggles spec.suspend, which needs shutdownAfterJobFinishes and no autoscaling: both hold).

Layout: a small CPU head (`num-cpus: 0`, so no training actor lands on it; it runs the GCS, the
dashboard and the driver) and one worker group of `--nodes` pods sized like the PyTorchJob's pods
(resources, /dev/shm, EFA, Neuron, instance type, zone: launchers/manifests.py). The driver is
`python -m trainlib.launchers.ray_main`, which reserves one placement-group bundle per worker:
one worker per GPU or NeuronCore (Ray sets CUDA_VISIBLE_DEVICES / NEURON_RT_VISIBLE_CORES per
actor), or one per pod on CPU nodes.
"""
from __future__ import annotations

import dataclasses
import json
import shlex

from trainlib.launchers.devices import Devices
from trainlib.launchers.gang import QUEUE_LABEL, local_queue
from trainlib.launchers.manifests import (JOB_LABEL, JobSpec, _metadata, annotate, container, pod_template,
                                          prometheus_annotations)
from trainlib.launchers.profiles import select_profile

RAY_API = "ray.io/v1"
RAY_MAIN = ("python", "-m", "trainlib.launchers.ray_main")
HEAD_CPU, HEAD_MEMORY, HEAD_SHM = "2", "8Gi", "2Gi"
WORKER_GROUP = "worker"
NODE_TYPE_LABEL = "ray.io/node-type"          # set by KubeRay on every pod it creates: head | worker
VOLCANO_QUEUE_LABEL = "volcano.sh/queue-name"
GANG_LABEL = "ray.io/gang-scheduling-enabled"
MAX_RAYJOB_NAME = 47                          # KubeRay: RayCluster names <= 53, RayJob adds a 6-character suffix
MAX_RAYCLUSTER_NAME = 53


def workers(spec: JobSpec) -> tuple[int, dict[str, float]]:
    """(number of Ray training workers, resources of one): one per accelerator, else one per pod."""
    if spec.neuron_cores:
        return spec.nodes * spec.neuron_cores, {"neuron_cores": 1}
    if spec.gpus_per_node:
        cpu = int(spec.pod_cpu) // spec.gpus_per_node if spec.pod_cpu and spec.pod_cpu.isdigit() else 1
        return spec.nodes * spec.gpus_per_node, {"CPU": max(1, cpu), "GPU": 1}
    cpu = int(spec.pod_cpu) if spec.pod_cpu and spec.pod_cpu.isdigit() else 1
    return spec.nodes, {"CPU": cpu}


def entrypoint(spec: JobSpec) -> str:
    """The driver command line `ray job submit` runs on the head (a shell string, as KubeRay passes it)."""
    from trainlib.launchers.launch import train_args

    flags = train_args(list(spec.cmd))
    if flags is None:
        raise ValueError(f"a RayJob runs `trainlib train` through {' '.join(RAY_MAIN)}; the command after -- must be "
                         f"`trainlib train [--section.key=value ...]`, not {' '.join(spec.cmd)!r}")
    n, per_worker = workers(spec)
    argv = [*RAY_MAIN, "--num-workers", str(n)]
    if spec.max_failures:
        argv += ["--max-failures", str(spec.max_failures)]
    if spec.checkpoint_dir:
        argv += ["--checkpoint-dir", spec.checkpoint_dir]
    argv += ["--resources-per-worker", json.dumps(per_worker, separators=(",", ":")), "--", *flags]
    return shlex.join(argv)


def _profile_env(spec: JobSpec) -> list[dict]:
    """What `trainlib launch` would set on such a node, where it can be known before the pod exists
    (no `trainlib launch` runs in a Ray pod): the Neuron cache, arenas and libfabric settings. The
    EFA/NCCL plugin settings depend on the plugin found in the image, so GPU pods get none here."""
    devices = Devices(gpus=spec.gpus_per_node, neuron_cores=spec.neuron_cores,
                      efa=tuple(f"uverbs{i}" for i in range(spec.efa)), instance=spec.instance)
    if not (devices.neuron_cores or devices.gpus):
        return []   # Ray sets OMP_NUM_THREADS per actor from its CPU share
    profile = select_profile(devices, spec.nproc_per_node, env={})
    return [{"name": k, "value": v} for k, v in profile.env.items()]


def _ray_container(spec: JobSpec, name: str, env: list[dict]) -> dict:
    c = container(spec, name, [], None, None, env)
    del c["command"]   # KubeRay's `ray start` wrapper is the command
    c["securityContext"] = {"allowPrivilegeEscalation": False}
    return c


def _head(spec: JobSpec) -> dict:
    head_spec = dataclasses.replace(spec, gpus_per_node=0, neuron_cores=0, efa=0, instance_type=None,
                                    cpu=HEAD_CPU, memory=HEAD_MEMORY, shm_size=HEAD_SHM)
    tpl = pod_template([_ray_container(head_spec, "ray-head", [])], head_spec)
    # the workers' one-zone affinity selects this label: a head scheduled first in a zone without
    # accelerator capacity must not pin the workers there
    tpl["metadata"]["labels"].pop(JOB_LABEL)
    # `num-cpus: 0`: no training actor is placed on the head (the driver needs none)
    return {"rayStartParams": {"num-cpus": "0"}, "template": tpl}


def _worker_group(spec: JobSpec) -> dict:
    tpl = pod_template([_ray_container(spec, "ray-worker", _profile_env(spec))], spec)
    affinity = tpl["spec"].get("affinity", {}).get("podAffinity")
    if affinity:   # one zone for the EFA workers, matched among the workers only (KubeRay labels the node type)
        for term in affinity["requiredDuringSchedulingIgnoredDuringExecution"]:
            term["labelSelector"]["matchLabels"][NODE_TYPE_LABEL] = "worker"
    annotate(tpl, prometheus_annotations(spec))   # rank 0 is an actor on one of the workers
    group = {"groupName": WORKER_GROUP, "replicas": spec.nodes, "minReplicas": spec.nodes,
             "maxReplicas": spec.nodes, "numOfHosts": 1, "rayStartParams": {}, "template": tpl}
    if spec.neuron_cores:
        group["resources"] = {"neuron_cores": str(spec.neuron_cores)}
    return group


def cluster_spec(spec: JobSpec) -> dict:
    """A fixed-size cluster (no autoscaler: a training run's placement group needs every worker)."""
    return {"enableInTreeAutoscaling": False, "headGroupSpec": _head(spec), "workerGroupSpecs": [_worker_group(spec)]}


def _gang(obj: dict, spec: JobSpec) -> list[dict]:
    """Labels for the operator's batch scheduler or Kueue; returns the LocalQueue when asked for."""
    labels = obj["metadata"].setdefault("labels", {})
    if spec.gang == "volcano":
        labels[VOLCANO_QUEUE_LABEL] = spec.queue or "default"
    elif spec.gang == "coscheduling":
        labels[GANG_LABEL] = "true"
    elif spec.gang == "kueue":
        if not spec.queue:
            raise ValueError("--gang kueue needs --queue NAME (the LocalQueue the job is submitted to)")
        labels[QUEUE_LABEL] = spec.queue
        return local_queue(spec)
    return []


def rayjob(spec: JobSpec) -> list[dict]:
    job = {"apiVersion": RAY_API, "kind": "RayJob", "metadata": _metadata(spec),
           "spec": {"entrypoint": entrypoint(spec), "shutdownAfterJobFinishes": True,
                    "ttlSecondsAfterFinished": spec.ttl_seconds, "backoffLimit": spec.max_restarts,
                    "submissionMode": "K8sJobMode", "rayClusterSpec": cluster_spec(spec)}}
    return _gang(job, spec) + [job]


def raycluster(spec: JobSpec) -> list[dict]:
    """The same cluster, long-lived: submit trainlib runs to it with `ray job submit`."""
    cluster = {"apiVersion": RAY_API, "kind": "RayCluster", "metadata": _metadata(spec), "spec": cluster_spec(spec)}
    return _gang(cluster, spec) + [cluster]
