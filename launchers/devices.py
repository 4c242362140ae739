"""What this node has: GPUs, Neuron cores, EFA devices, the NCCL OFI plugin, the NCCL version.

Probes read files under `root` (default "/") and the environment, so tests can point them at a
fake tree. Nothing here loads CUDA or opens a device.

- GPUs: /dev/nvidia<N> nodes (the NVIDIA device plugin exposes only the pod's GPUs), narrowed by
  CUDA_VISIBLE_DEVICES when set.
- Neuron cores: NEURON_RT_VISIBLE_CORES (set by the Neuron device plugin for
  `aws.amazon.com/neuroncore`), else /dev/neuron<N> devices x cores per device. Trn1/Inf2 devices
  have 2 NeuronCores; Trn2 devices have 8 physical cores shown as 4 logical ones with the default
  NEURON_LOGICAL_NC_CONFIG=2 (8 with LNC=1). Cores per device: TRAINLIB_NEURON_CORES_PER_DEVICE,
  else the instance table (TRAINLIB_INSTANCE_TYPE, set by `trainlib k8s --instance-type`), else 2.
- EFA: the /dev/infiniband/uverbs<N> nodes *this pod* was given (the EFA device plugin mounts one
  per `vpc.amazonaws.com/efa`), each mapped to its verbs device through
  /sys/class/infiniband_verbs/uverbs<N>/ibdev and kept when that device's driver is `efa`.
  /sys/class/infiniband alone lists every device of the host, including those the pod did not get.
- OFI plugin: libnccl-net-ofi.so / libnccl-net-aws-ofi.so / libnccl-net.so in LD_LIBRARY_PATH or
  the EFA installer's /opt/amazon/ofi-nccl; its version from dpkg's status (package libnccl-ofi,
  as the EFA installer names it) or the "aws-ofi-nccl X.Y.Z" string the library carries.
- Limits that break EFA/NCCL silently: `ulimit -l` (locked memory; EFA registers buffers) and the
  size of /dev/shm (NCCL's shared-memory transport, data-loader workers).
"""
from __future__ import annotations

import glob
import os
import re
import resource
from dataclasses import dataclass

from trainlib.launchers.instances import InstanceType
from trainlib.launchers.instances import from_env as instance_from_env

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
    ofi_version: str | None = None      # aws-ofi-nccl version, when it can be read
    neuron_core_ids: str | None = None  # "0-31": the cores this pod may use
    memlock_kib: int | None = None      # `ulimit -l` (soft); None = unlimited
    shm_bytes: int | None = None        # size of /dev/shm; None = not mounted
    instance: InstanceType | None = None

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


def cores_per_device(env: dict[str, str]) -> tuple[int, str]:
    """Logical NeuronCores per /dev/neuron<N> device, and where the number comes from."""
    if env.get("TRAINLIB_NEURON_CORES_PER_DEVICE"):
        return int(env["TRAINLIB_NEURON_CORES_PER_DEVICE"]), "TRAINLIB_NEURON_CORES_PER_DEVICE"
    it = instance_from_env(env)
    if it and it.neuron_devices:
        lnc = env.get("NEURON_LOGICAL_NC_CONFIG")
        if lnc in ("1", "2") and it.neuron_physical_cores_per_device > 2:   # LNC exists on Trainium2 and later
            return it.neuron_physical_cores_per_device // int(lnc), f"{it.name} with NEURON_LOGICAL_NC_CONFIG={lnc}"
        return it.neuron_cores_per_device, f"{it.name} (instance table, default LNC)"
    return 2, "2 per device (Trn1/Inf2; on Trn2 set TRAINLIB_INSTANCE_TYPE or TRAINLIB_NEURON_CORES_PER_DEVICE)"


def count_neuron_cores(env: dict[str, str], root: str = "/") -> tuple[int, str]:
    """(cores, how we know)."""
    if env.get("NEURON_RT_VISIBLE_CORES"):
        return parse_core_list(env["NEURON_RT_VISIBLE_CORES"]), "NEURON_RT_VISIBLE_CORES"
    devs = [p for p in glob.glob(os.path.join(root, "dev", "neuron*")) if re.fullmatch(r"neuron\d+", os.path.basename(p))]
    if not devs:
        return 0, "no /dev/neuron*"
    per, why = cores_per_device(env)
    return len(devs) * per, f"{len(devs)} /dev/neuron* devices x {per} cores ({why})"


def _natural(path: str) -> tuple[str, int]:
    m = re.search(r"(\d+)$", path)
    return (path[:m.start()], int(m.group(1))) if m else (path, -1)


def find_efa(root: str = "/") -> tuple[str, ...]:
    """EFA devices of this pod: its /dev/infiniband/uverbs* nodes whose verbs device has the efa driver."""
    found = []
    for node in sorted(glob.glob(os.path.join(root, "dev", "infiniband", "uverbs*")), key=_natural):
        uverbs = os.path.basename(node)
        try:
            with open(os.path.join(root, "sys", "class", "infiniband_verbs", uverbs, "ibdev")) as f:
                ibdev = f.read().strip()
        except OSError:
            continue  # no sysfs entry: cannot tell an EFA from another RDMA device
        driver = os.path.realpath(os.path.join(root, "sys", "class", "infiniband", ibdev, "device", "driver"))
        if os.path.basename(driver) == "efa" or ibdev.startswith("efa"):
            found.append(ibdev)
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


OFI_PACKAGES = ("libnccl-ofi", "aws-ofi-nccl")
_OFI_STRING = re.compile(rb"aws-ofi-nccl[ -]v?(\d+\.\d+\.\d+)")


def ofi_plugin_version(plugin_path: str | None, root: str = "/") -> str | None:
    """aws-ofi-nccl's version: dpkg's record of the package, else the version string inside the library."""
    try:
        with open(os.path.join(root, "var", "lib", "dpkg", "status")) as f:
            for stanza in f.read().split("\n\n"):
                fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
                if fields.get("Package", "").startswith(OFI_PACKAGES) and "Version" in fields:
                    return fields["Version"].split("-")[0]
    except OSError:
        pass
    if plugin_path:
        try:
            with open(plugin_path, "rb") as f:
                m = _OFI_STRING.search(f.read(64 << 20))
            if m:
                return m.group(1).decode()
        except OSError:
            pass
    return None


def memlock_kib() -> int | None:
    """`ulimit -l` in KiB (what the shell prints), None for unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft // 1024


def shm_bytes(root: str = "/") -> int | None:
    try:
        st = os.statvfs(os.path.join(root, "dev", "shm"))
    except OSError:
        return None
    return st.f_frsize * st.f_blocks


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
    efa, plugin, it = find_efa(root), find_ofi_plugin(env, root), instance_from_env(env)
    notes = [f"GPUs: {gpus} (/dev/nvidia*{', CUDA_VISIBLE_DEVICES' if 'CUDA_VISIBLE_DEVICES' in env else ''})",
             f"Neuron cores: {cores} ({how})"]
    if it and len(efa) < it.efa:
        notes.append(f"EFA: this pod sees {len(efa)} of the {it.efa} EFA interfaces of {it.name}; request "
                     f"vpc.amazonaws.com/efa: {it.efa} for full bandwidth")
    ids = env.get("NEURON_RT_VISIBLE_CORES") or (f"0-{cores - 1}" if cores else None)
    return Devices(gpus=gpus, neuron_cores=cores, efa=efa, ofi_plugin=plugin,
                   nccl_version=nccl_version() if check else None, nccl_checked=check, notes=tuple(notes),
                   ofi_version=ofi_plugin_version(plugin, root) if plugin else None, neuron_core_ids=ids,
                   memlock_kib=memlock_kib(), shm_bytes=shm_bytes(root), instance=it)
