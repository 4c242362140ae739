"""`trainlib report RUN_DIR`: one page (PNG + HTML) of a run, from its metrics JSONL.

    trainlib train --train.metrics runs/gpt/metrics.jsonl
    trainlib report runs/gpt                     # -> runs/gpt/report.png, runs/gpt/report.html
    trainlib report runs/gpt/metrics.jsonl --out /tmp/page

RUN_DIR is the directory holding `metrics.jsonl` (train.metrics; the default run writes
runs/metrics.jsonl, so `trainlib report runs`), or the path of the JSONL itself. A `summary.json`
beside it (the summary `trainlib train` prints) adds the run's totals to the page when present.
The page: loss and tokens/s curves, the stacked step breakdown over time, step time per rank with
the straggler named, peak memory per rank, bytes per mesh axis — each panel says so when the
records do not hold its keys (a run with observe.breakdown off, or one from before it existed).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("trainlib")

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"


class ReportError(ValueError):
    """The run directory or its files cannot make a report; the message names the path and the fix."""


@dataclass(frozen=True)
class Run:
    metrics_path: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None


def find_metrics(run: str | Path) -> Path:
    """RUN_DIR (holding metrics.jsonl) or a .jsonl path -> the metrics file; ReportError if there is none."""
    p = Path(run)
    if p.is_dir():
        f = p / METRICS_NAME
        if f.is_file():
            return f
        others = sorted(x.name for x in p.glob("*.jsonl"))
        hint = f"; it has {', '.join(others)}: pass that file's path" if others else \
            "; pass the directory of train.metrics (default: runs) or the .jsonl itself"
        raise ReportError(f"{p} holds no {METRICS_NAME}{hint}")
    if p.is_file():
        return p
    raise ReportError(f"{p} does not exist; pass the directory holding {METRICS_NAME} (train.metrics) "
                      "or the path of the .jsonl")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSONL's records; a torn last line (a run still writing) is skipped, any other bad line is an error."""
    lines = path.read_text().splitlines()
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                log.warning("%s: last line %d is incomplete (a run still writing?); skipped", path, i)
                continue
            raise ReportError(f"{path}:{i} is not JSON ({e}); is this a trainlib metrics file?") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ReportError(f"{path}:{i} is not a metrics record (a JSON object with a 'step'): {line[:80]!r}")
        records.append(rec)
    if not records:
        raise ReportError(f"{path} holds no records; it fills once the first step is logged "
                          "(train.log_every sets the window)")
    return records


def load_run(run: str | Path) -> Run:
    metrics = find_metrics(run)
    summary_path = metrics.parent / SUMMARY_NAME
    summary = None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as e:
            log.warning("%s is not JSON (%s); the report leaves the summary out", summary_path, e)
    return Run(metrics, read_records(metrics), summary)


def write_report(run: Run, out_dir: Path) -> tuple[Path, Path]:
    """report.png and report.html (which shows the PNG by its relative name) under out_dir."""
    from .report_figure import render_png
    from .report_html import render_html

    out_dir.mkdir(parents=True, exist_ok=True)
    png, page = out_dir / "report.png", out_dir / "report.html"
    render_png(run.records, run.summary, png, title=str(run.metrics_path))
    page.write_text(render_html(run.records, run.summary, png.name, title=str(run.metrics_path)))
    return png, page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trainlib report", description="Render a run's metrics as one PNG and an "
                                "HTML page: loss, tokens/s, step breakdown, straggler, memory per rank.")
    p.add_argument("run", metavar="RUN_DIR", help=f"directory holding {METRICS_NAME} (train.metrics), or the .jsonl")
    p.add_argument("--out", help="where report.png and report.html go (default: beside the metrics file)")
    args = p.parse_args(argv)
    try:
        run = load_run(args.run)
    except (ReportError, OSError) as e:
        print(f"trainlib report: {e}", file=sys.stderr)
        return 1
    png, page = write_report(run, Path(args.out) if args.out else run.metrics_path.parent)
    print(f"{png}\n{page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
