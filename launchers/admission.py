"""Admission rules of KubeRay and Kubeflow Trainer v2 that their CRD schemas do not express.

launchers/webhooks.py does the same for PyTorchJob and MPIJob; `check(docs)` runs both. Rules,
from the operators' sources:

- KubeRay v1.7 (ray-operator/controllers/ray/utils/validation.go): RayCluster names are DNS-1035
  labels of at most 53 characters, RayJob names at most 47 (the cluster gets a 6-character
  suffix); a RayJob with ttlSecondsAfterFinished > 0 or suspend needs shutdownAfterJobFinishes;
  it needs rayClusterSpec (or a clusterSelector); backoffLimit >= 0; head and every worker group
  have a container; without autoscaling every group sets minReplicas <= maxReplicas, both >= 0;
  a group's `resources` and rayStartParams num-cpus/num-gpus/memory/resources exclude each other.
- Kueue's RayJob/RayCluster webhooks (pkg/controller/jobs/rayjob, raycluster), for objects with
  the queue label: no autoscaling, at most 7 worker groups, none named `head`, and a RayJob
  deletes its cluster when it ends (shutdownAfterJobFinishes).
- Trainer v2.3 (pkg/webhooks, plugins/torch, plugins/jobset, trainjob_types.go): a TrainJob name
  is at most 63 characters and its pods' hostnames `<name>-node-0-<i>` must be DNS labels; the
  trainer env must not set PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR or
  PET_MASTER_PORT; a runtime patch's manager is a domain-prefixed path (`example.com/name`) and
  may not set env on the `node` container. A runtime's replicated
  job labelled as the trainer ancestor has 1 replica and a container named `node`.
- Pods everywhere: webhooks.check_pod_spec (huge pages, extended resources, mounted volumes).
"""
from __future__ import annotations

import re

from trainlib.launchers.gang import QUEUE_LABEL
from trainlib.launchers.rayjob import MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME
from trainlib.launchers.trainjob import ANCESTOR_LABEL, NODE, RESERVED_ENV
from trainlib.launchers.webhooks import DNS1035, _label_ok, check_all, check_pod_spec

RAY_START_RESOURCE_KEYS = ("num-cpus", "num-gpus", "memory", "resources")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_HTTP_PATH = re.compile(r"[A-Za-z0-9/\-._~%!$&'()*+,;=:]+")   # apimachinery's httpPathRegexp


def _ray_cluster_spec(spec: dict, where: str) -> list[str]:
    errs = []
    head = spec.get("headGroupSpec") or {}
    groups = [("head", head)] + [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for name, g in groups:
        pod = g.get("template", {}).get("spec", {})
        if not pod.get("containers"):
            errs.append(f"{where}: {name} group has no container")
        params = g.get("rayStartParams") or {}
        if g.get("resources") and any(params.get(k) for k in RAY_START_RESOURCE_KEYS):
            errs.append(f"{where}: {name} group sets both `resources` and rayStartParams "
                        f"{'/'.join(RAY_START_RESOURCE_KEYS)}; KubeRay accepts only one")
        if "labels" in params:
            errs.append(f"{where}: {name} group: rayStartParams['labels'] is not supported; use the group's labels")
        errs += check_pod_spec(pod, f"{where}.{name}")
        if g is head:
            continue
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errs.append(f"{where}: worker group {name} must set minReplicas and maxReplicas (autoscaling is off)")
        elif lo is not None and hi is not None:
            if lo < 0 or hi < 0 or lo > hi:
                errs.append(f"{where}: worker group {name} has minReplicas {lo} / maxReplicas {hi}; need 0 <= min <= max")
            elif not lo <= g.get("replicas", lo) <= hi:
                errs.append(f"{where}: worker group {name} replicas {g['replicas']} outside {lo}..{hi}")
    return errs


def _name(doc: dict, limit: int) -> list[str]:
    name = doc["metadata"]["name"]
    if len(name) > limit or not _label_ok(DNS1035, name):
        return [f"{doc['kind']} metadata.name {name!r} must be a DNS-1035 label of at most {limit} characters"]
    return []


def _kueue_ray(doc: dict, spec: dict) -> list[str]:
    if QUEUE_LABEL not in doc["metadata"].get("labels", {}):
        return []
    errs, groups = [], spec.get("workerGroupSpecs", [])
    if spec.get("enableInTreeAutoscaling"):
        errs.append(f"{doc['kind']} for Kueue: no autoscaling (the queue reserved a fixed set of resources)")
    if len(groups) > 7 or any(g.get("groupName") == "head" for g in groups):
        errs.append(f"{doc['kind']} for Kueue: at most 7 worker groups, none named 'head'")
    return errs


def check_raycluster(doc: dict) -> list[str]:
    return (_name(doc, MAX_RAYCLUSTER_NAME) + _ray_cluster_spec(doc["spec"], "RayCluster.spec")
            + _kueue_ray(doc, doc["spec"]))


def check_rayjob(doc: dict) -> list[str]:
    errs = _name(doc, MAX_RAYJOB_NAME)
    spec = doc["spec"]
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errs.append("RayJob: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    if spec.get("suspend") and not shutdown:
        errs.append("RayJob: suspend (Kueue) needs shutdownAfterJobFinishes: true")
    if spec.get("ttlSecondsAfterFinished", 0) < 0 or spec.get("backoffLimit", 0) < 0:
        errs.append("RayJob: ttlSecondsAfterFinished and backoffLimit must be >= 0")
    if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
        errs.append("RayJob: one of rayClusterSpec or clusterSelector must be set")
    if "rayClusterSpec" in spec:
        errs += _ray_cluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
        errs += _kueue_ray(doc, spec["rayClusterSpec"])
        if QUEUE_LABEL in doc["metadata"].get("labels", {}) and not shutdown:
            errs.append("RayJob for Kueue: shutdownAfterJobFinishes must be true (the cluster holds the queue's quota)")
    return errs


def check_trainjob(doc: dict) -> list[str]:
    name = doc["metadata"]["name"]
    trainer = doc["spec"].get("trainer") or {}
    last = f"{name}-{NODE}-0-{max(1, trainer.get('numNodes', 1)) - 1}"
    errs = []
    if len(name) > 63 or not _label_ok(DNS1035, name):
        errs.append(f"TrainJob metadata.name {name!r} must be a DNS-1035 label of at most 63 characters")
    elif not _label_ok(DNS1035, last):
        errs.append(f"TrainJob {name!r}: the pod hostname {last!r} would be longer than 63 characters; shorten --name")
    reserved = sorted({e["name"] for e in trainer.get("env", [])} & set(RESERVED_ENV))
    if reserved:
        errs.append(f"TrainJob spec.trainer.env must not set {reserved}: the torch plugin sets them")
    for patch in doc["spec"].get("runtimePatches", []):
        host, _, path = patch.get("manager", "").partition("/")
        if not (_DNS1123_SUBDOMAIN.fullmatch(host) and len(host) <= 253 and _HTTP_PATH.fullmatch(path)):
            errs.append(f"TrainJob runtimePatches manager {patch.get('manager')!r} must be a domain-prefixed path "
                        "such as example.com/tool")
        rjobs = patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", [])
        for rj in rjobs:
            pod = rj.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            if any(c.get("name") == NODE and c.get("env") for c in pod.get("containers", [])):
                errs.append("TrainJob runtimePatches: no env on the node container (use spec.trainer.env)")
    return errs


def check_training_runtime(doc: dict) -> list[str]:
    errs = []
    rjobs = doc["spec"].get("template", {}).get("spec", {}).get("replicatedJobs", [])
    trainers = [rj for rj in rjobs if rj["template"].get("metadata", {}).get("labels", {})
                .get("trainer.kubeflow.org/trainjob-ancestor-step") == "trainer"]
    if not trainers:
        errs.append(f"{doc['kind']}: no replicated job labelled trainer.kubeflow.org/trainjob-ancestor-step=trainer; "
                    "the TrainJob's trainer settings would apply to nothing")
    for rj in trainers:
        pod = rj["template"]["spec"]["template"]["spec"]
        if rj.get("replicas", 1) != 1:
            errs.append(f"{doc['kind']}: trainer replicated job {rj['name']!r} must have replicas 1 (numNodes scales it)")
        if not any(c.get("name") == NODE for c in pod.get("containers", [])):
            errs.append(f"{doc['kind']}: trainer replicated job {rj['name']!r} has no container named 'node'")
        errs += check_pod_spec(pod, f"{doc['kind']}.{rj['name']}")
    pgp = doc["spec"].get("podGroupPolicy") or {}
    if len(pgp) > 1:
        errs.append(f"{doc['kind']}: podGroupPolicy sets {sorted(pgp)}; only one of coscheduling, volcano")
    return errs


CHECKS = {"RayJob": check_rayjob, "RayCluster": check_raycluster, "TrainJob": check_trainjob,
          "ClusterTrainingRuntime": check_training_runtime}


def check(docs: list[dict]) -> list[str]:
    """Every admission message for `docs` (empty: all admitted)."""
    errs = check_all(docs)
    for d in docs:
        if d["kind"] in CHECKS:
            errs += CHECKS[d["kind"]](d)
    return errs
