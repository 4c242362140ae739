"""Admission rules the CRD schemas do not express, re-implemented as checks on our manifests.

OpenAPI validation (the CRDs) catches types and enums; the operators' webhooks and Kubernetes'
own pod validation catch the rest. Each check returns a list of messages (empty = admitted):

- training-operator v1.9 PyTorchJob webhook: name is a DNS-1035 label; replica types are only
  Master/Worker; Master has 1 replica; every replica has a container named `pytorch`; an
  elasticPolicy needs a Worker spec; elasticPolicy.nProcPerNode (deprecated) excludes
  spec.nprocPerNode; rdzvBackend (no CRD enum) is one of c10d/etcd/etcd-v2. Plus what the
  operator needs to inject MASTER_PORT: a port named `pytorchjob-port` on that container.
- mpi-operator v2beta1 validation: `<name>-worker-<n-1>` is a DNS-1123 label; slotsPerWorker set
  and >= 0; runPolicy.cleanPodPolicy in None/Running/All; sshAuthMountPath set; mpiImplementation
  OpenMPI/Intel/MPICH; Launcher exists with 1 replica; Worker replicas >= 1; replicas set;
  restartPolicy Never/OnFailure; at least one container.
- Pods: huge pages need requests == limits and a cpu or memory request; extended resources
  (GPUs, EFA, Neuron) cannot have requests different from limits.
"""
from __future__ import annotations

import re

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
EXTENDED = ("nvidia.com/gpu", "vpc.amazonaws.com/efa", "aws.amazon.com/neuron", "aws.amazon.com/neuroncore")
PYTORCH_RESTART = ("Always", "OnFailure", "Never", "ExitCode")


def _label_ok(rx: re.Pattern, value: str) -> bool:
    return len(value) <= 63 and rx.fullmatch(value) is not None


def check_pod_spec(pod: dict, where: str) -> list[str]:
    errs = []
    for c in pod.get("containers", []):
        res = c.get("resources", {})
        lim, req = res.get("limits", {}), res.get("requests", {})
        for k in set(lim) | set(req):
            if k.startswith("hugepages-"):
                if lim.get(k) != req.get(k):
                    errs.append(f"{where}: container {c['name']}: {k} requests {req.get(k)} != limits {lim.get(k)}")
                if not ({"cpu", "memory"} & (set(lim) | set(req))):
                    errs.append(f"{where}: container {c['name']}: huge pages need a cpu or memory request")
            if k in EXTENDED and k in req and k in lim and req[k] != lim[k]:
                errs.append(f"{where}: container {c['name']}: extended resource {k} requests != limits")
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        vols = {v["name"] for v in pod.get("volumes", [])}
        errs += [f"{where}: container {c['name']} mounts undefined volume {m!r}" for m in sorted(mounts - vols)]
    return errs


def check_pytorchjob(job: dict) -> list[str]:
    errs = []
    name = job["metadata"]["name"]
    if not _label_ok(DNS1035, name):
        errs.append(f"metadata.name {name!r} is not a DNS-1035 label (lowercase letters, digits, '-', starts with a letter)")
    spec = job["spec"]
    specs = spec.get("pytorchReplicaSpecs") or {}
    for rtype, r in specs.items():
        where = f"pytorchReplicaSpecs.{rtype}"
        if rtype not in ("Master", "Worker"):
            errs.append(f"{where}: replica type must be Master or Worker")
        if r.get("restartPolicy", "OnFailure") not in PYTORCH_RESTART:
            errs.append(f"{where}: restartPolicy {r.get('restartPolicy')!r} not in {PYTORCH_RESTART}")
        containers = r["template"]["spec"].get("containers", [])
        main = [c for c in containers if c.get("name") == "pytorch"]
        if not main:
            errs.append(f"{where}: no container named 'pytorch'")
        elif not any(p.get("name") == "pytorchjob-port" for p in main[0].get("ports", [])):
            errs.append(f"{where}: container 'pytorch' has no port named 'pytorchjob-port'")
        errs += check_pod_spec(r["template"]["spec"], where)
    if "Master" in specs and specs["Master"].get("replicas", 1) != 1:
        errs.append("pytorchReplicaSpecs.Master.replicas must be 1")
    ep = spec.get("elasticPolicy")
    if ep is not None:
        if "Worker" not in specs:
            errs.append("elasticPolicy is set but there is no Worker replica spec")
        if ep.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            errs.append("elasticPolicy.nProcPerNode (deprecated) cannot be used together with spec.nprocPerNode")
        if ep.get("rdzvBackend", "c10d") not in ("c10d", "etcd", "etcd-v2"):
            errs.append(f"elasticPolicy.rdzvBackend {ep.get('rdzvBackend')!r} is not c10d, etcd or etcd-v2")
        lo, hi = ep.get("minReplicas"), ep.get("maxReplicas")
        if lo is not None and hi is not None and lo > hi:
            errs.append(f"elasticPolicy.minReplicas {lo} > maxReplicas {hi}")
    return errs


def check_mpijob(job: dict) -> list[str]:
    errs = []
    spec = job["spec"]
    specs = spec.get("mpiReplicaSpecs") or {}
    workers = (specs.get("Worker") or {}).get("replicas") or 1
    host = f"{job['metadata']['name']}-worker-{max(workers, 1) - 1}"
    if not _label_ok(DNS1123, host):
        errs.append(f"metadata.name: pod hostname {host!r} would not be a DNS-1123 label")
    if spec.get("slotsPerWorker") is None or spec["slotsPerWorker"] < 0:
        errs.append("spec.slotsPerWorker must be set and >= 0")
    if spec.get("runPolicy", {}).get("cleanPodPolicy") not in ("None", "Running", "All"):
        errs.append("spec.runPolicy.cleanPodPolicy must be None, Running or All")
    if not spec.get("sshAuthMountPath"):
        errs.append("spec.sshAuthMountPath must be set")
    if spec.get("mpiImplementation", "OpenMPI") not in ("OpenMPI", "Intel", "MPICH"):
        errs.append(f"spec.mpiImplementation {spec.get('mpiImplementation')!r} is not OpenMPI, Intel or MPICH")
    if "Launcher" not in specs:
        errs.append("mpiReplicaSpecs.Launcher is required")
    for rtype, r in specs.items():
        where = f"mpiReplicaSpecs.{rtype}"
        if r.get("replicas") is None:
            errs.append(f"{where}.replicas must be set")
        if r.get("restartPolicy") not in ("Never", "OnFailure"):
            errs.append(f"{where}.restartPolicy must be Never or OnFailure")
        if not r["template"]["spec"].get("containers"):
            errs.append(f"{where}: at least one container")
        errs += check_pod_spec(r["template"]["spec"], where)
    if specs.get("Launcher", {}).get("replicas", 1) != 1:
        errs.append("mpiReplicaSpecs.Launcher.replicas must be 1")
    if "Worker" in specs and (specs["Worker"].get("replicas") or 0) < 1:
        errs.append("mpiReplicaSpecs.Worker.replicas must be >= 1")
    return errs


def check_stateful_set(ss: dict, services: list[dict]) -> list[str]:
    errs = []
    spec = ss["spec"]
    if spec["selector"]["matchLabels"] != {k: v for k, v in spec["template"]["metadata"]["labels"].items()
                                           if k in spec["selector"]["matchLabels"]}:
        errs.append(f"StatefulSet {ss['metadata']['name']}: selector does not match the pod labels")
    svc = [s for s in services if s["metadata"]["name"] == spec["serviceName"]]
    if not svc:
        errs.append(f"StatefulSet {ss['metadata']['name']}: serviceName {spec['serviceName']!r} has no Service")
    elif svc[0]["spec"].get("clusterIP") != "None":
        errs.append(f"Service {spec['serviceName']} must be headless (clusterIP: None) for stable pod DNS names")
    errs += check_pod_spec(spec["template"]["spec"], f"StatefulSet {ss['metadata']['name']}")
    return errs


def check_all(docs: list[dict]) -> list[str]:
    errs = []
    services = [d for d in docs if d["kind"] == "Service"]
    for d in docs:
        if d["kind"] == "PyTorchJob":
            errs += check_pytorchjob(d)
        elif d["kind"] == "MPIJob":
            errs += check_mpijob(d)
        elif d["kind"] == "StatefulSet":
            errs += check_stateful_set(d, services)
    return errs
