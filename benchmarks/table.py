"""`trainlib bench table [--write]`: the latest result of every benchmark as one markdown table.

Rows are read from benchmarks/results/*.json (each file carries the command that produced it, its
date and, since the harness records it, the git commit), so the table in benchmarks/README.md is
regenerated from the measurements, never typed by hand. Each benchmark module words its own row
(`table_headline(summary) -> str`, at the end of benchmarks/bench_NAME.py), and labels cost-model
output a prediction there. `--write` replaces the block between the `results:begin` /
`results:end` markers in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Callable

from .paths import results_dir

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _module(name: str) -> ModuleType | None:
    """The module that declares benchmark `name`'s headline: bench_NAME (a `trainlib bench` benchmark)
    or NAME (a tool that writes its own result, e.g. mutants). Imported by name, like the harness
    loads a benchmark, so the table knows no benchmark and none of them imports the table."""
    for mod in (f"trainlib.benchmarks.bench_{name}", f"trainlib.benchmarks.{name}"):
        if importlib.util.find_spec(mod) is not None:
            return importlib.import_module(mod)
    return None


def _headline(name: str, summary: dict) -> str:
    """The benchmark's own `table_headline(summary)`; "" when it declares none."""
    mod = _module(name) if name.isidentifier() else None
    fn: Callable[[dict], str] | None = getattr(mod, "table_headline", None)
    try:
        return fn(summary) if fn else ""
    except (KeyError, TypeError):
        pass  # an older result file with other keys: show the raw summary instead
    return "; ".join(f"{k} {v}" for k, v in list(summary.items())[:6])


def _commit(meta: dict) -> str:
    git = meta.get("git")
    if not git:
        return "not recorded"
    return git["commit"][:7] + (f" + {len(git['modified'])} modified" if git.get("modified") else "")


def render(folder: Path | None = None) -> str:
    """One markdown table row per result file: benchmark, what it found, command, date, commit."""
    folder = folder or results_dir()
    rows = ["| result file | headline (ratios measured in one run) | command | date (UTC) | commit |",
            "|---|---|---|---|---|"]
    for path in sorted(folder.glob("*.json")):
        d = json.loads(path.read_text())
        # a tool run as `python -m trainlib.benchmarks.NAME` keeps its command and git state at the
        # top level and its whole result is the summary (e.g. zero_billion)
        meta = d.get("meta") or {k: d[k] for k in ("command", "git", "date") if k in d}
        tool = meta.get("command", "").split("-m trainlib.benchmarks.")[-1].split()[0] if "meta" not in d else ""
        name = meta.get("benchmark", tool or path.stem.split("-")[0])
        line = _headline(name, d.get("summary", {} if "meta" in d else d)).replace("|", "/")
        rows.append(f"| `{path.name}` | {line} | `{meta.get('command', '?')}` | {meta.get('date', '?')[:16]} "
                    f"| {_commit(meta)} |")
    return "\n".join(rows) + "\n"


def write(readme: Path) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} block to replace; add the two markers first")
    block = f"{BEGIN}\n{render()}{END}"
    readme.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trainlib bench table", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="update benchmarks/README.md in place")
    args = p.parse_args(argv)
    if args.write:
        write(Path(__file__).resolve().parent / "README.md")
    else:
        print(render(), end="")
    return 0
