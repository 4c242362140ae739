"""`trainlib k8s --instance-type`: the instance table fills resources, memory, /dev/shm and placement.

References: the instance facts cited in launchers/instances.py (AWS instance pages, Neuron docs)
and the sizing rule written there (pod memory = 90% of host, /dev/shm = 25% of pod memory,
cpu = 90% of vCPUs), recomputed here from the raw numbers.
"""
from __future__ import annotations

import pytest

from trainlib.launchers.devices import Devices
from trainlib.launchers.instances import TABLE, lookup
from trainlib.launchers.k8s import main, quantity_bytes
from trainlib.launchers.profiles import select_profile

from tests.test_k8s_manifests import BASE, manifest

GI = 2**30


def _pod(job: dict, rtype: str = "Master") -> tuple[dict, dict]:
    specs = job["spec"].get("pytorchReplicaSpecs") or job["spec"]["mpiReplicaSpecs"]
    tpl = specs[rtype]["template"]["spec"]
    return tpl, tpl["containers"][0]


@pytest.mark.parametrize("name,gpus,devices,cores,efa,mem_gib", [
    ("p4d.24xlarge", 8, 0, 0, 4, 1152),
    ("p5.48xlarge", 8, 0, 0, 32, 2048),
    ("p5e.48xlarge", 8, 0, 0, 32, 2048),
    ("p5en.48xlarge", 8, 0, 0, 16, 2048),
    ("g5.48xlarge", 8, 0, 0, 1, 768),
    ("g6.48xlarge", 8, 0, 0, 1, 768),
    ("trn1.32xlarge", 0, 16, 32, 8, 512),
    ("trn1n.32xlarge", 0, 16, 32, 16, 512),
    ("trn2.48xlarge", 0, 16, 64, 16, 2048),     # 16 Trainium2 x 8 physical cores, LNC=2 -> 4 logical each
    ("trn1.2xlarge", 0, 1, 2, 0, 32),
])
def test_table_facts(name, gpus, devices, cores, efa, mem_gib):
    it = lookup(name)
    assert (it.gpus, it.neuron_devices, it.neuron_cores, it.efa, it.memory_gib) == (gpus, devices, cores, efa, mem_gib)


def test_p5_job_is_sized_to_the_host():
    (group, job) = manifest("pytorchjob", *BASE, "--nodes", "4", "--instance-type", "p5.48xlarge", "--gang", "volcano")
    pod, c = _pod(job, "Worker")
    res = c["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 8 and res["limits"]["vpc.amazonaws.com/efa"] == 32
    assert job["spec"]["nprocPerNode"] == "8"
    mem = int(2048 * 0.9)
    assert res["limits"]["memory"] == res["requests"]["memory"] == f"{mem}Gi"
    assert res["requests"]["cpu"] == str(int(192 * 0.9)) and "cpu" not in res["limits"]
    assert res["requests"]["hugepages-2Mi"] == res["limits"]["hugepages-2Mi"] == "5120Mi"
    shm = pod["volumes"][0]["emptyDir"]["sizeLimit"]
    assert shm == f"{int(mem * 0.25)}Gi"
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    term = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term == {"labelSelector": {"matchLabels": {"trainlib/job": "gpt"}}, "topologyKey": "topology.kubernetes.io/zone"}
    assert pod["automountServiceAccountToken"] is False
    assert {"name": "TRAINLIB_INSTANCE_TYPE", "value": "p5.48xlarge"} in c["env"]


def test_dev_shm_always_fits_inside_the_memory_limit():
    """The issue-18 failure: /dev/shm (charged to the pod) as large as the pod's whole memory limit."""
    for name in sorted(TABLE):
        for kind in ("pytorchjob", "mpijob"):
            *_, job = manifest(kind, *BASE, "--instance-type", name)
            rtype = "Worker"
            pod, c = _pod(job, rtype)
            limit = c["resources"]["limits"]["memory"]
            shm = pod["volumes"][0]["emptyDir"]["sizeLimit"]
            assert quantity_bytes(shm) < quantity_bytes(limit) <= lookup(name).memory_gib * GI, (name, shm, limit)
    # without an instance type an EFA pod requests memory but sets no limit for /dev/shm to exhaust
    (job,) = manifest("pytorchjob", *BASE, "--gpus-per-node", "8", "--efa", "32")
    _, c = _pod(job)
    assert "memory" not in c["resources"]["limits"] and c["resources"]["requests"]["memory"]


def test_trn2_neuron_cores_and_zone():
    (job,) = manifest("pytorchjob", *BASE, "--nodes", "2", "--instance-type", "trn2.48xlarge", "--zone", "us-west-2d")
    pod, c = _pod(job)
    assert c["resources"]["limits"]["aws.amazon.com/neuron"] == 16 and job["spec"]["nprocPerNode"] == "64"
    assert {"name": "TRAINLIB_NEURON_CORES_PER_DEVICE", "value": "4"} in c["env"]
    assert c["resources"]["limits"]["vpc.amazonaws.com/efa"] == 16
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "trn2.48xlarge",
                                   "topology.kubernetes.io/zone": "us-west-2d"}
    assert "affinity" not in pod          # the zone is pinned, no affinity needed


def test_explicit_flags_override_the_table():
    (job,) = manifest("pytorchjob", *BASE, "--instance-type", "p5.48xlarge", "--gpus-per-node", "4", "--efa", "16",
                      "--memory", "900Gi", "--shm-size", "100Gi", "--cpu", "90")
    pod, c = _pod(job)
    res = c["resources"]
    assert (res["limits"]["nvidia.com/gpu"], res["limits"]["vpc.amazonaws.com/efa"]) == (4, 16)
    assert res["limits"]["memory"] == "900Gi" and res["requests"]["cpu"] == "90"
    assert pod["volumes"][0]["emptyDir"]["sizeLimit"] == "100Gi" and job["spec"]["nprocPerNode"] == "4"


@pytest.mark.parametrize("argv,needles", [
    (["--instance-type", "p5.48xlarge", "--gpus-per-node", "9"], ["asks for 9 GPUs but p5.48xlarge has 8"]),
    (["--instance-type", "p5en.48xlarge", "--efa", "32"], ["asks for 32 EFA interfaces but p5en.48xlarge has 16"]),
    (["--neuron-cores", "64"], ["32 Neuron devices", "more than 16", "--neuron-cores-per-device 4"]),
    (["--instance-type", "trn1.32xlarge", "--neuron-cores", "64"], ["asks for 32 Neuron devices but trn1.32xlarge has 16"]),
    (["--instance-type", "p9.huge"], ["unknown instance type 'p9.huge'", "p5.48xlarge"]),
    (["--memory", "16Gi"], ["/dev/shm 16Gi >= pod memory 16Gi", "--shm-size"]),
])
def test_impossible_requests_exit_1_naming_the_fix(capsys, argv, needles):
    assert main(["pytorchjob", *BASE, *argv]) == 1
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, (n, err)


def test_cleanup_policy_deletes_running_pods():
    """cleanPodPolicy None left a hung rank holding its GPUs after the job failed."""
    from tests.test_k8s_manifests import VARIANTS

    for variant, argv in VARIANTS.items():
        job = manifest(*argv)[-1]
        assert job["spec"]["runPolicy"]["cleanPodPolicy"] in ("Running", "All"), variant


def test_launch_profiles_use_the_same_table():
    """g5/g6 have no GPUDirect RDMA over EFA, p4d/p5 do: the 1.6.x plugin variable follows the table."""
    old = {"TRAINLIB_OFI_NCCL_VERSION": "1.6.0"}
    p4d = select_profile(Devices(gpus=8, efa=("rdmap0",), instance=lookup("p4d.24xlarge")), 8, old)
    g5 = select_profile(Devices(gpus=8, efa=("rdmap0",), instance=lookup("g5.48xlarge")), 8, old)
    assert p4d.env.get("FI_EFA_USE_DEVICE_RDMA") == "1" and "FI_EFA_USE_DEVICE_RDMA" not in g5.env
    # the plugin version read from the pod (not only the env override) picks the cheatsheet row
    assert select_profile(Devices(gpus=8, efa=("rdmap0",), ofi_version="1.5.0"), 8, {}).env["NCCL_PROTO"] == "simple"
