"""`trainlib bench NAME [--quick] [--json PATH] [--plot PATH]`.

A benchmark is a module `trainlib.benchmarks.bench_NAME` (file benchmarks/bench_NAME.py) with

    def run(quick: bool) -> dict          # measures trainlib and its peers side by side, returns results
    def plot(result: dict, path: str)     # optional: a PNG
    def table_headline(summary: dict) -> str   # optional: its line in `trainlib bench table`

`run` returns a JSON-able dict; the harness adds metadata -- the command, the date, the machine
(host, CPUs, Python, torch, GPU) and the git commit with any tracked files that differed from it,
so every stored figure can be traced to the code and the machine that produced it -- and writes
benchmarks/results/NAME.json (or --json), then prints a one-line summary.
Helpers here: `median`, `alternate` (interleaved repetitions, medians), `results_dir`, `ratio_text`.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .paths import HERE, results_dir  # noqa: F401  (re-exported: benchmarks import them from here)


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def ratio_text(v: Any) -> str:
    """1.234 -> '1.23x' for the table's headlines; anything else (e.g. 'n/a') as it is."""
    return f"{v:.2f}x" if isinstance(v, (int, float)) else str(v)


def alternate(candidates: dict[str, Callable[[], float]], reps: int) -> dict[str, dict[str, Any]]:
    """Run each candidate once per round, in rotating order, `reps` rounds; each call returns seconds.

    Alternating spreads slow phases of a shared machine over all candidates instead of one."""
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(float(candidates[n]()))
    return {n: {"median_s": median(ts), "all_s": ts} for n, ts in times.items()}


def machine() -> dict[str, Any]:
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def git_state(root: Path = HERE.parent) -> dict[str, Any] | None:
    """{"commit": HEAD, "modified": tracked files that differ from it} of the source checkout the
    benchmarks run from; None for an installed copy (no checkout to name)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout

    try:
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != root.resolve():
            return None  # installed inside some other repository: its commit says nothing about this code
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    # a figure measured with uncommitted edits names them: the commit alone would not be the code that ran
    return {"commit": commit, "modified": sorted(line[3:] for line in status.splitlines() if line.strip())}


def metadata(benchmark: str, command: str, quick: bool, wall_s: float) -> dict[str, Any]:
    """What every stored result carries so that its figures can be traced."""
    return {"benchmark": benchmark, "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": quick, "wall_s": round(wall_s, 2), "machine": machine(), "git": git_state()}


def _writable(path: Path) -> bool:
    """Whether a file can be created at path (its folder made if needed); leaves nothing behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return not path.is_dir()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        from .table import main as table_main

        return table_main(argv[1:])
    p = argparse.ArgumentParser(prog="trainlib bench",
                                description="Run a benchmark; results are ratios against peers measured in the same run.",
                                epilog="`trainlib bench table [--write]`: the latest results as a markdown table "
                                       "(benchmarks/README.md)")
    p.add_argument("name", choices=available(), help="which benchmark")
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (CI)")
    p.add_argument("--json", help="where to write the JSON result (default benchmarks/results/NAME.json)")
    p.add_argument("--plot", help="where to write a PNG plot (default: beside the JSON, if the benchmark plots)")
    args, extra = p.parse_known_args(argv)
    for flag, where in (("--json", args.json), ("--plot", args.plot)):
        if where and not _writable(Path(where)):   # before minutes of measuring, not after
            p.error(f"{flag}={where!r}: cannot write there; choose a writable path")
    mod = importlib.import_module(f"trainlib.benchmarks.bench_{args.name}")
    takes_argv = "argv" in inspect.signature(mod.run).parameters
    if extra and not takes_argv:
        p.error(f"unrecognized arguments for benchmark {args.name}: {' '.join(extra)}")
    t0 = time.time()
    # a benchmark with its own options takes them as run(quick, argv=[...])
    result = mod.run(quick=args.quick, argv=extra) if takes_argv else mod.run(quick=args.quick)
    result_suffix = result.pop("result_suffix", "")  # e.g. "-model": do not overwrite the measured results
    meta = metadata(args.name, "trainlib bench " + " ".join(argv), args.quick, time.time() - t0)
    out = {"meta": meta, **result}
    suffix = result_suffix + ("-quick" if args.quick else "")
    path = Path(args.json) if args.json else results_dir() / f"{args.name}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    if hasattr(mod, "plot"):
        png = Path(args.plot) if args.plot else path.with_suffix(".png")
        try:
            mod.plot(out, str(png))
        except ImportError as e:
            print(f"(no plot: {e}; pip install 'trainlib[bench]')", file=sys.stderr)
    print(json.dumps({"benchmark": args.name, "json": str(path), **out.get("summary", {})}))
    return 0
