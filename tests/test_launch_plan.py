"""Pod detection, torchrun arguments and env profiles, from the exact variables each operator injects.

The expected values are read off the operators' sources (training-operator v1.9 envvar.go /
elastic.go, Kubeflow Trainer v2 torch plugin, mpi-operator v2beta1) and aws-ofi-nccl's EFA
cheatsheet; devices come from fake /dev and /sys trees.
"""
from __future__ import annotations

import os

import pytest

from trainlib.launchers import launch
from trainlib.launchers.detect import detect_placement
from trainlib.launchers.devices import Devices, parse_core_list, probe
from trainlib.launchers.errors import EXIT_RETRY, LaunchConfigError, classify_worker_exit
from trainlib.launchers.mpi import mpirun_argv, parse_hostfile
from trainlib.launchers.plan import build_plan
from trainlib.launchers.profiles import select_profile
from trainlib.launchers.torchrun_args import resolve_nproc

CMD = ["trainlib", "train"]
CPU = Devices()


def pytorchjob_env(rtype: str, index: int, replicas: int = 2, nproc: str = "1", port: int = 23456) -> dict[str, str]:
    """What training-operator v1.9 sets in a pod of job `gpt` with Master + Workers (setPodEnv)."""
    rank = index + (1 if rtype == "worker" else 0)
    return {"PYTHONUNBUFFERED": "0", "MASTER_PORT": str(port), "MASTER_ADDR": "gpt-master-0",
            "PET_MASTER_PORT": str(port), "PET_MASTER_ADDR": "gpt-master-0",
            "WORLD_SIZE": str(replicas * int(nproc if nproc.isdigit() else 1)), "RANK": str(rank),
            "PET_NPROC_PER_NODE": nproc, "PET_NODE_RANK": str(rank), "PET_NNODES": str(replicas)}


def elastic_env(port: int = 23456) -> dict[str, str]:
    return {"PYTHONUNBUFFERED": "0", "PET_RDZV_ENDPOINT": f"gpt-worker-0:{port}", "PET_RDZV_BACKEND": "c10d",
            "PET_NNODES": "1:4", "PET_MAX_RESTARTS": "3", "PET_NPROC_PER_NODE": "1"}


def test_pytorchjob_static_master_and_worker():
    for rtype, index, rank in (("master", 0, 0), ("worker", 0, 1), ("worker", 2, 3)):
        plan = build_plan(CMD, pytorchjob_env(rtype, index, replicas=4), devices=CPU)
        assert plan.placement.kind == "pytorchjob" and plan.mode == "torchrun"
        assert plan.torchrun_argv == ["--nproc-per-node", "1", "--nnodes", "4", "--node-rank", str(rank),
                                      "--master-addr", "gpt-master-0", "--master-port", "23456", "--no-python", *CMD]
        # node-level RANK/WORLD_SIZE and every PET_* must not reach torchrun's children
        assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR"} & set(plan.env)
        assert not [k for k in plan.env if k.startswith("PET_")]


def test_pytorchjob_legacy_operator_counts_pods():
    env = {"MASTER_ADDR": "gpt-master-0", "MASTER_PORT": "23456", "RANK": "2", "WORLD_SIZE": "3"}
    p = detect_placement(env)
    assert (p.kind, p.nnodes, p.node_rank) == ("pytorchjob", "3", 2)


def test_pytorchjob_gpu_nproc_from_devices_and_world_size(tmp_path):
    for i in range(8):
        (tmp_path / "dev").mkdir(exist_ok=True)
        (tmp_path / "dev" / f"nvidia{i}").touch()
    (tmp_path / "dev" / "nvidiactl").touch()  # not a GPU
    devices = probe({}, root=str(tmp_path), with_nccl=False)
    assert devices.gpus == 8
    plan = build_plan(CMD, pytorchjob_env("worker", 0, nproc="8"), devices=devices)
    assert plan.nproc_per_node == 8 and plan.profile.name == "nccl"
    plan = build_plan(CMD, pytorchjob_env("worker", 0, nproc="auto"), devices=devices)
    assert plan.nproc_per_node == 8 and "one per GPU" in plan.nproc_reason
    assert probe({"CUDA_VISIBLE_DEVICES": "0,1"}, root=str(tmp_path), with_nccl=False).gpus == 2


def test_elastic_pytorchjob_uses_c10d_rendezvous():
    plan = build_plan(CMD, elastic_env(), devices=CPU)
    assert plan.placement.kind == "pytorchjob-elastic"
    assert plan.torchrun_argv == ["--nproc-per-node", "1", "--nnodes", "1:4", "--rdzv-backend", "c10d",
                                  "--rdzv-endpoint", "gpt-worker-0:23456", "--max-restarts", "3", "--no-python", *CMD]


def trainjob_env(job: dict, index: int) -> dict[str, str]:
    """What a pod of `job` (a TrainJob) gets from Trainer v2.3 (plugins/torch/torch.go EnforceMLPolicy,
    plugins/jobset) and the batch Job controller: PET_NNODES = numNodes; PET_NPROC_PER_NODE =
    numProcPerNode, else "auto" when resourcesPerNode names a resource containing "gpu", else the CPU
    request (or limit), at least 1; PET_NODE_RANK from the completion-index annotation (= the Job's
    JOB_COMPLETION_INDEX); PET_MASTER_ADDR `<job>-node-0-0.<job>`, PET_MASTER_PORT 29500; the
    trainer's env; the JobSet pod's hostname."""
    t, name = job["spec"]["trainer"], job["metadata"]["name"]
    res = t.get("resourcesPerNode", {})
    if "numProcPerNode" in t:
        nproc = str(t["numProcPerNode"])
    elif any("gpu" in k.lower() for part in res.values() for k in part):
        nproc = "auto"
    else:
        cpu = res.get("requests", {}).get("cpu") or res.get("limits", {}).get("cpu") or "0"
        nproc = str(max(1, int(cpu)))   # whole CPUs, as Quantity.Value() rounds (the generator writes integers)
    env = {e["name"]: e["value"] for e in t.get("env", [])}
    env.update({"PET_NNODES": str(t.get("numNodes", 1)), "PET_NPROC_PER_NODE": nproc, "PET_NODE_RANK": str(index),
                "PET_MASTER_ADDR": f"{name}-node-0-0.{name}", "PET_MASTER_PORT": "29500",
                "JOB_COMPLETION_INDEX": str(index), "HOSTNAME": f"{name}-node-0-{index}"})
    return env


def _trainjob(*flags: str) -> dict:
    from trainlib.launchers.k8s import build, parser, spec_from_args

    (job,) = [d for d in build("trainjob", spec_from_args(parser().parse_args(["trainjob", *flags]), [])) if d["kind"] == "TrainJob"]
    return job


def test_trainjob_v2_env_from_the_generated_trainjob(tmp_path):
    """The env Trainer v2's torch runtime gives each pod of a generated TrainJob drives `trainlib launch`
    to the torchrun command a PyTorchJob pod of the same shape gets (one static rendezvous, ranks in
    node order)."""
    base = ("--name", "gpt", "--image", "img:1")
    job = _trainjob(*base, "--nodes", "3")
    for index in range(3):
        plan = build_plan(CMD, trainjob_env(job, index), devices=CPU)
        assert plan.placement.kind == "trainjob" and plan.mode == "torchrun"
        assert plan.torchrun_argv == ["--nproc-per-node", "1", "--nnodes", "3", "--node-rank", str(index),
                                      "--master-addr", "gpt-node-0-0.gpt", "--master-port", "29500", "--no-python", *CMD]
        assert not [k for k in plan.env if k.startswith("PET_")]
        ref = build_plan(CMD, pytorchjob_env("master" if index == 0 else "worker", max(0, index - 1), replicas=3),
                         devices=CPU)
        assert plan.torchrun_argv[:6] == ref.torchrun_argv[:6]                 # same nproc, nnodes, node rank
    # GPUs: the generator states numProcPerNode; without it Trainer says "auto" and trainlib counts the GPUs
    for i in range(8):
        (tmp_path / "dev").mkdir(exist_ok=True)
        (tmp_path / "dev" / f"nvidia{i}").touch()
    gpus = probe({}, root=str(tmp_path), with_nccl=False)
    job = _trainjob(*base, "--nodes", "2", "--gpus-per-node", "8")
    assert build_plan(CMD, trainjob_env(job, 1), devices=gpus).torchrun_argv[:6] == [
        "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1"]
    del job["spec"]["trainer"]["numProcPerNode"]
    env = trainjob_env(job, 1)
    assert env["PET_NPROC_PER_NODE"] == "auto"
    plan = build_plan(CMD, env, devices=gpus)
    assert plan.nproc_per_node == 8 and "one per GPU" in plan.nproc_reason
    # one node: torchrun's standalone rendezvous
    plan = build_plan(CMD, trainjob_env(_trainjob(*base, "--nodes", "1"), 0), devices=CPU)
    assert plan.torchrun_argv[:5] == ["--nproc-per-node", "1", "--standalone", "--nnodes", "1"]
    # Neuron: Trainer counts only resources named *gpu*, so a TrainJob without numProcPerNode gets the CPU
    # count (115 on trn1.32xlarge); trainlib refuses it and names the TrainJob field (the generator sets 32)
    job = _trainjob(*base, "--nodes", "2", "--instance-type", "trn1.32xlarge")
    env = trainjob_env(job, 0)
    assert env["PET_NPROC_PER_NODE"] == "32" and env["TRAINLIB_INSTANCE_TYPE"] == "trn1.32xlarge"
    neuron_env = {**env, "NEURON_RT_VISIBLE_CORES": "0-31"}
    plan = build_plan(CMD, neuron_env, devices=probe(neuron_env, root=str(tmp_path / "none"), with_nccl=False))
    assert plan.nproc_per_node == 32 and plan.profile.name == "neuron"
    del job["spec"]["trainer"]["numProcPerNode"]
    env = {**trainjob_env(job, 0), "NEURON_RT_VISIBLE_CORES": "0-31"}
    assert env["PET_NPROC_PER_NODE"] == "115"
    with pytest.raises(LaunchConfigError, match="spec.trainer.numProcPerNode"):
        build_plan(CMD, env, devices=probe(env, root=str(tmp_path / "none"), with_nccl=False))


@pytest.mark.parametrize("env,kind,mode", [
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "K_MPI_JOB_ROLE": "worker"}, "mpi-rank", "mpi-rank"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "mpi-rank", "mpi-rank"),
    ({"K_MPI_JOB_ROLE": "launcher", "OMPI_MCA_orte_default_hostfile": "/etc/mpi/hostfile"}, "mpijob-launcher", "mpirun"),
    ({"K_MPI_JOB_ROLE": "worker"}, "mpijob-worker", "exec"),
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "GROUP_RANK": "1",
      "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "torchrun-child", "exec"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "torchrun-child", "exec"),
    ({}, "plain", "torchrun"),
])
def test_detect_kinds(env, kind, mode):
    plan = build_plan(CMD, env, devices=CPU)
    assert (plan.placement.kind, plan.mode) == (kind, mode)
    if kind == "plain":
        assert plan.torchrun_argv == ["--nproc-per-node", "1", "--standalone", "--nnodes", "1", "--no-python", *CMD]


def test_neuron_never_auto_and_cores_from_env(tmp_path):
    assert parse_core_list("0-15") == 16 and parse_core_list("0,1,4-7") == 6
    env = {**pytorchjob_env("master", 0, nproc="auto"), "NEURON_RT_VISIBLE_CORES": "0-31"}
    plan = build_plan(CMD, env, devices=probe(env, root=str(tmp_path), with_nccl=False))
    assert plan.nproc_per_node == 32 and "auto" not in plan.torchrun_argv
    assert plan.profile.name == "neuron" and plan.env["NEURON_COMPILE_CACHE_URL"] == "/var/tmp/neuron-compile-cache"
    (tmp_path / "dev").mkdir()
    for i in range(16):
        (tmp_path / "dev" / f"neuron{i}").touch()
    assert probe({}, root=str(tmp_path), with_nccl=False).neuron_cores == 32          # trn1.32xlarge: 16 x 2
    assert probe({"TRAINLIB_NEURON_CORES_PER_DEVICE": "4"}, root=str(tmp_path), with_nccl=False).neuron_cores == 64
    # trn2.48xlarge: 16 Trainium2 devices x 8 physical cores; LNC=2 (default) -> 64 logical, LNC=1 -> 128
    trn2 = {"TRAINLIB_INSTANCE_TYPE": "trn2.48xlarge"}
    assert probe(trn2, root=str(tmp_path), with_nccl=False).neuron_cores == 64
    assert probe({**trn2, "NEURON_LOGICAL_NC_CONFIG": "1"}, root=str(tmp_path), with_nccl=False).neuron_cores == 128
    assert probe({"TRAINLIB_INSTANCE_TYPE": "trn1.32xlarge"}, root=str(tmp_path), with_nccl=False).neuron_cores == 32
    assert plan.env["MALLOC_ARENA_MAX"] == "64"
    env, kept = plan.profile.apply({"MALLOC_ARENA_MAX": "8"})
    assert env["MALLOC_ARENA_MAX"] == "8" and "MALLOC_ARENA_MAX=8" in kept[0]   # a user's value wins


def _efa_tree(tmp_path, plugin: str | None = "libnccl-net-ofi.so", pod_devices: tuple[int, ...] = (0, 1)):
    """A host with two EFA devices and one InfiniBand HCA in /sys; the pod got the uverbs nodes in `pod_devices`.

    Layout as on a p4d node: /sys/class/infiniband/<ibdev>/device/driver -> .../drivers/efa,
    /sys/class/infiniband_verbs/uverbs<N>/ibdev names the verbs device, /dev/infiniband/uverbs<N> is
    what the EFA device plugin mounts into the pod.
    """
    (tmp_path / "drivers" / "efa").mkdir(parents=True)
    (tmp_path / "drivers" / "mlx5_core").mkdir()
    for n, (dev, drv) in enumerate((("rdmap16s27", "efa"), ("rdmap32s27", "efa"), ("mlx5_0", "mlx5_core"))):
        d = tmp_path / "sys" / "class" / "infiniband" / dev / "device"
        d.mkdir(parents=True)
        os.symlink(tmp_path / "drivers" / drv, d / "driver")
        verbs = tmp_path / "sys" / "class" / "infiniband_verbs" / f"uverbs{n}"
        verbs.mkdir(parents=True)
        (verbs / "ibdev").write_text(dev + "\n")
    (tmp_path / "dev" / "infiniband").mkdir(parents=True)
    for n in pod_devices:
        (tmp_path / "dev" / "infiniband" / f"uverbs{n}").touch()
    if plugin:
        lib = tmp_path / "opt" / "amazon" / "ofi-nccl" / "lib"
        lib.mkdir(parents=True)
        (lib / plugin).touch()
    return tmp_path


def test_efa_comes_from_the_pods_devices_not_the_hosts_sysfs(tmp_path):
    """A pod without EFA resources sees the host's /sys/class/infiniband but no /dev/infiniband/uverbs*."""
    assert probe({}, root=str(_efa_tree(tmp_path / "none", pod_devices=())), with_nccl=False).efa == ()
    assert probe({}, root=str(_efa_tree(tmp_path / "one", pod_devices=(1,))), with_nccl=False).efa == ("rdmap32s27",)
    # the InfiniBand HCA's uverbs node is not an EFA device
    assert probe({}, root=str(_efa_tree(tmp_path / "ib", pod_devices=(2,))), with_nccl=False).efa == ()
    dev = probe({}, root=str(_efa_tree(tmp_path / "none2", pod_devices=())), with_nccl=False)
    assert select_profile(Devices(gpus=8, efa=dev.efa, ofi_plugin=dev.ofi_plugin), 8, {}).name == "nccl"


def test_pod_seeing_fewer_efa_than_its_instance_is_told(tmp_path):
    root = _efa_tree(tmp_path, pod_devices=(0,))
    dev = probe({"TRAINLIB_INSTANCE_TYPE": "p4d.24xlarge"}, root=str(root), with_nccl=False)
    assert dev.efa == ("rdmap16s27",)
    assert any("sees 1 of the 4 EFA interfaces of p4d.24xlarge" in n for n in dev.notes), dev.notes


@pytest.mark.parametrize("version,expect", [
    (None, {}),                                                     # >= 1.7 with libfabric >= 1.18: nothing
    ("1.7.3", {}),
    ("1.6.0", {"FI_EFA_USE_DEVICE_RDMA": "1"}),
    ("1.5.0", {"FI_EFA_USE_DEVICE_RDMA": "1", "FI_PROVIDER": "efa", "NCCL_PROTO": "simple"}),
])
def test_efa_profile_follows_aws_ofi_nccl_cheatsheet(tmp_path, version, expect):
    root = _efa_tree(tmp_path)
    dev = probe({}, root=str(root), with_nccl=False)
    assert dev.efa == ("rdmap16s27", "rdmap32s27")
    dev = Devices(gpus=8, efa=dev.efa, ofi_plugin=dev.ofi_plugin)
    env = {"TRAINLIB_OFI_NCCL_VERSION": version} if version else {}
    prof = select_profile(dev, 8, env)
    assert prof.name == "efa-nccl"
    fi = {k: v for k, v in prof.env.items() if k.startswith(("FI_", "NCCL_PROTO"))}
    assert fi == expect
    assert prof.env["NCCL_NET_PLUGIN"] == "ofi"
    assert prof.env["LD_LIBRARY_PATH"].split(":")[0] == str(root / "opt/amazon/ofi-nccl/lib")
    assert "RDMAV_FORK_SAFE" not in prof.env and "NCCL_MIN_NCHANNELS" not in prof.env


def test_no_efa_profile_without_devices_and_user_settings_win(tmp_path):
    prof = select_profile(Devices(gpus=8), 8, {})
    assert prof.name == "nccl" and prof.env == {}
    prof = select_profile(Devices(gpus=8, efa=("rdmap0",)), 8, {})
    assert any("no aws-ofi-nccl plugin" in n for n in prof.notes)
    prof = select_profile(Devices(), 2, {})
    env, kept = prof.apply({"OMP_NUM_THREADS": "7"})
    assert env["OMP_NUM_THREADS"] == "7" and kept and "user-set" in kept[0]


@pytest.mark.parametrize("env,devices,needles", [
    ({k: v for k, v in pytorchjob_env("worker", 0).items() if "ADDR" not in k}, CPU,
     ["MASTER_ADDR is not set", "pytorchjob-port", "export MASTER_ADDR"]),
    ({k: v for k, v in pytorchjob_env("worker", 0).items() if "MASTER" not in k}, CPU, ["MASTER_ADDR and MASTER_PORT"]),
    (pytorchjob_env("worker", 0, nproc="3"), Devices(gpus=8), ["nproc_per_node 3", "does not divide the 8 visible GPUs"]),
    ({**pytorchjob_env("worker", 0, nproc="2"), "WORLD_SIZE": "3"}, Devices(gpus=2), ["WORLD_SIZE=3", "nnodes(2) x nproc_per_node(2)"]),
    ({"TRAINLIB_BACKEND": "nccll"}, CPU, ["'nccll' is not a known backend", "gloo, nccl, xla, mpi"]),
    ({"TRAINLIB_BACKEND": "nccl"}, CPU, ["no visible GPU", "gloo"]),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "5", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, CPU, ["node rank 5", "0..1"]),
    ({**elastic_env(), "PET_NNODES": "4:2"}, CPU, ["'4:2'", "MIN <= MAX"]),
    ({**elastic_env(), "PET_RDZV_BACKEND": "zookeeper"}, CPU, ["'zookeeper'", "c10d"]),
    ({"K_MPI_JOB_ROLE": "launcher"}, CPU, ["no hostfile", "OMPI_MCA_orte_default_hostfile"]),
])
def test_bad_environment_exits_1_naming_the_fix(monkeypatch, capsys, env, devices, needles):
    with pytest.raises(LaunchConfigError) as e:
        build_plan(CMD, env, devices=devices)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    # and through the CLI entry (same code path trainlib launch takes), exit code 1
    monkeypatch.setattr(os, "environ", {**env, "PATH": os.environ.get("PATH", "")})
    monkeypatch.setattr(launch, "build_plan", lambda cmd, nproc_override=None: build_plan(cmd, env, nproc_override, devices=devices))
    assert launch.main(["--", *CMD]) == 1
    assert needles[0] in capsys.readouterr().err


def test_nproc_override_and_exit_codes():
    assert resolve_nproc(detect_placement({}), Devices(gpus=8), 4)[0] == 4
    with pytest.raises(LaunchConfigError, match="must be >= 1"):
        resolve_nproc(detect_placement({}), CPU, 0)
    # Kubeflow ExitCode policy: 1-127 permanent, >= 128 retryable; signals (negative) retryable
    assert [classify_worker_exit(c) for c in (0, 1, 2, 137, 138, -9, -15)] == [0, 1, 2, 137, 138, EXIT_RETRY, EXIT_RETRY]


def test_mpi_hostfile_and_mpirun_line(tmp_path):
    assert parse_hostfile("gpt-worker-0.gpt.default.svc slots=8\ngpt-worker-1.gpt.default.svc slots=8\n") == [
        ("gpt-worker-0.gpt.default.svc", 8), ("gpt-worker-1.gpt.default.svc", 8)]
    assert parse_hostfile("a:4\n# comment\nb\n") == [("a", 4), ("b", 1)]
    argv = mpirun_argv("/etc/mpi/hostfile", "a slots=8\nb slots=8\n", CMD, ["LD_LIBRARY_PATH"], open_mpi=True,
                       root=str(tmp_path), as_root=False)
    assert argv[:5] == ["mpirun", "--hostfile", "/etc/mpi/hostfile", "-np", "16"]
    # in the GPU image: the EFA installer's Open MPI by absolute path (not the mpich wheel's mpirun on PATH),
    # and --allow-run-as-root because the MPIJob launcher runs as root
    bin_ = tmp_path / "opt" / "amazon" / "openmpi" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "mpirun").touch(mode=0o755)
    image = mpirun_argv("/etc/mpi/hostfile", "a slots=8\n", CMD, [], open_mpi=True, root=str(tmp_path), as_root=True)
    assert image[:3] == [str(bin_ / "mpirun"), "--allow-run-as-root", "--hostfile"]
    assert argv[argv.index("-x") + 1] == "LD_LIBRARY_PATH" and argv[-5:] == ["trainlib", "launch", "--", *CMD]
    assert mpirun_argv("/h", "a:2\nb:2", CMD, [], open_mpi=False) == ["mpiexec", "-f", "/h", "-n", "4",
                                                                     "trainlib", "launch", "--", *CMD]


def test_trainlib_env_reports_nccl_plugin_and_efa(monkeypatch, capsys):
    from trainlib.launchers import envinfo

    for k in [k for k in os.environ if k.startswith(("PET_", "OMPI_", "PMI_")) or k in ("RANK", "WORLD_SIZE")]:
        monkeypatch.delenv(k)
    assert envinfo.main([]) == 0
    text = capsys.readouterr().out
    for needle in ("placement: plain", "NCCL: ", "OFI plugin: ", "EFA devices: ", "torchrun --nproc-per-node"):
        assert needle in text
    assert envinfo.main(["--json"]) == 0
    d = __import__("json").loads(capsys.readouterr().out)
    assert {"nccl_version", "ofi_plugin", "efa_devices", "torchrun_argv", "profile"} <= set(d)
    monkeypatch.setenv("TRAINLIB_BACKEND", "nope")
    assert envinfo.main([]) == 1 and "'nope' is not a known backend" in capsys.readouterr().err


def test_ray_actors_get_the_launch_profile_env(tmp_path):
    """A Ray worker pod runs no `trainlib launch`: its actors take the same device settings themselves."""
    from trainlib.launchers.ray import device_env

    root = _efa_tree(tmp_path)
    dev = probe({}, root=str(root), with_nccl=False)
    efa = Devices(gpus=8, efa=dev.efa, ofi_plugin=dev.ofi_plugin)
    want = {k: v for k, v in select_profile(efa, 8, {"TRAINLIB_OFI_NCCL_VERSION": "1.5.0"}).env.items()
            if k != "LD_LIBRARY_PATH"}
    assert want["NCCL_NET_PLUGIN"] == "ofi" and want["FI_PROVIDER"] == "efa"
    assert device_env(8, efa, {"TRAINLIB_OFI_NCCL_VERSION": "1.5.0"}) == want
    # a value the user set wins; the CPU profile adds nothing (Ray sets OMP_NUM_THREADS per actor)
    assert "FI_PROVIDER" not in device_env(8, efa, {"TRAINLIB_OFI_NCCL_VERSION": "1.5.0", "FI_PROVIDER": "tcp"})
    assert device_env(2, Devices(), {}) == {}
    neuron = device_env(32, Devices(neuron_cores=32), {})
    assert neuron["MALLOC_ARENA_MAX"] and neuron["NEURON_COMPILE_CACHE_URL"]
