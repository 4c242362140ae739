"""Dockerfile.gpu and Dockerfile.neuron, parsed (no Docker engine here): pins, entrypoint, COPY sources.

The entrypoint script itself is run for real (`--dry-run`), so the image's ENTRYPOINT is known to
reach `trainlib launch`.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FULL_VERSION = re.compile(r"\d+\.\d+\.\d+")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.strip().partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    return out


def args_of(ins: list[tuple[str, str]]) -> dict[str, str]:
    return {k: v for op, rest in ins if op == "ARG" for k, _, v in [rest.partition("=")]}


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def pip_specs(run: str) -> list[str]:
    specs, cmds = [], [[]]
    for w in shlex.split(run):
        if w in ("&&", ";", "||"):
            cmds.append([])
        else:
            cmds[-1].append(w)
    for words in cmds:
        if "pip" in " ".join(words[:2]) and "install" in words:
            rest = words[words.index("install") + 1:]
            skip = False
            for w in rest:
                if skip:
                    skip = False
                elif w in ("--index-url", "--extra-index-url", "-c", "-r"):
                    skip = True
                elif not w.startswith("-"):
                    specs.append(w)
    return specs


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.neuron"])
def test_dockerfile_pins_entrypoint_and_copy_sources(name):
    path = ROOT / name
    ins = instructions(path)
    args = args_of(ins)
    froms = [rest for op, rest in ins if op == "FROM"]
    assert len(froms) == 1
    image, _, tag = expand(froms[0], args).rpartition(":")
    assert image and tag and tag != "latest" and FULL_VERSION.search(tag), f"base image not pinned: {froms[0]}"
    for op, rest in ins:
        if op == "COPY":
            *sources, _dest = shlex.split(rest)
            for s in sources:
                assert not s.startswith("--"), f"COPY flags not expected: {rest}"
                assert (ROOT / s).exists(), f"{name}: COPY source {s} does not exist"
        if op == "RUN":
            for spec in pip_specs(expand(rest, args)):
                if spec.startswith(("/", ".")):
                    continue  # the local trainlib source tree
                assert re.search(r"(==|>=)\d", spec), f"{name}: unpinned pip requirement {spec!r}"
                assert not re.match(r"torch\b(?!==)", spec) or "==" in spec, f"{name}: torch must be pinned with =="
    entry = [rest for op, rest in ins if op == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["/usr/local/bin/trainlib-entrypoint"]
    copies = [shlex.split(rest) for op, rest in ins if op == "COPY"]
    assert ["launchers/entrypoint.sh", "/usr/local/bin/trainlib-entrypoint"] in copies
    assert json.loads([rest for op, rest in ins if op == "CMD"][0]) == ["--", "trainlib", "train"]
    assert any(op == "RUN" and "trainlib env" in rest for op, rest in ins), "the build should run `trainlib env`"


def test_gpu_image_versions_agree_and_efa_installer_flags():
    ins = instructions(ROOT / "Dockerfile.gpu")
    args = args_of(ins)
    base = [rest for op, rest in ins if op == "FROM"][0]
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(devel|runtime)-ubuntu\d+\.\d+$", base)
    assert cuda, base
    major, minor = cuda.group(1), cuda.group(2)
    assert args["TORCH_INDEX"].endswith(f"/cu{major}{minor}"), "torch wheels must be built for the base's CUDA"
    for k in ("EFA_INSTALLER_VERSION", "TORCH_VERSION", "NCCL_VERSION"):
        assert FULL_VERSION.fullmatch(args[k]), f"ARG {k}={args[k]!r} is not a full version"
    runs = " ".join(expand(rest, args) for op, rest in ins if op == "RUN")
    assert f"nvidia-nccl-cu{major}==" in runs, "NCCL wheel must match the CUDA major version"
    specs = [sp for op, rest in ins if op == "RUN" for sp in pip_specs(expand(rest, args))]
    assert f"torch=={args['TORCH_VERSION']}" in specs and f"nvidia-nccl-cu{major}=={args['NCCL_VERSION']}" in specs
    efa = re.search(r"\./efa_installer\.sh ([^&]*)", runs)
    assert efa and set(efa.group(1).split()) >= {"-y", "--skip-kmod", "--skip-limit-conf", "--no-verify"}
    assert f"aws-efa-installer-{args['EFA_INSTALLER_VERSION']}.tar.gz" in runs
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].isdigit() and users[-1] != "0", "the GPU image should run as a numeric non-root user"
    env = " ".join(rest for op, rest in ins if op == "ENV")
    assert "/opt/amazon/ofi-nccl/lib" in env and "/opt/amazon/efa/lib" in env


def test_entrypoint_script_reaches_trainlib_launch(tmp_path):
    script = ROOT / "launchers" / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    assert 'exec trainlib launch "$@"' in script.read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "OMPI_", "PMI_"))
           and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run([str(script), "--dry-run", "--", "trainlib", "train"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["placement"] == "plain" and plan["cmd"] == ["trainlib", "train"]
    assert plan["torchrun_argv"][-3:] == ["--no-python", "trainlib", "train"]


def _commands(run: str) -> list[str]:
    """The `&&`-separated commands of one RUN, whitespace-normalised."""
    return [" ".join(c.split()) for c in run.split("&&")]


# The newest EFA installer checked against AWS's EFA release notes (1.51.0, 2026-10-22: libfabric
# 2.7.0amzn2.0, aws-ofi-nccl 1.22.0). Raise it when the pin moves; never lower it.
EFA_INSTALLER_AT_LEAST = (1, 51, 0)


def test_efa_installer_runs_with_fresh_apt_lists_and_cleans_up():
    """efa_installer.sh installs its dependencies with apt: the lists must be fetched in the same RUN
    (an earlier layer deletes them) and deleted at its end, or the build fails / the image keeps them."""
    ins = instructions(ROOT / "Dockerfile.gpu")
    args = args_of(ins)
    (run,) = [rest for op, rest in ins if op == "RUN" and "efa_installer.sh" in rest]
    cmds = _commands(run)
    at = next(i for i, c in enumerate(cmds) if "efa_installer.sh" in c)
    assert any(c.startswith("apt-get update") for c in cmds[:at]), cmds
    assert any("rm -rf" in c and "/var/lib/apt/lists" in c for c in cmds[at + 1:]), cmds
    version = tuple(int(x) for x in args["EFA_INSTALLER_VERSION"].split("."))
    assert version >= EFA_INSTALLER_AT_LEAST, f"EFA installer {args['EFA_INSTALLER_VERSION']} is older than the checked release"
    # every RUN that installs with apt fetches its lists first and removes them last
    for op, rest in ins:
        if op == "RUN" and "apt-get install" in rest:
            c = _commands(rest)
            assert c[0].startswith("apt-get update") and "/var/lib/apt/lists" in c[-1], c


def test_gpu_image_mpi_is_the_efa_installers_open_mpi():
    """MPIJob expects Open MPI (-x, slots=): mpi4py is compiled against /opt/amazon/openmpi, and no
    PyPI mpich wheel (the `[mpi]` extra) puts a second mpirun first on PATH."""
    ins = instructions(ROOT / "Dockerfile.gpu")
    args = args_of(ins)
    runs = [expand(rest, args) for op, rest in ins if op == "RUN"]
    specs = [sp for r in runs for sp in pip_specs(r)]
    assert not [sp for sp in specs if "mpich" in sp or re.search(r"\[[^]]*\bmpi\b[^]]*\]", sp)], specs
    (build,) = [c for r in runs for c in _commands(r) if "mpi4py==" in c]
    assert build.startswith("MPICC=/opt/amazon/openmpi/bin/mpicc pip install") and "--no-binary=mpi4py" in build
    assert any("'Open MPI' in" in c and "Get_library_version" in c for r in runs for c in _commands(r)), \
        "the build should prove mpi4py links Open MPI"
    setup_extras = (ROOT / "setup.py").read_text()
    assert '"mpi": ["mpi4py>=3.1", "mpich"]' in setup_extras, "the [mpi] extra changed; re-check this test's premise"


def test_neuron_image_pins_and_host_memory_setting():
    ins = instructions(ROOT / "Dockerfile.neuron")
    base = [rest for op, rest in ins if op == "FROM"][0]
    m = re.fullmatch(r"public\.ecr\.aws/neuron/pytorch-training-neuronx:(\d+\.\d+\.\d+)-neuronx-py(\d+)-sdk(\d+)\.(\d+)"
                     r"\.(\d+)-ubuntu(\d+\.\d+)", base)
    assert m, base
    torch_version, sdk = m.group(1), tuple(int(m.group(i)) for i in (3, 4, 5))
    # PyTorch/XLA training (trainlib's Neuron path) ends with SDK 2.29 / torch 2.9 (Neuron's announcement);
    # 2.26 (torch 2.8) was the pin before issue 18.
    assert (2, 29, 0) <= sdk < (2, 30, 0) and torch_version.startswith("2.9."), base
    env = " ".join(rest for op, rest in ins if op == "ENV")
    assert "MALLOC_ARENA_MAX=64" in env


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.neuron"])
def test_images_carry_ray_and_the_prometheus_client(name):
    """KubeRay runs `ray start` in the trainlib image (trainlib k8s rayjob), which needs ray[default];
    the scrape annotations the generators add need --observe.prometheus's client in the image."""
    ins = instructions(ROOT / name)
    args = dict(rest.split("=", 1) for op, rest in ins if op == "ARG" and "=" in rest)
    run = " ".join(rest for op, rest in ins if op == "RUN")
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["RAY_VERSION"]), args
    assert '"ray[default,tune]==${RAY_VERSION}"' in run
    assert "observe]" in run or '"prometheus-client' in run
    if name == "Dockerfile.neuron":  # never moves the Neuron SDK's own packages
        assert "pip list --format=freeze > /tmp/neuron-pins.txt" in run and "-c /tmp/neuron-pins.txt" in run
