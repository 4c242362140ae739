"""RayJob, RayCluster, TrainJob and ClusterTrainingRuntime manifests (issue 15 items 3-4; issue 20's
scrape annotations), checked against the vendored upstream CRDs (KubeRay v1.7.0, Trainer v2.3.0),
the operators' admission rules (launchers/admission.py), Kubernetes' own Pod schema and checkov.

References: the CRD schemas; the PyTorchJob generator's pods for the same flags (the Ray and
TrainJob pods must ask for the same resources, /dev/shm, EFA, Neuron and placement); the KubeRay
and Trainer sources the docstrings of launchers/rayjob.py and launchers/trainjob.py cite.
Every check is shown to fail on a broken copy.
"""
from __future__ import annotations

import copy
import json
import shlex
import urllib.request

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("jsonschema")

from trainlib.launchers import admission  # noqa: E402
from trainlib.launchers.k8s import build, main  # noqa: E402
from trainlib.launchers.manifests import PROMETHEUS_PATH  # noqa: E402

from tests.test_k8s_manifests import BASE, _schema, manifest, needs_schemas, schema_errors  # noqa: E402

TRAIN = ("--", "trainlib", "train", "--train.steps=10")
NEW_VARIANTS = {
    "rayjob-cpu": ("rayjob", *BASE, "--nodes", "2"),
    "rayjob-p5-efa": ("rayjob", *BASE, "--nodes", "4", "--instance-type", "p5.48xlarge"),
    "rayjob-trn1-neuron": ("rayjob", *BASE, "--nodes", "2", "--instance-type", "trn1.32xlarge", "--zone", "us-east-1a"),
    "rayjob-gpu-volcano": ("rayjob", *BASE, "--nodes", "2", "--gpus-per-node", "8", "--gang", "volcano", "--queue", "q"),
    "rayjob-coscheduling": ("rayjob", *BASE, "--nodes", "2", "--gang", "coscheduling"),
    "rayjob-kueue": ("rayjob", *BASE, "--gang", "kueue", "--queue", "team-a", "--cluster-queue", "gpus"),
    "rayjob-fault-tolerant": ("rayjob", *BASE, "--nodes", "2", "--max-failures", "2", "--checkpoint-dir", "s3://b/gpt",
                              "--ttl-seconds", "60", "--max-restarts", "1", "--prometheus-port", "9100"),
    "raycluster-cpu": ("raycluster", *BASE, "--nodes", "2"),
    "raycluster-p5-kueue": ("raycluster", *BASE, "--nodes", "2", "--instance-type", "p5.48xlarge", "--gang", "kueue",
                            "--queue", "q"),
    "trainjob-cpu": ("trainjob", *BASE, "--nodes", "2"),
    "trainjob-p5-efa": ("trainjob", *BASE, "--nodes", "4", "--instance-type", "p5.48xlarge", "--prometheus-port", "9100"),
    "trainjob-trn1-neuron": ("trainjob", *BASE, "--nodes", "2", "--instance-type", "trn1.32xlarge"),
    "trainjob-kueue": ("trainjob", *BASE, "--gang", "kueue", "--queue", "team-a", "--cluster-queue", "gpus"),
    "trainjob-runtime-cpu": ("trainjob", *BASE, "--nodes", "2", "--with-runtime"),
    "trainjob-runtime-p5-volcano": ("trainjob", *BASE, "--nodes", "4", "--instance-type", "p5.48xlarge", "--with-runtime",
                                    "--gang", "volcano", "--queue", "training", "--prometheus-port", "9100"),
    "trainjob-runtime-trn2-coscheduling": ("trainjob", *BASE, "--nodes", "2", "--instance-type", "trn2.48xlarge",
                                           "--with-runtime", "--gang", "coscheduling", "--runtime", "trainlib-trn2"),
    "trainjob-runtime-efa-kueue": ("trainjob", *BASE, "--nodes", "2", "--gpus-per-node", "8", "--efa", "32",
                                   "--with-runtime", "--gang", "kueue", "--queue", "q"),
}
KINDS = {"RayJob", "RayCluster", "TrainJob", "ClusterTrainingRuntime", "LocalQueue"}


def unknown_fields(doc, schema: dict, path: str = "") -> list[str]:
    """Keys the API server would prune without a word: CRD schemas rarely forbid unknown properties,
    so plain JSON Schema validation accepts a misspelt or misplaced field."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(doc, dict):
        props = schema.get("properties")
        if props is not None:
            for k, v in doc.items():
                out += [f"{path}.{k}"] if k not in props else unknown_fields(v, props[k], f"{path}.{k}")
        elif isinstance(schema.get("additionalProperties"), dict):
            for k, v in doc.items():
                out += unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(doc):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def strict_errors(doc: dict) -> list[str]:
    group, _, version = doc["apiVersion"].rpartition("/")
    return schema_errors(doc) + unknown_fields(json.loads(json.dumps(doc)), _schema(group, doc["kind"], version))


def docs_of(variant: str) -> list[dict]:
    return manifest(*NEW_VARIANTS[variant], *(() if variant.startswith("raycluster") else TRAIN))


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def pytorchjob_pod(*flags: str) -> dict:
    """The PyTorchJob generator's pod for the same sizing flags: the reference for resources and placement."""
    job = one(manifest("pytorchjob", *flags), "PyTorchJob")
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]


@needs_schemas
@pytest.mark.parametrize("variant", sorted(NEW_VARIANTS))
def test_variant_validates_against_crds_and_admission(variant):
    docs = docs_of(variant)
    assert {d["kind"] for d in docs} <= KINDS
    for d in docs:
        assert strict_errors(d) == [], (variant, d["kind"])
    assert admission.check(docs) == []


@needs_schemas
def test_no_field_of_the_older_generators_would_be_pruned():
    """The PyTorchJob/MPIJob/PodGroup/LocalQueue variants of test_k8s_manifests, held to the same rule."""
    from tests.test_k8s_manifests import CRD_FILES, VARIANTS

    crd_kinds = {k for _, k in CRD_FILES}
    for variant, flags in sorted(VARIANTS.items()):
        for d in manifest(*flags):
            if d["kind"] in crd_kinds:
                assert strict_errors(d) == [], (variant, d["kind"])


def test_rayjob_pods_match_the_pytorchjob_and_entrypoint():
    for variant, (nodes, workers, per_worker) in {
            "rayjob-p5-efa": (4, 32, {"CPU": 21, "GPU": 1}),       # 8 GPUs per pod; 172 requested CPUs / 8
            "rayjob-trn1-neuron": (2, 64, {"neuron_cores": 1}),   # 32 NeuronCores per pod
            "rayjob-cpu": (2, 2, {"CPU": 1})}.items():
        job = one(docs_of(variant), "RayJob")
        sizing = NEW_VARIANTS[variant][1:]
        ref = pytorchjob_pod(*sizing)
        group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == nodes
        worker = group["template"]
        w, r = worker["spec"]["containers"][0], ref["spec"]["containers"][0]
        assert "command" not in w     # KubeRay's `ray start` wrapper is the command
        assert w.get("resources") == r.get("resources") and w["volumeMounts"] == r["volumeMounts"]
        assert worker["spec"]["volumes"] == ref["spec"]["volumes"]
        assert worker["spec"].get("nodeSelector") == ref["spec"].get("nodeSelector")
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:5] == ["python", "-m", "trainlib.launchers.ray_main", "--num-workers", str(workers)]
        i = argv.index("--resources-per-worker")
        assert json.loads(argv[i + 1]) == per_worker and argv[i + 2:] == ["--", "--train.steps=10"]
        _parses_with_ray_main(argv, workers)
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
        assert head["rayStartParams"] == {"num-cpus": "0"}
        assert not set(head["template"]["spec"]["containers"][0]["resources"]["limits"]) - {"memory"}
        assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] == 600
    efa = one(docs_of("rayjob-p5-efa"), "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    term = efa["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["labelSelector"]["matchLabels"] == {"trainlib/job": "gpt", "ray.io/node-type": "worker"}
    neuron = one(docs_of("rayjob-trn1-neuron"), "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert neuron["resources"] == {"neuron_cores": "32"}
    env = {e["name"]: e["value"] for e in neuron["template"]["spec"]["containers"][0]["env"]}
    # what `trainlib launch` sets on a trn1 node with EFA (launchers/profiles.py), since none runs here
    assert env["FI_PROVIDER"] == "efa" and env["MALLOC_ARENA_MAX"] == "64" and env["TRAINLIB_INSTANCE_TYPE"] == "trn1.32xlarge"
    ft = one(docs_of("rayjob-fault-tolerant"), "RayJob")
    argv = shlex.split(ft["spec"]["entrypoint"])
    args = _parses_with_ray_main(argv, 2)
    assert (args.max_failures, args.checkpoint_dir) == (2, "s3://b/gpt")
    assert argv[argv.index("--max-failures") + 1] == "2" and argv[argv.index("--checkpoint-dir") + 1] == "s3://b/gpt"
    assert ft["spec"]["ttlSecondsAfterFinished"] == 60 and ft["spec"]["backoffLimit"] == 1


def _parses_with_ray_main(argv: list[str], workers: int):
    """The entrypoint is what the driver module accepts: its own parser and its check of the train flags."""
    from trainlib.launchers import ray_main

    i = argv.index("--")
    args = ray_main.parser().parse_args(argv[3:i])
    assert args.num_workers == workers
    ray_main.config_from_flags(argv[i + 1:])   # raises on a flag trainlib's config does not know
    return args


def test_ray_gang_labels():
    lq, job = docs_of("rayjob-kueue")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" == lq["metadata"]["name"]
    assert lq["spec"] == {"clusterQueue": "gpus"}
    (job,) = docs_of("rayjob-gpu-volcano")
    assert job["metadata"]["labels"]["volcano.sh/queue-name"] == "q"
    (job,) = docs_of("rayjob-coscheduling")
    assert job["metadata"]["labels"]["ray.io/gang-scheduling-enabled"] == "true"
    (cluster,) = [d for d in docs_of("raycluster-p5-kueue")]
    assert cluster["kind"] == "RayCluster" and "entrypoint" not in cluster["spec"]
    assert cluster["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"


def test_trainjob_and_runtime_content():
    job = one(docs_of("trainjob-p5-efa"), "TrainJob")
    ref = pytorchjob_pod(*NEW_VARIANTS["trainjob-p5-efa"][1:-2])
    t, r = job["spec"]["trainer"], ref["spec"]["containers"][0]
    assert job["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime"}
    assert (t["numNodes"], t["numProcPerNode"]) == (4, 8) and t["resourcesPerNode"] == r["resources"]
    assert t["command"] == ["trainlib", "launch", "--"] and t["args"][:2] == ["trainlib", "train"]
    assert not [e for e in t.get("env", []) if e["name"].startswith("PET_")]
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = pod["template"]["spec"]["template"]
    assert pod["spec"]["volumes"] == ref["spec"]["volumes"] and pod["spec"]["affinity"] == ref["spec"]["affinity"]
    assert pod["metadata"]["labels"]["trainlib/job"] == "gpt"   # what that affinity selects
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    rt, job = [one(docs_of("trainjob-runtime-p5-volcano"), k) for k in ("ClusterTrainingRuntime", "TrainJob")]
    assert job["spec"]["runtimeRef"]["name"] == rt["metadata"]["name"] == "trainlib-gpt" and "runtimePatches" not in job["spec"]
    assert "namespace" not in rt["metadata"]                     # cluster-scoped
    assert rt["spec"]["podGroupPolicy"] == {"volcano": {}} and rt["spec"]["mlPolicy"] == {"numNodes": 4, "torch": {}}
    assert rt["spec"]["template"]["metadata"]["annotations"]["scheduling.volcano.sh/queue-name"] == "training"
    (rjob,) = rt["spec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    tpl = rjob["template"]["spec"]["template"]
    assert tpl["spec"]["schedulerName"] == "volcano" and tpl["spec"]["containers"][0]["name"] == "node"
    assert tpl["spec"]["containers"][0]["resources"] == r["resources"]
    # exit 1 (configuration error) fails for good; anything else restarts the JobSet
    assert rjob["template"]["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [1]
    assert rt["spec"]["template"]["spec"]["failurePolicy"]["rules"][0]["onJobFailureReasons"] == ["PodFailurePolicy"]
    rt = one(docs_of("trainjob-runtime-trn2-coscheduling"), "ClusterTrainingRuntime")
    assert rt["metadata"]["name"] == "trainlib-trn2" and rt["spec"]["podGroupPolicy"]["coscheduling"]
    c = rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["aws.amazon.com/neuron"] == 16
    assert one(docs_of("trainjob-runtime-trn2-coscheduling"), "TrainJob")["spec"]["trainer"]["numProcPerNode"] == 64


def test_prometheus_annotations_and_endpoint():
    """Annotations only where rank 0 runs, the port and path the trainer really serves."""
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.parser import text_string_to_metric_families

    from trainlib.launchers.launch import train_args
    from trainlib.observe.prometheus import MetricsServer, parse_address
    from trainlib.trainer import config_from_argv

    (job,) = manifest("pytorchjob", *BASE, "--nodes", "3", "--prometheus-port", "9100")
    specs = job["spec"]["pytorchReplicaSpecs"]
    master = specs["Master"]["template"]
    assert master["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9100",
                                                 "prometheus.io/path": PROMETHEUS_PATH}
    assert "annotations" not in specs["Worker"]["template"]["metadata"]
    (elastic,) = manifest("pytorchjob", *BASE, "--elastic", "1:3", "--prometheus-port", "9100")
    assert elastic["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["annotations"]
    (mpi,) = manifest("mpijob", *BASE, "--prometheus-port", "9100")
    assert "annotations" in mpi["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["metadata"]
    assert "annotations" not in mpi["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["metadata"]
    ray = one(docs_of("rayjob-fault-tolerant"), "RayJob")["spec"]["rayClusterSpec"]
    assert "annotations" in ray["workerGroupSpecs"][0]["template"]["metadata"]
    assert "annotations" not in ray["headGroupSpec"]["template"]["metadata"]
    assert shlex.split(one(docs_of("rayjob-fault-tolerant"), "RayJob")["spec"]["entrypoint"])[-1] == \
        "--observe.prometheus=0.0.0.0:9100"
    # the training command's own config reads back a bind-all endpoint on the annotated port
    args = master["spec"]["containers"][0]["args"]
    cfg = config_from_argv(train_args(args))
    host, port = parse_address(cfg.observe.prometheus, "--observe.prometheus")
    assert (host, str(port)) == ("0.0.0.0", master["metadata"]["annotations"]["prometheus.io/port"])

    class One:
        def collect(self):
            yield GaugeMetricFamily("trainlib_probe", "probe", value=1.0)

    server = MetricsServer(One(), "127.0.0.1", 0)   # the same server on loopback: the annotated path answers
    try:
        with urllib.request.urlopen(f"http://{server.address}{PROMETHEUS_PATH}", timeout=10) as r:
            names = {f.name for f in text_string_to_metric_families(r.read().decode())}
    finally:
        server.close()
    assert "trainlib_probe" in names


@needs_schemas
def test_checks_reject_broken_manifests():
    rt, job = [one(docs_of("trainjob-runtime-p5-volcano"), k) for k in ("ClusterTrainingRuntime", "TrainJob")]
    (ray,) = docs_of("rayjob-cpu")
    patched = one(docs_of("trainjob-p5-efa"), "TrainJob")
    kueue_ray = one(docs_of("rayjob-kueue"), "RayJob")
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["numProcPerNode"] = "8"               # an int in v2.3 (a string was v2.0's IntOrString)
    assert any("numProcPerNode" in e for e in strict_errors(bad))
    bad = copy.deepcopy(rt)
    bad["spec"]["mlPolicy"]["torch"]["numProcPerNode"] = 8       # not in the torch policy: pruned silently
    assert ".spec.mlPolicy.torch.numProcPerNode" in strict_errors(bad)
    bad = copy.deepcopy(ray)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2   # misspelt
    assert any(e.endswith(".replica") for e in strict_errors(bad))
    bad = copy.deepcopy(ray)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizelimit"] = "1Gi"
    assert any(e.endswith("emptyDir.sizelimit") for e in strict_errors(bad))   # deep inside the pod template
    bad = copy.deepcopy(ray)
    del bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in strict_errors(bad))
    cases = [
        (job, lambda d: d["metadata"].update(name="g" * 60), "hostname"),
        (patched, lambda d: d["spec"]["runtimePatches"][0].update(manager="trainlib"), "domain-prefixed path"),
        (patched, lambda d: d["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
         ["template"]["spec"]["template"]["spec"]["containers"][0].update(env=[{"name": "A", "value": "1"}]),
         "no env on the node container"),
        (job, lambda d: d["spec"]["trainer"].setdefault("env", []).append({"name": "PET_NNODES", "value": "2"}),
         "PET_NNODES"),
        (rt, lambda d: d["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
         ["containers"][0].update(name="main"), "container named 'node'"),
        (rt, lambda d: d["spec"]["template"]["spec"]["replicatedJobs"][0].update(replicas=2), "replicas 1"),
        (rt, lambda d: d["spec"].update(podGroupPolicy={"volcano": {}, "coscheduling": {}}), "only one"),
        (ray, lambda d: d["metadata"].update(name="r" * 48), "at most 47"),
        (kueue_ray, lambda d: d["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=True), "no autoscaling"),
        (kueue_ray, lambda d: d["spec"].update(shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0),
         "RayJob for Kueue: shutdownAfterJobFinishes"),
        (kueue_ray, lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(groupName="head"),
         "none named 'head'"),
        (ray, lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "ttlSecondsAfterFinished needs"),
        (ray, lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=3), "need 0 <= min <= max"),
        (ray, lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].update(resources={"cpu": "1"}), "accepts only one"),
        (ray, lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
         ["volumeMounts"].append({"name": "data", "mountPath": "/data"}), "undefined volume"),
    ]
    for doc, mutate, needle in cases:
        bad = copy.deepcopy(doc)
        mutate(bad)
        errs = admission.check([bad])
        assert any(needle in e for e in errs), (needle, errs)


def test_cli_errors(capsys):
    assert main(["trainjob", *BASE, "--with-runtime", "--json"]) == 0
    assert [json.loads(d)["kind"] for d in capsys.readouterr().out.split("\n---\n")] == ["ClusterTrainingRuntime", "TrainJob"]
    for argv, needle in [
        (["rayjob", *BASE, "--max-failures", "2"], "--checkpoint-dir"),
        (["rayjob", *BASE, "--with-runtime"], "--with-runtime is for trainjob"),
        (["trainjob", *BASE, "--max-failures", "1", "--checkpoint-dir", "/x"], "--max-failures is for rayjob"),
        (["trainjob", *BASE, "--gang", "volcano"], "add --with-runtime"),
        (["rayjob", *BASE, "--", "python", "train.py"], "trainlib.launchers.ray_main"),
        (["pytorchjob", *BASE, "--prometheus-port", "9100", "--", "python", "train.py"], "needs a `trainlib train`"),
        (["pytorchjob", *BASE, "--prometheus-port", "70000"], "1..65535"),
        (["raycluster", *BASE, "--elastic", "1:2"], "--elastic is for pytorchjob"),
        (["rayjob", *BASE, "--ps-servers", "1"], "--ps-servers is for"),
        (["raycluster", *BASE, "--", "trainlib", "train"], "a RayCluster runs no job"),
        (["raycluster", *BASE, "--prometheus-port", "9100"], "--prometheus-port is for"),
    ]:
        assert main(argv) == 1, argv
        assert needle in capsys.readouterr().err, needle
    with pytest.raises(ValueError, match="unknown kind"):
        build("tfjob", None)


def pods(docs: list[dict]) -> list[dict]:
    """The Pods the operators create from each object's templates (KubeRay: head and workers; Trainer:
    the runtime's node template, or the stock runtime's pod patched as the TrainJob says)."""
    out = []

    def pod(name: str, tpl: dict, ns: str, restart: str) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {**tpl.get("metadata", {}), "name": name, "namespace": ns},
                "spec": {**tpl["spec"], "restartPolicy": tpl["spec"].get("restartPolicy", restart)}}

    job_ns = next((d["metadata"].get("namespace") for d in docs if d["kind"] == "TrainJob"), None)
    for d in docs:
        # a ClusterTrainingRuntime is cluster-scoped: its pods live in the TrainJob's namespace
        ns, name = d["metadata"].get("namespace") or job_ns or "default", d["metadata"]["name"]
        if d["kind"] in ("RayJob", "RayCluster"):
            cs = d["spec"].get("rayClusterSpec", d["spec"])
            out.append(pod(f"{name}-head", cs["headGroupSpec"]["template"], ns, "Always"))
            out += [pod(f"{name}-{g['groupName']}-0", g["template"], ns, "Always") for g in cs["workerGroupSpecs"]]
        elif d["kind"] == "ClusterTrainingRuntime":
            for rj in d["spec"]["template"]["spec"]["replicatedJobs"]:
                out.append(pod(f"{name}-{rj['name']}-0-0", rj["template"]["spec"]["template"], ns, "Never"))
        elif d["kind"] == "TrainJob" and "runtimePatches" in d["spec"]:
            t = d["spec"]["trainer"]
            (rj,) = d["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
            tpl = copy.deepcopy(rj["template"]["spec"]["template"])
            c = tpl["spec"]["containers"][0]
            c.update(image=t["image"], command=t["command"], args=t["args"], env=t.get("env", []),
                     resources=t.get("resourcesPerNode", {}))
            out.append(pod(f"{name}-node-0-0", tpl, ns, "Never"))
    return out


def test_pods_validate_against_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]' (kubernetes-validate)")
    from tests.test_static_checks import K8S_VERSIONS

    n = 0
    for variant in sorted(NEW_VARIANTS):
        for p in pods(manifest(*NEW_VARIANTS[variant], "--namespace", "training")):
            for version in K8S_VERSIONS:
                kv.validate(json.loads(json.dumps(p)), version, strict=True)
            n += 1
    assert n >= len(NEW_VARIANTS)
    bad = pods(docs_of("rayjob-p5-efa"))[1]
    bad["spec"]["containers"][0]["resources"]["requests"]["cpu"] = {"n": 1}   # not a quantity
    with pytest.raises(kv.ValidationError):
        kv.validate(json.loads(json.dumps(bad)), K8S_VERSIONS[0], strict=True)


def test_checkov_on_ray_and_trainjob_pods(tmp_path):
    from tests import test_static_checks as sc

    checkov = sc.find_checkov()
    for variant in sorted(NEW_VARIANTS):
        docs = manifest(*NEW_VARIANTS[variant], "--namespace", "training")
        (tmp_path / f"{variant}.yaml").write_text(yaml.safe_dump_all(json.loads(json.dumps(pods(docs))), sort_keys=False))
    (tmp_path / "known-bad.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
         "spec": {"hostNetwork": True, "containers": [{"name": "c", "image": "x:latest",
                                                      "securityContext": {"privileged": True}}]}}))
    reports = sc._checkov(checkov, tmp_path)
    failed = sc._failed(reports)
    assert {"CKV_K8S_16", "CKV_K8S_19"} <= {c for c, _, res in failed if res.endswith(".x")}
    unexpected = sorted({(c, k, res) for c, k, res in failed if not res.endswith(".x")
                         and k not in sc.CHECKOV_ACCEPTED.get(c, (set(), ""))[0]
                         and not (c in STOCK_RUNTIME_ACCEPTED and "-runtime-" not in res and "trainjob" in res)})
    assert unexpected == [], f"checkov findings outside the accepted list: {unexpected}"
    # the finding accepted for the stock runtime is real there, and gone with our own runtime
    assert any(c == "CKV_K8S_38" and "trainjob-cpu" in res for c, _, res in failed)


# check -> why it is accepted for a TrainJob on Trainer's stock torch-distributed runtime only
STOCK_RUNTIME_ACCEPTED = {
    "CKV_K8S_38": "the stock runtime mounts the service-account token and a runtime patch cannot turn that off "
                  "(automountServiceAccountToken is not a patchable field); --with-runtime sets it false",
}
