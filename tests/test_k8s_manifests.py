"""Every manifest variant validates against the real CRD schemas and the operators' webhook rules.

Schemas: tests/k8s-schemas/ (unmodified upstream CRDs vendored with their provenance, see its
README), or $TRAINLIB_K8S_SCHEMAS.
Each check is shown to be able to fail: a broken copy of a valid manifest must be rejected.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

from trainlib.launchers import k8s  # noqa: E402
from trainlib.launchers.k8s import build, main, parser, spec_from_args  # noqa: E402
from trainlib.launchers.webhooks import check_all  # noqa: E402

VENDORED = Path(__file__).resolve().parent / "k8s-schemas"
SCHEMAS = Path(os.environ.get("TRAINLIB_K8S_SCHEMAS") or VENDORED)
CRD_FILES = {("kubeflow.org", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
             ("kubeflow.org", "MPIJob"): "kubeflow.org_mpijobs.yaml",
             ("scheduling.volcano.sh", "PodGroup"): "scheduling.volcano.sh_podgroups.yaml",
             ("scheduling.x-k8s.io", "PodGroup"): "scheduling.x-k8s.io_podgroups.yaml",
             ("kueue.x-k8s.io", "LocalQueue"): "kueue.x-k8s.io_localqueues.yaml",
             ("ray.io", "RayJob"): "ray.io_rayjobs.yaml",
             ("ray.io", "RayCluster"): "ray.io_rayclusters.yaml",
             ("trainer.kubeflow.org", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
             ("trainer.kubeflow.org", "ClusterTrainingRuntime"): "trainer.kubeflow.org_clustertrainingruntimes.yaml"}
NO_CRD_KINDS = {"Secret", "Service", "StatefulSet"}  # core objects; checked by webhooks.check_all

needs_schemas = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"CRD schemas not found at {SCHEMAS} "
                                   "(TRAINLIB_K8S_SCHEMAS points at a missing folder; unset it to use tests/k8s-schemas)")


def test_vendored_schemas_are_unmodified():
    """Every CRD the tests use is vendored, and its bytes match the sha256 its README records."""
    table = (VENDORED / "README.md").read_text()
    recorded = dict(re.findall(r"^\| `([^`]+\.yaml)` \|.*\| ([0-9a-f]{64}) \|$", table, flags=re.M))
    assert set(recorded) == set(CRD_FILES.values()) == {p.name for p in VENDORED.glob("*.yaml")}
    for name, digest in recorded.items():
        assert hashlib.sha256((VENDORED / name).read_bytes()).hexdigest() == digest, name


@functools.lru_cache(maxsize=None)
def _schema(group: str, kind: str, version: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(SCHEMAS / CRD_FILES[(group, kind)]) as f:
        crd = yaml.load(f, Loader=loader)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{kind} CRD has no version {version}")


def schema_errors(doc: dict) -> list[str]:
    group, _, version = doc["apiVersion"].rpartition("/")
    if doc["kind"] in NO_CRD_KINDS:
        return []
    schema = _schema(group, doc["kind"], version)
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)(schema)
    # the API server sees JSON; round-trip so tuples and the like become what kubectl would send
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(json.loads(json.dumps(doc)))]


def manifest(*flags: str) -> list[dict]:
    argv = list(flags)
    cmd = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    return build(args.kind, spec_from_args(args, cmd))


BASE = ("--name", "gpt", "--image", "example.com/trainlib-gpu:0.1.0")
VARIANTS = {
    "cpu": ("pytorchjob", *BASE, "--nodes", "2"),
    "gpu-efa": ("pytorchjob", *BASE, "--nodes", "4", "--gpus-per-node", "8", "--efa", "32"),
    "neuron": ("pytorchjob", *BASE, "--nodes", "2", "--neuron-cores", "32", "--efa", "8"),
    "elastic": ("pytorchjob", *BASE, "--nodes", "3", "--elastic", "2:4", "--gpus-per-node", "8"),
    "volcano": ("pytorchjob", *BASE, "--nodes", "4", "--gpus-per-node", "8", "--gang", "volcano", "--queue", "train"),
    "coscheduling": ("pytorchjob", *BASE, "--nodes", "4", "--gang", "coscheduling"),
    "kueue": ("pytorchjob", *BASE, "--gang", "kueue", "--queue", "team-a", "--cluster-queue", "gpus"),
    "elastic-volcano": ("pytorchjob", *BASE, "--elastic", "2:4", "--gang", "volcano"),
    "ps": ("pytorchjob", *BASE, "--nodes", "2", "--ps-servers", "2", "--gang", "coscheduling"),
    "ps-existing-secret": ("pytorchjob", *BASE, "--ps-servers", "1", "--ps-token-secret", "mytoken"),
    "mpijob": ("mpijob", *BASE, "--nodes", "2", "--gpus-per-node", "8", "--efa", "32"),
    "mpijob-volcano": ("mpijob", *BASE, "--nodes", "2", "--gang", "volcano"),
    "mpijob-kueue": ("mpijob", *BASE, "--nodes", "2", "--gang", "kueue", "--queue", "q"),
    "p5-instance": ("pytorchjob", *BASE, "--nodes", "4", "--instance-type", "p5.48xlarge", "--gang", "volcano"),
    "trn2-instance": ("pytorchjob", *BASE, "--nodes", "2", "--instance-type", "trn2.48xlarge"),
    "trn1-zone": ("pytorchjob", *BASE, "--nodes", "2", "--instance-type", "trn1.32xlarge", "--zone", "us-east-1a"),
    "p4d-mpijob-instance": ("mpijob", *BASE, "--nodes", "2", "--instance-type", "p4d.24xlarge"),
    "g5-elastic-instance": ("pytorchjob", *BASE, "--elastic", "1:4", "--instance-type", "g5.12xlarge"),
    "cpu-instance": ("pytorchjob", *BASE, "--nodes", "2", "--instance-type", "m5.2xlarge"),
    "prometheus": ("pytorchjob", *BASE, "--nodes", "2", "--prometheus-port", "9100"),
    "mpijob-prometheus": ("mpijob", *BASE, "--nodes", "2", "--prometheus-port", "9100"),
    "ps-prometheus": ("pytorchjob", *BASE, "--nodes", "2", "--ps-servers", "2", "--prometheus-port", "9100"),
}


@needs_schemas
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_validates_against_crds_and_webhooks(variant):
    docs = manifest(*VARIANTS[variant], "--", "trainlib", "train", "--train.steps=10")
    for d in docs:
        assert schema_errors(d) == [], (variant, d["kind"])
    assert check_all(docs) == []
    assert {d["kind"] for d in docs} <= NO_CRD_KINDS | {k for _, k in CRD_FILES}


def test_pytorchjob_content():
    (job,) = manifest(*VARIANTS["gpu-efa"])
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
    assert job["spec"]["nprocPerNode"] == "8"
    c = specs["Worker"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch" and c["ports"][0]["name"] == "pytorchjob-port"
    assert c["command"] == ["trainlib", "launch", "--"] and c["args"] == ["trainlib", "train"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 and c["resources"]["limits"]["vpc.amazonaws.com/efa"] == 32
    assert c["resources"]["requests"]["hugepages-2Mi"] == c["resources"]["limits"]["hugepages-2Mi"]
    vol = specs["Worker"]["template"]["spec"]["volumes"][0]
    assert vol["emptyDir"]["medium"] == "Memory" and {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert specs["Master"]["restartPolicy"] == "ExitCode"
    (neuron,) = manifest(*VARIANTS["neuron"])
    nc = neuron["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert neuron["spec"]["nprocPerNode"] == "32" and nc["resources"]["limits"]["aws.amazon.com/neuron"] == 16


def test_gang_scheduling_objects():
    group, job = manifest(*VARIANTS["volcano"])
    assert group["kind"] == "PodGroup" and group["spec"] == {"minMember": 4, "queue": "train"}
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 4, "queue": "train"}
    for r in job["spec"]["pytorchReplicaSpecs"].values():
        assert r["template"]["spec"]["schedulerName"] == "volcano"
    group, job = manifest(*VARIANTS["elastic-volcano"])
    assert group["spec"]["minMember"] == 2 == job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"]
    assert "Master" not in job["spec"]["pytorchReplicaSpecs"] and job["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    group, job = manifest(*VARIANTS["coscheduling"])
    assert group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1" and group["spec"]["minMember"] == 4
    tpl = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    assert tpl["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "gpt"
    lq, job = manifest(*VARIANTS["kueue"])
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" == lq["metadata"]["name"]
    assert "schedulerName" not in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (mpi,) = manifest(*VARIANTS["mpijob-kueue"])
    assert mpi["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"


def test_parameter_server_objects():
    secret, svc, ss, group, job = manifest(*VARIANTS["ps"])
    assert [secret["kind"], svc["kind"], ss["kind"]] == ["Secret", "Service", "StatefulSet"]
    assert len(secret["stringData"]["token"]) == 64 and svc["spec"]["clusterIP"] == "None"
    server = ss["spec"]["template"]["spec"]["containers"][0]
    assert server["command"] == ["trainlib", "ps-server", "--bind", "0.0.0.0:5555"]
    env = {e["name"]: e["value"] for e in job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TRAINLIB_PS_ADDRS"] == "gpt-ps-0.gpt-ps:5555,gpt-ps-1.gpt-ps:5555"
    assert env["TRAINLIB_PS_TOKEN_FILE"] == "/var/run/trainlib-ps/token"
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert master["containers"][0]["args"] == ["trainlib", "train", "--sync.kind=ps"]  # the job uses the servers
    assert master["securityContext"]["fsGroup"] == 1000 == ss["spec"]["template"]["spec"]["securityContext"]["fsGroup"]
    # the names the parameter-server client and server read (no drift between manifest and backend)
    from trainlib.sync.ps.backend import ADDRS_ENV
    from trainlib.sync.ps.token import TOKEN_FILE_ENV

    assert {ADDRS_ENV, TOKEN_FILE_ENV} <= set(env) and server["env"][0]["name"] == TOKEN_FILE_ENV
    assert "annotations" not in ss["spec"]["template"]["metadata"]


def test_parameter_servers_are_scraped_with_a_prometheus_port():
    secret, svc, ss, job = manifest(*VARIANTS["ps-prometheus"])
    pod = ss["spec"]["template"]
    server = pod["spec"]["containers"][0]
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9100",
                                              "prometheus.io/path": "/metrics"}
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in server["ports"]
    assert server["command"] == ["trainlib", "ps-server", "--bind", "0.0.0.0:5555", "--metrics", "0.0.0.0:9100"]
    svc2, ss2, job2 = manifest(*VARIANTS["ps-existing-secret"])
    assert ss2["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] == "mytoken"


@needs_schemas
def test_checks_reject_broken_manifests():
    """The schema and the webhook checks are not vacuous: each broken copy is rejected."""
    (job,) = manifest(*VARIANTS["gpu-efa"])
    bad = copy.deepcopy(job)
    bad["spec"]["nprocPerNode"] = 8  # an int: the CRD says string
    assert any("nprocPerNode" in e for e in schema_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "23456"
    assert any("containerPort" in e for e in schema_errors(bad))
    bad = copy.deepcopy(job)
    del bad["spec"]["pytorchReplicaSpecs"]
    assert any("pytorchReplicaSpecs" in e for e in schema_errors(bad))
    cases = [
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2), "Master.replicas must be 1"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0].update(name="main"),
         "no container named 'pytorch'"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].update(ports=[]),
         "pytorchjob-port"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=j["spec"]["pytorchReplicaSpecs"]["Worker"]), "Master or Worker"),
        (lambda j: j["spec"].update(elasticPolicy={"nProcPerNode": 8}), "nProcPerNode"),
        (lambda j: j["metadata"].update(name="GPT_job"), "DNS-1035"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"]["requests"]
         .pop("memory"), "huge pages need a cpu or memory request"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"]["requests"]
         .update({"hugepages-2Mi": "2Mi"}), "hugepages-2Mi requests"),
    ]
    for mutate, needle in cases:
        bad = copy.deepcopy(job)
        mutate(bad)
        errs = check_all([bad])
        assert any(needle in e for e in errs), (needle, errs)
    (elastic,) = manifest(*VARIANTS["elastic"])
    bad = copy.deepcopy(elastic)
    bad["spec"]["pytorchReplicaSpecs"] = {"Master": elastic["spec"]["pytorchReplicaSpecs"]["Worker"] | {"replicas": 1}}
    assert any("no Worker replica spec" in e for e in check_all([bad]))
    (mpi,) = manifest(*VARIANTS["mpijob"])
    for mutate, needle in [
        (lambda j: j["spec"]["mpiReplicaSpecs"]["Worker"].update(restartPolicy="ExitCode"), "Never or OnFailure"),
        (lambda j: j["spec"]["mpiReplicaSpecs"]["Launcher"].update(replicas=2), "Launcher.replicas must be 1"),
        (lambda j: j["spec"]["mpiReplicaSpecs"].pop("Launcher"), "Launcher is required"),
        (lambda j: j["metadata"].update(name="x" * 60), "DNS-1123"),
    ]:
        bad = copy.deepcopy(mpi)
        mutate(bad)
        assert any(needle in e for e in check_all([bad])), needle
    bad = copy.deepcopy(mpi)
    bad["spec"]["mpiImplementation"] = "MVAPICH"
    assert schema_errors(bad)


def test_cli_yaml_from_config_and_errors(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[k8s]\nname = "gpt"\nimage = "repo/trainlib:1"\nnodes = 3\ngpus_per_node = 4\n\n'
                   '[train]\nsteps = 50\nlr = 0.001\n\n[mesh]\ntp = 2\n')
    assert main(["pytorchjob", "--from-config", str(cfg), "--nodes", "2"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    job = docs[-1]
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1           # the flag beat the file
    args = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["trainlib", "train", "--train.steps=50", "--train.lr=0.001", "--mesh.tp=2"]
    assert main(["mpijob", *BASE, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "MPIJob"
    for argv, needle in [
        (["pytorchjob", "--image", "x"], "--name is required"),
        (["pytorchjob", *BASE, "--elastic", "3:2"], "MIN:MAX"),
        (["pytorchjob", *BASE, "--neuron-cores", "3"], "not a multiple"),
        (["mpijob", *BASE, "--elastic", "1:2"], "fixed size"),
        (["pytorchjob", *BASE, "--gang", "kueue"], "needs --queue"),
        (["pytorchjob", "--name", "Bad_Name", "--image", "x"], "DNS-1035"),
    ]:
        assert main(argv) == 1, argv
        assert needle in capsys.readouterr().err, needle
    assert k8s.dump([{"a": [1]}], as_json=False).strip() in ("a:\n- 1", '{\n  "a": [\n    1\n  ]\n}')
