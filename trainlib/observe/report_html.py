"""The HTML page of `trainlib report`: the PNG, the run's summary, its last window and a per-rank table.

A single static file with no script and no external asset, so it opens from a laptop, an S3
bucket or a CI artifact alike; every value is HTML-escaped (records are data, not markup).
"""
from __future__ import annotations

import json
from html import escape
from typing import Any

from .records import flatten_numeric
from .report_figure import headline, straggler_counts

PER_RANK_COLUMNS = ("t_step_s", "t_sync_wait_s", "mem_peak_bytes")
STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:1650px}table{border-collapse:collapse;margin:0.5em 2em "
         "1em 0;display:inline-table;vertical-align:top}td,th{border:1px solid #ccc;padding:2px 8px;"
         "text-align:right}th{background:#eee}td:first-child{text-align:left}img{max-width:100%}")


def _table(caption: str, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><caption>{escape(caption)}</caption><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _flat_rows(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A nested summary as (dotted key, value) rows; lists stay whole (one row per per-rank list)."""
    rows: list[tuple[str, Any]] = []
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            rows += _flat_rows(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def _per_rank_rows(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    last = records[-1].get("per_rank") or {}
    n = max((len(v) for v in last.values() if isinstance(v, list)), default=0)
    counts = straggler_counts(records)
    rows = []
    for rank in range(n):
        cells = [last[k][rank] if isinstance(last.get(k), list) and rank < len(last[k]) else "" for k in
                 PER_RANK_COLUMNS]
        rows.append((rank, *cells, counts.get(rank, 0)))
    return rows


def render_html(records: list[dict[str, Any]], summary: dict[str, Any] | None, png_name: str, title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>trainlib report: {escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>trainlib report</h1><p><code>{escape(title)}</code>: {escape(headline(records, summary))}</p>",
             f"<img src='{escape(png_name)}' alt='loss, throughput, step breakdown, per-rank step time, memory "
             f"and bytes per axis over the run' width='1600' height='1000'>"]
    if summary:
        parts.append(_table("summary (summary.json)", ("key", "value"), _flat_rows(summary)))
    last = records[-1]
    window = {k: v for k, v in flatten_numeric(last).items() if not k.startswith("per_rank/")}
    parts.append(_table(f"last log window (step {last['step']})", ("key", "value"), list(window.items())))
    rows = _per_rank_rows(records)
    if rows:
        parts.append(_table("per rank (last window; straggler = windows it was the slowest)",
                            ("rank", *PER_RANK_COLUMNS, "straggler"), rows))
    parts.append(f"<p>{len(records)} log windows, steps {records[0]['step']}..{last['step']}.</p></body></html>\n")
    return "\n".join(parts)
