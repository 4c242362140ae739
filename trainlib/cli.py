"""The `trainlib` command.

    trainlib train [--section.key=value ...]   the default job: a small GPT on 2 local CPU ranks
    trainlib launch [--] CMD ...               container entrypoint: reads the pod env, execs torchrun
    trainlib k8s pytorchjob|mpijob ...         print a Kubernetes manifest
    trainlib bench NAME [--quick]              run a benchmark, write JSON (and a PNG plot)
    trainlib ps-server --bind HOST:PORT        run one parameter server
    trainlib env                               what trainlib detects here, and why
    trainlib cluster --nodes N [--] CMD ...     run CMD as a PyTorchJob on N emulated nodes (root)
    trainlib ckpt ls|verify|export DIR         list, verify, export (one safetensors file) a run's checkpoints

Each subcommand lives in its own module and exposes `main(argv) -> int`; this file only routes.
Exit codes: 0 ok, 1 user/config error (permanent), >= 128 retryable infrastructure failure.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("trainlib.trainer", "main", "train the default GPT (2 local CPU processes by default)"),
    "launch": ("trainlib.launchers.launch", "main", "container entrypoint: detect the pod, exec torchrun"),
    "k8s": ("trainlib.launchers.k8s", "main", "print a PyTorchJob / MPIJob manifest"),
    "bench": ("trainlib.benchmarks.harness", "main", "run a benchmark (JSON results, PNG plot)"),
    "ps-server": ("trainlib.sync.ps.server", "main", "run one parameter server"),
    "env": ("trainlib.launchers.envinfo", "main", "print what trainlib detects in this environment"),
    "cluster": ("trainlib.netcluster_cli", "main", "run a job on N emulated nodes (network namespaces; root)"),
    "ckpt": ("trainlib.ckpt_cli", "main", "list, verify and export checkpoints (one safetensors file)"),
    "report": ("trainlib.observe.report", "main", "one-page PNG + HTML of a run from its metrics JSONL"),
    "plan": ("trainlib.plan_cli", "main", "pick the layout and sync backend from a calibrated cost model"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items())
    return f"usage: trainlib COMMAND [ARGS]\n\ncommands:\n{rows}\n\n`trainlib COMMAND --help` for each command's options."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"trainlib: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 1
    module, func, _ = COMMANDS[name]
    try:
        entry = getattr(importlib.import_module(module), func)
    except ImportError as e:
        print(f"trainlib {name}: not available here ({e}); install the matching extra, e.g. pip install 'trainlib[test]'",
              file=sys.stderr)
        return 1
    try:
        return int(entry(rest) or 0)
    except SystemExit as e:
        if e.code == 2:  # argparse's usage error: a user error, which is 1 here (2 is not in our contract)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
