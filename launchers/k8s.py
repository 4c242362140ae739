"""`trainlib k8s pytorchjob|mpijob|rayjob|raycluster|trainjob [flags] [-- CMD ...]`: print a ready-to-apply manifest as YAML.

    trainlib k8s pytorchjob --name gpt --image REPO/trainlib-gpu:0.1.0 --nodes 4 --gpus-per-node 8 \
        --efa 32 --gang volcano --queue training | kubectl apply -f -
    trainlib k8s pytorchjob --name gpt --image ... --elastic 2:4 --gang coscheduling
    trainlib k8s mpijob --name gpt --image ... --nodes 2 --gpus-per-node 8
    trainlib k8s pytorchjob --name gpt --image ... --nodes 4 --instance-type p5.48xlarge   # 8 GPUs, 32 EFA, memory
    trainlib k8s pytorchjob --from-config run.toml      # [k8s] table + the training sections
    trainlib k8s rayjob --name gpt --image ... --nodes 2 --gpus-per-node 8 --max-failures 2 --checkpoint-dir s3://b/gpt
    trainlib k8s trainjob --name gpt --image ... --nodes 4 --instance-type p5.48xlarge --with-runtime --gang volcano
    trainlib k8s pytorchjob --name gpt --image ... --prometheus-port 9100   # scrape annotations on rank 0's pod

`--from-config` reads the `[k8s]` table (same keys as the flags, with underscores) and turns the
other tables into `--section.key=value` arguments of `trainlib train`, so the job runs that config.
Flags given on the command line win over the file. `--instance-type` fills GPUs/NeuronCores, EFA
interfaces, memory, cpu and /dev/shm from launchers/instances.py; explicit flags still win, and a
request the instance cannot hold (9 GPUs on a p5) is an error. The objects are checked against the
operators' admission rules (trainlib.launchers.webhooks, trainlib.launchers.admission) before
printing; a violation exits 1. RayJob/RayCluster: launchers/rayjob.py; TrainJob and its
ClusterTrainingRuntime: launchers/trainjob.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

from trainlib.launchers.admission import check
from trainlib.launchers.errors import EXIT_CONFIG
from trainlib.launchers.gang import GANGS, apply_gang
from trainlib.launchers.instances import MAX_NEURON_DEVICES, TABLE, InstanceType, lookup
from trainlib.launchers.manifests import (JobSpec, annotate, mpijob, prometheus_annotations, pytorchjob,
                                          replica_templates, with_prometheus)
from trainlib.launchers.ps import TOKEN_FS_GROUP, ps_objects, token_volume, with_ps_sync, worker_env
from trainlib.launchers.rayjob import raycluster, rayjob
from trainlib.launchers.trainjob import trainjob_objects

KINDS = ("pytorchjob", "mpijob", "rayjob", "raycluster", "trainjob")
FLAG_KEYS = ("name", "image", "namespace", "nodes", "gpus_per_node", "efa", "neuron_cores", "neuron_cores_per_device",
             "gang", "queue", "cluster_queue", "elastic", "max_restarts", "ps_servers", "ps_port", "ps_token_secret",
             "shm_size", "cpu", "memory", "instance_type", "zone", "prometheus_port", "max_failures", "checkpoint_dir",
             "ttl_seconds", "runtime", "with_runtime")
# flags that only mean something for some kinds: flag -> kinds
KIND_FLAGS = {"elastic": ("pytorchjob",), "ps_servers": ("pytorchjob", "mpijob"),
              "max_failures": ("rayjob",), "checkpoint_dir": ("rayjob",), "ttl_seconds": ("rayjob",),
              "runtime": ("trainjob",), "with_runtime": ("trainjob",),
              "prometheus_port": ("pytorchjob", "mpijob", "rayjob", "trainjob")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainlib k8s", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--name")
    p.add_argument("--image")
    p.add_argument("--namespace")
    p.add_argument("--nodes", type=int, help="pods (nodes); default 2")
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--efa", type=int, help="EFA interfaces per node (vpc.amazonaws.com/efa)")
    p.add_argument("--neuron-cores", type=int, help="NeuronCores per node (requests cores / cores-per-device devices)")
    p.add_argument("--neuron-cores-per-device", type=int, help="2 on Trn1/Inf2 (default), 4 on Trn2 with LNC=2")
    p.add_argument("--gang", choices=GANGS)
    p.add_argument("--queue", help="Volcano queue or Kueue LocalQueue")
    p.add_argument("--cluster-queue", help="with --gang kueue: also emit the LocalQueue pointing at this ClusterQueue")
    p.add_argument("--elastic", metavar="MIN:MAX", help="elastic PyTorchJob (c10d rendezvous), nodes in MIN..MAX")
    p.add_argument("--max-restarts", type=int)
    p.add_argument("--ps-servers", type=int, help="dedicated parameter servers (StatefulSet + headless Service)")
    p.add_argument("--ps-port", type=int)
    p.add_argument("--ps-token-secret", help="existing Secret with key `token` (default: emit a new random one)")
    p.add_argument("--shm-size")
    p.add_argument("--cpu")
    p.add_argument("--memory")
    p.add_argument("--instance-type", metavar="TYPE", help=f"size pods to this EC2 type ({', '.join(sorted(TABLE))})")
    p.add_argument("--zone", help="availability zone for every pod (EFA does not cross zones)")
    p.add_argument("--prometheus-port", type=int, metavar="PORT",
                   help="scrape annotations on rank 0's pod and --observe.prometheus=0.0.0.0:PORT for trainlib train")
    p.add_argument("--max-failures", type=int, help="rayjob: worker failures to survive (resume from --checkpoint-dir)")
    p.add_argument("--checkpoint-dir", help="rayjob: checkpoints every pod can reach (s3://... or a shared volume)")
    p.add_argument("--ttl-seconds", type=int, help="rayjob: keep the finished cluster this long (default 600)")
    p.add_argument("--runtime", help="trainjob: the ClusterTrainingRuntime it names (default torch-distributed, "
                   "or trainlib-NAME with --with-runtime)")
    p.add_argument("--with-runtime", action="store_true", default=None,
                   help="trainjob: also emit the ClusterTrainingRuntime (JobSet template, gang policy, /dev/shm)")
    p.add_argument("--from-config", metavar="RUN.toml")
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")
    p.epilog = "Everything after `--` is the training command (default: trainlib train)."
    return p


def _overrides(sections: dict) -> list[str]:
    out = []
    for section, table in sections.items():
        if not isinstance(table, dict):
            raise ValueError(f"top-level key {section!r} in the config is not a [section] table")
        for key, value in table.items():
            value = str(value).lower() if isinstance(value, bool) else value
            out.append(f"--{section}.{key}={value}")
    return out


def spec_from_args(args: argparse.Namespace, cmd: list[str]) -> JobSpec:
    values: dict = {}
    cmd = list(cmd)
    if args.from_config:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10 (Ubuntu 22.04 images)
            import tomli as tomllib

        try:
            with open(args.from_config, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--from-config {args.from_config} is not valid TOML: {e}") from None
        table = data.pop("k8s", {})
        unknown = sorted(set(table) - set(FLAG_KEYS))
        if unknown:
            raise ValueError(f"[k8s] keys {unknown} in {args.from_config} are unknown; valid: {', '.join(FLAG_KEYS)}")
        values.update(table)
        if not cmd:
            cmd = ["trainlib", "train", *_overrides(data)]
    values.update({k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k) is not None})
    for req in ("name", "image"):
        if not values.get(req):
            raise ValueError(f"--{req} is required (or `{req} = ...` in the [k8s] table of --from-config)")
    if isinstance(values.get("elastic"), str):
        lo, sep, hi = values["elastic"].partition(":")
        if not (sep and lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi)):
            raise ValueError(f"--elastic {values['elastic']!r} must be MIN:MAX with 1 <= MIN <= MAX, e.g. 2:4")
        values["elastic"] = (int(lo), int(hi))
    if values.get("elastic") and args.kind == "mpijob":
        raise ValueError("--elastic is for pytorchjob (torchrun's c10d rendezvous); an MPIJob has a fixed size")
    if args.kind == "raycluster" and cmd:
        raise ValueError(f"a RayCluster runs no job, so the command {' '.join(cmd)!r} would be dropped; use `trainlib "
                         "k8s rayjob`, or submit to the cluster with `ray job submit -- python -m "
                         "trainlib.launchers.ray_main ...`")
    for key, kinds in KIND_FLAGS.items():
        if values.get(key) and args.kind not in kinds:
            raise ValueError(f"--{key.replace('_', '-')} is for {' and '.join(kinds)}, not {args.kind}; drop it")
    values["cmd"] = tuple(cmd or ("trainlib", "train"))
    _check_flags(values, args.kind)
    _check_train_cmd(list(values["cmd"]))
    if values.get("instance_type"):
        _fill_from_instance(values, lookup(values["instance_type"]))
    spec = JobSpec(**values)
    if spec.max_failures and not spec.checkpoint_dir:
        raise ValueError(f"--max-failures {spec.max_failures} resumes from a checkpoint: add --checkpoint-dir on "
                         "storage every pod reaches (s3://bucket/run or a shared volume)")
    for k in ("nodes", "gpus_per_node", "efa", "neuron_cores", "ps_servers", "max_restarts", "max_failures",
              "ttl_seconds"):
        if getattr(spec, k) < 0 or (k == "nodes" and spec.nodes < 1):
            raise ValueError(f"--{k.replace('_', '-')}={getattr(spec, k)} must be {'>= 1' if k == 'nodes' else '>= 0'}")
    if spec.neuron_cores_per_device < 1:
        raise ValueError(f"--neuron-cores-per-device={spec.neuron_cores_per_device} must be >= 1 (2 on Trn1/Inf2, "
                         "4 on Trn2 with LNC=2)")
    if spec.gpus_per_node and spec.neuron_cores:
        raise ValueError("--gpus-per-node and --neuron-cores exclude each other: a node is a GPU node or a Trainium node")
    if spec.neuron_cores % spec.neuron_cores_per_device:
        raise ValueError(f"--neuron-cores {spec.neuron_cores} is not a multiple of --neuron-cores-per-device "
                         f"{spec.neuron_cores_per_device}; request whole Neuron devices")
    if spec.instance:
        _check_fits(spec, spec.instance)
    if spec.neuron_devices > MAX_NEURON_DEVICES:
        raise ValueError(f"--neuron-cores {spec.neuron_cores} / {spec.neuron_cores_per_device} cores per device = "
                         f"{spec.neuron_devices} Neuron devices, but no Trainium instance has more than "
                         f"{MAX_NEURON_DEVICES}; on trn2 (LNC=2) set --neuron-cores-per-device 4, or --instance-type "
                         "trn2.48xlarge")
    _check_shm_fits(spec)
    return spec


_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_CPU = re.compile(r"^(\d+(\.\d+)?|\d+m)$")


def _check_flags(values: dict, kind: str) -> None:
    """Flag values the API server or the operators would reject, or silently ignore, named before
    any object is built (the webhook check after build() only sees the finished objects)."""
    name, ns = values.get("name"), values.get("namespace")
    if not _DNS_1035.match(str(name)):
        raise ValueError(f"--name={name!r} is not a DNS-1035 label (lower-case letters, digits and '-', starting "
                         "with a letter, at most 63 characters); e.g. gpt-run")
    if ns is not None and not _DNS_1123.match(str(ns)):
        raise ValueError(f"--namespace={ns!r} is not a DNS-1123 label (lower-case letters, digits and '-', at most "
                         "63 characters); e.g. team-a")
    zone = values.get("zone")
    if zone is not None and not (zone and _LABEL_VALUE.match(str(zone))):
        raise ValueError(f"--zone={zone!r} is not a label value (letters, digits, '-', '_', '.'); e.g. us-east-1a")
    for key, example in (("shm_size", "16Gi"), ("memory", "16Gi")):
        if values.get(key) is not None:
            try:
                quantity_bytes(str(values[key]))
            except ValueError:
                raise ValueError(f"--{key.replace('_', '-')}={values[key]!r} is not a memory quantity; use e.g. "
                                 f"{example} or 512Mi") from None
    if values.get("cpu") is not None and not _CPU.match(str(values["cpu"])):
        raise ValueError(f"--cpu={values['cpu']!r} is not a CPU quantity; use e.g. 8 or 500m")
    for key, example in (("ps_port", 5555), ("prometheus_port", 9100)):
        port = values.get(key)
        if port is not None and not 1 <= int(port) <= 65535:
            raise ValueError(f"--{key.replace('_', '-')}={port} is not a port in 1..65535; e.g. {example}")
    gang = values.get("gang")
    if values.get("queue") and gang not in ("volcano", "kueue"):
        raise ValueError(f"--queue {values['queue']} has no effect without --gang volcano or --gang kueue; add one "
                         "or drop --queue")
    if values.get("cluster_queue") and gang != "kueue":
        raise ValueError(f"--cluster-queue {values['cluster_queue']} only applies to --gang kueue; add it or drop "
                         "--cluster-queue")
    if not values.get("ps_servers"):
        for key in ("ps_port", "ps_token_secret"):
            if values.get(key) is not None:
                raise ValueError(f"--{key.replace('_', '-')} {values[key]} has no effect without --ps-servers N; "
                                 "add it or drop the flag")


def _check_train_cmd(cmd: list[str]) -> None:
    """A `trainlib train` command's config, checked as far as it can be without the pods (the mesh
    and paths are checked again by `trainlib launch` in each pod, before torchrun starts)."""
    from trainlib.launchers.launch import train_args

    argv = train_args(cmd)
    if argv is None:
        return
    from trainlib.config import ConfigError
    from trainlib.trainer import config_from_argv

    try:
        config_from_argv(argv)
    except ConfigError as e:
        raise ValueError(f"the training command: {e}") from None


def _fill_from_instance(values: dict, it: InstanceType) -> None:
    """Accelerator and EFA counts from the table, for every key the user did not give."""
    if it.accelerator == "gpu" and "neuron_cores" not in values:
        values.setdefault("gpus_per_node", it.gpus)
    if it.accelerator == "neuron" and "gpus_per_node" not in values:
        values.setdefault("neuron_cores_per_device", it.neuron_cores_per_device)
        values.setdefault("neuron_cores", it.neuron_devices * values["neuron_cores_per_device"])
    values.setdefault("efa", it.efa)


def _check_fits(spec: JobSpec, it: InstanceType) -> None:
    asks = [("--gpus-per-node", spec.gpus_per_node, it.gpus, "GPUs"),
            ("--efa", spec.efa, it.efa, "EFA interfaces"),
            ("Neuron devices (--neuron-cores / --neuron-cores-per-device)", spec.neuron_devices, it.neuron_devices,
             "Neuron devices")]
    for flag, want, have, what in asks:
        if want > have:
            raise ValueError(f"{flag} asks for {want} {what} but {it.name} has {have}; lower it or pick another "
                             "--instance-type (a pod asking for more than its node has stays Pending forever)")


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity_bytes(q: str) -> int:
    """A Kubernetes memory quantity ("16Gi", "500M", "1073741824") in bytes."""
    for unit in sorted(_UNITS, key=len, reverse=True):
        if q.endswith(unit) and q[:-len(unit)].replace(".", "", 1).isdigit():
            return int(float(q[:-len(unit)]) * _UNITS[unit])
    if q.isdigit():
        return int(q)
    raise ValueError(f"cannot read the quantity {q!r}; use e.g. 16Gi or 512Mi")


def _check_shm_fits(spec: JobSpec) -> None:
    if spec.pod_memory and quantity_bytes(spec.pod_shm) >= quantity_bytes(spec.pod_memory):
        raise ValueError(f"/dev/shm {spec.pod_shm} >= pod memory {spec.pod_memory}: /dev/shm pages are charged to the "
                         "pod's memory limit, so the ranks would be OOM-killed (exit 137) once it fills; set "
                         "--shm-size below --memory (e.g. a quarter of it)")


def build(kind: str, spec: JobSpec) -> list[dict]:
    """All objects of the job, in apply order (Secret, Service, StatefulSet, PodGroup/LocalQueue,
    ClusterTrainingRuntime, job)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    spec = dataclasses.replace(spec, cmd=tuple(with_prometheus(list(spec.cmd), spec.prometheus_port)))
    if kind == "rayjob":
        return rayjob(spec)
    if kind == "raycluster":
        return raycluster(spec)
    if kind == "trainjob":
        return trainjob_objects(spec)
    env, volumes, mounts = None, None, None
    if spec.ps_servers:
        volume, mount = token_volume(spec)
        env, volumes, mounts = worker_env(spec), [volume], [mount]
        spec = dataclasses.replace(spec, cmd=tuple(with_ps_sync(list(spec.cmd))))
    job = (pytorchjob if kind == "pytorchjob" else mpijob)(spec, env, volumes, mounts)
    if spec.ps_servers:
        for tpl in replica_templates(job):
            tpl["spec"].setdefault("securityContext", {})["fsGroup"] = TOKEN_FS_GROUP
    _annotate_rank0(job, spec)
    extra = apply_gang(job, spec)
    return ps_objects(spec) + extra + [job]


def _annotate_rank0(job: dict, spec: JobSpec) -> None:
    """Scrape annotations where rank 0 runs: the Master pod, any Worker of an elastic job (the
    rendezvous decides), an MPIJob's Workers (the launcher runs no rank)."""
    specs = job["spec"].get("pytorchReplicaSpecs") or job["spec"].get("mpiReplicaSpecs")
    hosts = [specs["Master"]] if "Master" in specs else [specs["Worker"]]
    for r in hosts:
        annotate(r["template"], prometheus_annotations(spec))


def dump(docs: list[dict], as_json: bool = False) -> str:
    if not as_json:
        try:
            import yaml
        except ImportError:
            as_json = True  # JSON is YAML too; pip install 'trainlib[k8s]' for block-style YAML
        else:
            class NoAliases(yaml.SafeDumper):  # shared dicts would print as &id001 anchors; kubectl users expect plain YAML
                def ignore_aliases(self, data) -> bool:
                    return True

            return yaml.dump_all(docs, Dumper=NoAliases, sort_keys=False)
    return "\n---\n".join(json.dumps(d, indent=2) for d in docs) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        spec = spec_from_args(args, cmd)
        docs = build(args.kind, spec)
    except (ValueError, OSError, TypeError) as e:
        print(f"trainlib k8s: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    errs = check(docs)
    if errs:
        print("trainlib k8s: the manifest would be rejected:\n  " + "\n  ".join(errs), file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(dump(docs, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
