"""What this node has: GPUs, Neuron cores, EFA devices, the NCCL OFI plugin, the NCCL version.

Probes read files under `root` (default "/") and the environment, so tests can point them at a
fake tree. Nothing here loads CUDA or opens a device.

- GPUs: /dev/nvidia<N> nodes (the NVIDIA device plugin exposes only the pod's GPUs), narrowed by
  CUDA_VISIBLE_DEVICES when set.
- Neuron cores: NEURON_RT_VISIBLE_CORES (set by the Neuron device plugin for
  `aws.amazon.com/neuroncore`), else /dev/neuron<N> devices x cores per device. Trn1/Inf2 devices
  have 2 NeuronCores; Trn2 devices have 8 physical cores shown as 4 logical ones with the default
  NEURON_LOGICAL_NC_CONFIG=2. TRAINLIB_NEURON_CORES_PER_DEVICE overrides the guess.
- EFA: /sys/class/infiniband/<dev> whose device driver is `efa` (the EFA device plugin mounts the
  matching /dev/infiniband/uverbs<N>).
- OFI plugin: libnccl-net-ofi.so / libnccl-net-aws-ofi.so / libnccl-net.so in LD_LIBRARY_PATH or
  the EFA installer's /opt/amazon/ofi-nccl.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

PLUGIN_NAMES = ("libnccl-net-ofi.so", "libnccl-net-aws-ofi.so", "libnccl-net.so")
PLUGIN_DIRS = ("/opt/amazon/ofi-nccl/lib", "/opt/amazon/ofi-nccl/lib64", "/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu",
               "/opt/amazon/ofi-nccl/lib/aarch64-linux-gnu", "/opt/aws-ofi-nccl/lib", "/opt/aws-ofi-nccl/install/lib")


@dataclass(frozen=True)
class Devices:
    gpus: int = 0
    neuron_cores: int = 0
    efa: tuple[str, ...] = ()
    ofi_plugin: str | None = None       # full path of the NCCL net plugin, if found
    nccl_version: str | None = None
    nccl_checked: bool = False          # False: not looked up (no GPU and not asked to)
    notes: tuple[str, ...] = ()

    @property
    def accelerator(self) -> str:
        return "neuron" if self.neuron_cores else "gpu" if self.gpus else "cpu"


def parse_core_list(spec: str) -> int:
    """Count cores in a NEURON_RT_VISIBLE_CORES value: "0-15", "0,1,4-7" or "3"."""
    count = 0
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"bad core range {part!r} in {spec!r}; expected e.g. 0-15 or 0,1,2")
        count += int(hi) - int(lo) + 1 if hi else 1
    return count


def count_gpus(env: dict[str, str], root: str = "/") -> int:
    nodes = [p for p in glob.glob(os.path.join(root, "dev", "nvidia*")) if re.fullmatch(r"nvidia\d+", os.path.basename(p))]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return min(len(ids), len(nodes)) if nodes else 0
    return len(nodes)


def count_neuron_cores(env: dict[str, str], root: str = "/") -> tuple[int, str]:
    """(cores, how we know)."""
    if env.get("NEURON_RT_VISIBLE_CORES"):
        return parse_core_list(env["NEURON_RT_VISIBLE_CORES"]), "NEURON_RT_VISIBLE_CORES"
    devs = [p for p in glob.glob(os.path.join(root, "dev", "neuron*")) if re.fullmatch(r"neuron\d+", os.path.basename(p))]
    if not devs:
        return 0, "no /dev/neuron*"
    per = env.get("TRAINLIB_NEURON_CORES_PER_DEVICE")
    if per:
        return len(devs) * int(per), f"{len(devs)} devices x TRAINLIB_NEURON_CORES_PER_DEVICE={per}"
    return len(devs) * 2, f"{len(devs)} /dev/neuron* devices x 2 cores (Trn1/Inf2; set TRAINLIB_NEURON_CORES_PER_DEVICE on Trn2)"


def find_efa(root: str = "/") -> tuple[str, ...]:
    found = []
    for dev in sorted(glob.glob(os.path.join(root, "sys", "class", "infiniband", "*"))):
        driver = os.path.join(dev, "device", "driver")
        if os.path.basename(os.path.realpath(driver)) == "efa" or os.path.basename(dev).startswith("efa"):
            found.append(os.path.basename(dev))
    return tuple(found)


def find_ofi_plugin(env: dict[str, str], root: str = "/") -> str | None:
    dirs = [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += [os.path.join(root, d.lstrip("/")) for d in PLUGIN_DIRS]
    for d in dirs:
        for name in PLUGIN_NAMES:
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    return None


def nccl_version() -> str | None:
    """NCCL that torch will load: torch's own build when it has CUDA, else the nvidia-nccl wheel."""
    try:
        import torch

        if torch.cuda.is_available():
            return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # a broken CUDA install must not stop `trainlib env` from reporting
        pass
    from importlib import metadata

    for dist in ("nvidia-nccl-cu12", "nvidia-nccl-cu13", "nvidia-nccl-cu11"):
        try:
            return f"{metadata.version(dist)} ({dist} wheel)"
        except metadata.PackageNotFoundError:
            continue
    return None


def probe(env: dict[str, str] | None = None, root: str = "/", with_nccl: bool | None = None) -> Devices:
    """Probe the node; `with_nccl` None means: look up the NCCL version only when there are GPUs."""
    env = dict(os.environ if env is None else env)
    cores, how = count_neuron_cores(env, root)
    gpus = count_gpus(env, root)
    check = with_nccl if with_nccl is not None else gpus > 0
    notes = [f"GPUs: {gpus} (/dev/nvidia*{', CUDA_VISIBLE_DEVICES' if 'CUDA_VISIBLE_DEVICES' in env else ''})",
             f"Neuron cores: {cores} ({how})"]
    return Devices(gpus=gpus, neuron_cores=cores, efa=find_efa(root), ofi_plugin=find_ofi_plugin(env, root),
                   nccl_version=nccl_version() if check else None, nccl_checked=check, notes=tuple(notes))
