"""The one-page figure of `trainlib report`: six panels drawn from the metrics records.

Built on matplotlib's Figure + Agg canvas directly (no pyplot): no global figure state, no display
backend, safe in a headless pod. The page is FIGSIZE x DPI pixels, whatever the data.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

FIGSIZE = (16.0, 10.0)  # inches
DPI = 100               # -> a 1600 x 1000 PNG
# the breakdown's parts, bottom to top in the stack; other t_*_s keys a later trainer adds go on top
BREAKDOWN = ("t_data_s", "t_forward_s", "t_backward_s", "t_sync_wait_s", "t_optimizer_s", "t_bubble_s", "t_other_s")
AXES_BYTES = ("bytes_dp", "bytes_tp", "bytes_pp", "bytes_ps")
GIB = 2 ** 30


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold a number under `key`."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def per_rank(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[list[float]]]:
    """(steps, values[window][rank]) of the records whose per_rank holds a list under `key`."""
    xs, rows = [], []
    for r in records:
        v = (r.get("per_rank") or {}).get(key)
        if isinstance(v, list) and v:
            xs.append(r["step"])
            rows.append([float(x) for x in v])
    return xs, rows


def breakdown_keys(records: list[dict[str, Any]]) -> list[str]:
    seen = {k for r in records for k in r if k.startswith("t_") and k.endswith("_s") and k != "t_step_s"}
    return [k for k in BREAKDOWN if k in seen] + sorted(seen - set(BREAKDOWN))


def straggler_counts(records: list[dict[str, Any]]) -> Counter:
    """rank -> how many log windows named it the straggler."""
    return Counter(int(r["straggler_rank"]) for r in records
                   if isinstance(r.get("straggler_rank"), (int, float)) and r["straggler_rank"] >= 0)


def _empty(ax, title: str, why: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True, transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _curve(ax, records, key: str, title: str, ylabel: str) -> None:
    xs, ys = series(records, key)
    if not xs:
        return _empty(ax, title, f"no '{key}' in the records")
    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _breakdown(ax, records) -> None:
    title = "where a step's time goes (mean per step in each window)"
    keys = breakdown_keys(records)
    rows = [r for r in records if all(isinstance(r.get(k), (int, float)) for k in keys)] if keys else []
    if not rows:
        return _empty(ax, title, "no step breakdown in these records\n(observe.breakdown off, or an older run)")
    xs = [r["step"] for r in rows]
    ax.stackplot(xs, *[[r[k] * 1e3 for r in rows] for k in keys], labels=[k[2:-2] for k in keys], alpha=0.85)
    sx, sy = series(rows, "t_step_s")
    if sx:
        ax.plot(sx, [v * 1e3 for v in sy], "k--", lw=1, label="step (measured)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.35)  # headroom for the legend above the stack
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.grid(alpha=0.3)


def _stragglers(ax, records) -> None:
    title = "step time per rank"
    xs, rows = per_rank(records, "t_step_s")
    counts = straggler_counts(records)
    if counts:
        rank, n = counts.most_common(1)[0]
        title += f" — straggler: rank {rank} ({n} of {sum(counts.values())} windows)"
    if xs:
        for rank in range(max(map(len, rows))):
            ax.plot(xs, [row[rank] * 1e3 if rank < len(row) else float("nan") for row in rows],
                    lw=2.5 if counts and rank == counts.most_common(1)[0][0] else 1, label=f"rank {rank}")
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    else:
        bx, lo = series(records, "step_s_min")
        _, mid = series(records, "step_s_median")
        _, hi = series(records, "step_s_max")
        if not bx or not len(bx) == len(mid) == len(hi):
            return _empty(ax, title, "no per-rank step times in these records")
        ax.fill_between(bx, [v * 1e3 for v in lo], [v * 1e3 for v in hi], alpha=0.3, label="min..max over ranks")
        ax.plot(bx, [v * 1e3 for v in mid], label="median")
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3)


def _memory(ax, records) -> None:
    title = "peak memory per rank (max over the run)"
    _, rows = per_rank(records, "mem_peak_bytes")
    if rows:
        n = max(map(len, rows))
        peak = [max(row[r] for row in rows if r < len(row)) / GIB for r in range(n)]
        ax.bar(range(n), peak, color="tab:purple")
        ax.set_xticks(range(n))
        ax.set_xlabel("rank")
        ax.set_ylabel("GiB")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        return
    xs, ys = series(records, "mem_peak_bytes")
    if not xs:
        return _empty(ax, title, "no memory figures in these records")
    _curve(ax, [{"step": x, "gib": y / GIB} for x, y in zip(xs, ys)], "gib", "peak memory (rank 0)", "GiB")


def _communication(ax, records) -> None:
    title = "bytes sent per step, by mesh axis"
    present = [k for k in AXES_BYTES if any(series(records, k)[1])]  # an axis that moved nothing is noise here
    if not present:
        return _empty(ax, title, "no bytes sent over any mesh axis in these records")
    for k in present:
        xs, ys = series(records, k)
        ax.plot(xs, [v / 2 ** 20 for v in ys], label=k[6:])
    ax.set_ylabel("MiB per step")
    ax.set_xlabel("step")
    ax.legend(fontsize=7, loc="upper left")
    bx, bw = series(records, "bw_gbps")
    if bx:
        twin = ax.twinx()
        twin.plot(bx, bw, "k:", label="achieved Gbit/s")
        twin.set_ylabel("Gbit/s achieved (dotted)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def headline(records: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    """One line saying what the run was and how it went (the summary's totals when there is one)."""
    last = records[-1]
    if summary:
        s = {k: _num(v) for k, v in summary.items()}
        return (f"{s.get('steps', last['step'])} steps on {s.get('world_size', '?')} ranks "
                f"(mesh {s.get('mesh', '?')}, sync {s.get('sync', '?')}): loss "
                f"{s.get('loss_first', '?')} -> {s.get('loss_last', '?')}, "
                f"{s.get('tokens_per_s', '?')} tokens/s, {s.get('wall_s', '?')} s")
    first = records[0]
    return (f"steps {first['step']}..{last['step']}: loss {_num(first.get('loss', '?'))} -> "
            f"{_num(last.get('loss', '?'))}, last window {_num(last.get('tokens_per_s', '?'))} tokens/s, "
            f"{_num(last.get('elapsed_s', '?'))} s elapsed")


def build_figure(records: list[dict[str, Any]], summary: dict[str, Any] | None, title: str) -> Any:
    """The page as a matplotlib Figure (axes[r][c] in reading order: loss, throughput, breakdown /
    per-rank step time, memory, bytes per axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    _curve(axes[0, 0], records, "loss", "loss (mean over the window and dp)", "loss")
    _curve(axes[0, 1], records, "tokens_per_s", "throughput", "tokens/s")
    _breakdown(axes[0, 2], records)
    _stragglers(axes[1, 0], records)
    _memory(axes[1, 1], records)
    _communication(axes[1, 2], records)
    fig.suptitle(f"{title}\n{headline(records, summary)}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def render_png(records: list[dict[str, Any]], summary: dict[str, Any] | None, out: Path, title: str) -> None:
    # no bbox_inches="tight": the page keeps its fixed size
    build_figure(records, summary, title).savefig(out, dpi=DPI, format="png")
