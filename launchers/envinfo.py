"""`trainlib env [--json]`: what trainlib detects here and what `trainlib launch` would do.

It prints the same plan the entrypoint runs (placement, devices, NCCL version, OFI plugin, EFA
devices, profile, torchrun arguments) and starts nothing.
"""
from __future__ import annotations

import argparse
import json
import sys

from trainlib.launchers.errors import EXIT_CONFIG, LaunchConfigError
from trainlib.launchers.plan import build_plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trainlib env", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--nproc-per-node", type=int, default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from trainlib.launchers.devices import probe

    try:
        plan = build_plan(["trainlib", "train"], nproc_override=args.nproc_per_node, devices=probe(with_nccl=True))
    except LaunchConfigError as e:
        print(f"trainlib env: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print("\n".join(plan.explain()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
