"""Environment profiles: the variables a job needs on this kind of node, and why.

A profile only *adds* variables: anything the user or the pod spec already set wins, and the
explanation says so. Profiles:

- `efa-nccl` (GPUs and EFA devices): follows aws-ofi-nccl's EFA cheatsheet (doc/efa-env-var.md).
  With libfabric >= 1.18 and aws-ofi-nccl >= 1.7 (what current EFA installers bundle) nothing has
  to be set: the plugin configures libfabric itself, and FI_EFA_USE_DEVICE_RDMA, FI_PROVIDER,
  NCCL_PROTO=simple are only for older plugins. NCCL_MIN_NCHANNELS / NCCL_BUFFSIZE should stay at
  their defaults, and RDMAV_FORK_SAFE must not be set. What the profile does: put the plugin and
  libfabric on LD_LIBRARY_PATH, name the plugin for NCCL (NCCL_NET_PLUGIN) when its file is not the
  default libnccl-net.so, and apply the legacy variables only for an older plugin version.
- `nccl` (GPUs, no EFA): nothing to set; NCCL picks sockets or NVLink itself.
- `neuron` (NeuronCores): the persistent compiler cache (NEURON_COMPILE_CACHE_URL) so a restarted
  pod does not recompile, MALLOC_ARENA_MAX=64 (glibc gives every thread-heavy rank up to 8 x cores
  malloc arenas; with 32-64 ranks per host that exhausts host memory — AWS's Neuron training
  scripts set 64 under a "HOST OOM" comment), and with EFA the libfabric settings from the Neuron
  multi-node guide (the Neuron runtime uses libfabric directly, not the NCCL plugin).
- `cpu` (neither): gloo; OMP_NUM_THREADS = cores / local processes so ranks do not oversubscribe.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from trainlib.launchers.devices import Devices

NEURON_CACHE_DEFAULT = "/var/tmp/neuron-compile-cache"
NEURON_MALLOC_ARENA_MAX = "64"


@dataclass(frozen=True)
class Profile:
    name: str
    env: dict[str, str]            # what the profile wants set (before user overrides)
    notes: tuple[str, ...]

    def apply(self, env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
        """Return (env with the profile added, what was kept because the user set it)."""
        out, kept = dict(env), []
        for k, v in self.env.items():
            if k == "LD_LIBRARY_PATH":
                have = [d for d in out.get(k, "").split(":") if d]
                out[k] = ":".join([d for d in v.split(":") if d not in have] + have)
            elif k in out and out[k] != v:
                kept.append(f"{k}={out[k]} (user-set; profile would set {v})")
            else:
                out[k] = v
        return out, kept


def _version_tuple(v: str | None) -> tuple[int, ...] | None:
    if not v:
        return None
    nums = []
    for p in v.lstrip("v").split("-")[0].split("."):
        if not p.isdigit():
            break
        nums.append(int(p))
    return tuple(nums) or None


def efa_nccl_env(plugin_path: str | None, plugin_version: str | None, gdr_rdma: bool) -> tuple[dict[str, str], list[str]]:
    """The aws-ofi-nccl cheatsheet as a function of the plugin version (None = current, >= 1.7)."""
    env: dict[str, str] = {}
    notes = []
    if plugin_path:
        libdir = os.path.dirname(plugin_path)
        env["LD_LIBRARY_PATH"] = f"{libdir}:/opt/amazon/efa/lib"
        base = os.path.basename(plugin_path)
        if base != "libnccl-net.so":  # NCCL loads libnccl-net-<NAME>.so when NCCL_NET_PLUGIN=<NAME>
            env["NCCL_NET_PLUGIN"] = base[len("libnccl-net-"):-len(".so")]
        notes.append(f"OFI plugin {plugin_path}")
    else:
        notes.append("EFA devices found but no aws-ofi-nccl plugin: NCCL will fall back to TCP sockets "
                     "(install the EFA installer in the image; it bundles the plugin)")
    ver = _version_tuple(plugin_version)
    if ver is None or ver >= (1, 7):
        notes.append("aws-ofi-nccl >= 1.7 (or unknown version): no FI_*/NCCL_PROTO variables needed")
    elif ver >= (1, 6):
        if gdr_rdma:
            env["FI_EFA_USE_DEVICE_RDMA"] = "1"
        notes.append(f"aws-ofi-nccl {plugin_version} (1.6.x): FI_EFA_USE_DEVICE_RDMA=1 on RDMA instances only")
    else:
        env.update(FI_PROVIDER="efa", NCCL_PROTO="simple")
        if gdr_rdma:
            env["FI_EFA_USE_DEVICE_RDMA"] = "1"
        notes.append(f"aws-ofi-nccl {plugin_version} (<= 1.5): FI_PROVIDER=efa and NCCL_PROTO=simple")
    return env, notes


def select_profile(devices: Devices, nproc_per_node: int, env: dict[str, str] | None = None) -> Profile:
    env = dict(os.environ if env is None else env)
    if devices.neuron_cores:
        penv = {"NEURON_COMPILE_CACHE_URL": env.get("TRAINLIB_NEURON_CACHE", NEURON_CACHE_DEFAULT),
                "MALLOC_ARENA_MAX": NEURON_MALLOC_ARENA_MAX}
        notes = [f"{devices.neuron_cores} NeuronCores: one process per core, compiler cache at "
                 f"{penv['NEURON_COMPILE_CACHE_URL']} (mount a volume there to keep it across restarts); "
                 f"MALLOC_ARENA_MAX={NEURON_MALLOC_ARENA_MAX} bounds glibc arenas per rank (host OOM otherwise)"]
        if devices.efa:
            penv.update(FI_PROVIDER="efa", FI_EFA_USE_DEVICE_RDMA="1", FI_EFA_FORK_SAFE="1")
            notes.append(f"{len(devices.efa)} EFA devices: libfabric EFA provider with device RDMA (Neuron multi-node guide)")
        return Profile("neuron", penv, tuple(notes))
    if devices.gpus and devices.efa:
        # p4d/p5 and later have GPUDirect RDMA over EFA, g5/g6 do not (instance table); unknown: assume it.
        # The variable only matters for plugin <= 1.6.x.
        rdma = devices.instance.gpudirect_rdma if devices.instance else True
        version = env.get("TRAINLIB_OFI_NCCL_VERSION") or devices.ofi_version
        penv, notes = efa_nccl_env(devices.ofi_plugin, version, gdr_rdma=rdma)
        if "RDMAV_FORK_SAFE" in env:
            notes.append("RDMAV_FORK_SAFE is set: aws-ofi-nccl advises against it (it can break newer kernels)")
        return Profile("efa-nccl", penv, tuple([f"{len(devices.efa)} EFA devices ({', '.join(devices.efa)})"] + notes))
    if devices.gpus:
        return Profile("nccl", {}, (f"{devices.gpus} GPUs, no EFA devices: NCCL defaults",))
    threads = max(1, (os.cpu_count() or 1) // max(1, nproc_per_node))
    return Profile("cpu", {"OMP_NUM_THREADS": str(threads)},
                   (f"no GPU or NeuronCore: gloo on CPU, OMP_NUM_THREADS={threads} ({os.cpu_count()} cores / "
                    f"{nproc_per_node} local processes)",))
