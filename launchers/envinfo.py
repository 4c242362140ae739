"""`trainlib env [--json]`: what trainlib detects here and what `trainlib launch` would do.

It prints the same plan the entrypoint runs (placement, devices, profile, torchrun arguments) and
starts nothing, then what a user debugging a pod needs to see (`pod:` lines): the EFA devices the
pod was given, the aws-ofi-nccl plugin and its version, the NCCL version torch will load,
`ulimit -l` (EFA registers memory; a small limit fails at the first send), the size of /dev/shm
(NCCL's shared-memory transport; Docker's 64 MiB default is a common cause of bus errors) and the
NeuronCores this pod may use.
"""
from __future__ import annotations

import argparse
import json
import sys

from trainlib.launchers.devices import Devices
from trainlib.launchers.errors import EXIT_CONFIG, LaunchConfigError
from trainlib.launchers.plan import build_plan

MIN_SHM_BYTES = 1 << 30   # below 1 GiB, NCCL's shm transport and data-loader workers run out


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def pod_report(dev: Devices) -> dict:
    """The debugging facts as plain data (the --json output's "pod" entry)."""
    return {"efa_devices": list(dev.efa), "ofi_plugin": dev.ofi_plugin, "ofi_plugin_version": dev.ofi_version,
            "nccl_version": dev.nccl_version, "ulimit_l_kib": dev.memlock_kib, "dev_shm_bytes": dev.shm_bytes,
            "neuron_cores": dev.neuron_cores, "neuron_visible_cores": dev.neuron_core_ids,
            "instance_type": dev.instance.name if dev.instance else None}


def pod_lines(dev: Devices) -> list[str]:
    """The same facts for people, with a warning where a value is known to break a job."""
    lines = [f"pod: EFA devices: {len(dev.efa)} ({', '.join(dev.efa) or 'none: no /dev/infiniband/uverbs* in this pod'})"]
    plugin = dev.ofi_plugin or "not found"
    lines.append(f"pod: aws-ofi-nccl: {plugin}" + (f" (version {dev.ofi_version or 'unknown'})" if dev.ofi_plugin else ""))
    if dev.nccl_checked:
        lines.append(f"pod: NCCL (what torch loads): {dev.nccl_version or 'none (CPU torch, no nvidia-nccl wheel)'}")
    memlock = "unlimited" if dev.memlock_kib is None else f"{dev.memlock_kib} KiB"
    warn = "" if dev.memlock_kib is None or not dev.efa else (
        " — EFA needs unlimited locked memory; set it on the node (containerd's default is unlimited) "
        "or run the pod with the IPC_LOCK capability")
    lines.append(f"pod: ulimit -l: {memlock}{warn}")
    if dev.shm_bytes is None:
        lines.append("pod: /dev/shm: not mounted")
    else:
        small = dev.shm_bytes < MIN_SHM_BYTES
        lines.append(f"pod: /dev/shm: {_size(dev.shm_bytes)}" + (
            " — too small for NCCL's shared-memory transport; mount a memory-backed emptyDir "
            "(trainlib k8s does) or docker run --shm-size" if small else ""))
    if dev.neuron_cores:
        lines.append(f"pod: Neuron visible cores: {dev.neuron_core_ids} ({dev.neuron_cores} cores)")
    return lines


def main(argv: list[str] | None = None, root: str = "/") -> int:
    p = argparse.ArgumentParser(prog="trainlib env", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--nproc-per-node", type=int, default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from trainlib.launchers.devices import probe

    try:
        devices = probe(root=root, with_nccl=True)
        plan = build_plan(["trainlib", "train"], nproc_override=args.nproc_per_node, devices=devices)
    except LaunchConfigError as e:
        print(f"trainlib env: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps({**plan.as_dict(), "pod": pod_report(devices)}, indent=2))
    else:
        print("\n".join(plan.explain() + pod_lines(devices)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
