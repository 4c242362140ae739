"""The step breakdown over a log window, aggregated over all ranks: the trainer's metrics keys.

Every rank sums its StepStats over the window; at the window's end one small all-gather (a row of
floats per rank) gives every rank the same table, and aggregate() turns it into flat keys:

  t_step_s, t_forward_s, t_backward_s, t_sync_wait_s, t_optimizer_s, t_data_s, t_bubble_s, t_other_s
        per-step means over the window of the MEDIAN RANK (the rank whose t_step_s is the median;
        the lower one for an even count), so its parts add up to its t_step_s
  bytes_dp, bytes_tp, bytes_pp, bytes_ps
        bytes sent per step (window mean), SUMMED OVER RANKS: the job's traffic on that axis
  bw_gbps     achieved bandwidth, Gbit/s: the rank-median of (bytes a rank sent / its communication time)
  overlap     hidden / total communication time, pooled over ranks (0..1; 0 without communication)
  mem_peak_bytes   the largest peak over ranks (GPU allocator, or RSS high-water on CPU)
  straggler_rank   the rank with the most busy time (t_step_s - t_sync_wait_s - t_bubble_s): in
        synchronous training every rank's t_step_s is about the same -- the others wait for the
        slow one -- so the straggler is the rank that waited least
  step_s_min, step_s_median, step_s_max   over ranks, of each rank's per-step mean
  per_rank    {"t_step_s": [...], "t_sync_wait_s": [...], "t_bubble_s": [...], "mem_peak_bytes": [...]}
"""
from __future__ import annotations

import torch

from .step_stats import AXES, PHASES, StepStats

_TIMES = ("step", *PHASES)
_FIELDS = ("n", *(f"t_{p}_s" for p in _TIMES), *(f"bytes_{a}" for a in AXES), "comm_s", "exposed_comm_s",
           "mem_peak_bytes")


class WindowStats:
    """This rank's sums of StepStats since the last reset (mem_peak_bytes: the maximum)."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(_FIELDS, 0.0)

    def add(self, s: StepStats) -> None:
        d = self.sums
        d["n"] += 1
        for p in _TIMES:
            d[f"t_{p}_s"] += getattr(s, f"{p}_s")
        for a in AXES:
            d[f"bytes_{a}"] += s.bytes_by_axis.get(a, 0)
        d["comm_s"] += s.comm_s
        d["exposed_comm_s"] += s.exposed_comm_s
        d["mem_peak_bytes"] = max(d["mem_peak_bytes"], s.mem_peak_bytes)

    def merge(self, other: "WindowStats") -> None:
        for k, v in other.sums.items():
            self.sums[k] = max(self.sums[k], v) if k == "mem_peak_bytes" else self.sums[k] + v

    def reset(self) -> None:
        self.sums = dict.fromkeys(_FIELDS, 0.0)

    def gather(self, group=None) -> list[dict[str, float]]:
        """Every rank's sums, in rank order (collective over `group`, default the world)."""
        from .. import comm

        row = torch.tensor([self.sums[k] for k in _FIELDS], dtype=torch.float64)
        n = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
        if n == 1:
            return [dict(self.sums)]
        rows = [torch.empty_like(row) for _ in range(n)]
        comm.all_gather(rows, row, group=group)
        return [dict(zip(_FIELDS, r.tolist())) for r in rows]


def aggregate(rows: list[dict[str, float]]) -> dict:
    """The flat metrics keys (module docstring) from every rank's window sums; {} for an empty window."""
    if not rows or any(r["n"] <= 0 for r in rows):
        return {}
    mean = [{k: (v / r["n"] if k not in ("n", "mem_peak_bytes") else v) for k, v in r.items()} for r in rows]
    step = [m["t_step_s"] for m in mean]
    order = sorted(range(len(rows)), key=lambda r: step[r])
    med = order[(len(rows) - 1) // 2]
    out: dict = {f"t_{p}_s": round(mean[med][f"t_{p}_s"], 6) for p in _TIMES}
    for a in AXES:
        out[f"bytes_{a}"] = int(round(sum(m[f"bytes_{a}"] for m in mean)))
    bws = sorted(8 * sum(m[f"bytes_{a}"] for a in AXES) / m["comm_s"] / 1e9 if m["comm_s"] > 0 else 0.0
                 for m in mean)
    out["bw_gbps"] = round(bws[(len(bws) - 1) // 2], 4)
    comm_s = sum(m["comm_s"] for m in mean)
    exposed = sum(min(m["exposed_comm_s"], m["comm_s"]) for m in mean)
    out["overlap"] = round(max(0.0, 1.0 - exposed / comm_s), 4) if comm_s > 0 else 0.0
    out["mem_peak_bytes"] = int(max(m["mem_peak_bytes"] for m in mean))
    busy = [m["t_step_s"] - m["t_sync_wait_s"] - m["t_bubble_s"] for m in mean]
    out["straggler_rank"] = max(range(len(rows)), key=lambda r: busy[r])
    out.update(step_s_min=round(step[order[0]], 6), step_s_median=round(step[med], 6),
               step_s_max=round(step[order[-1]], 6))
    out["per_rank"] = {"t_step_s": [round(m["t_step_s"], 6) for m in mean],
                       "t_sync_wait_s": [round(m["t_sync_wait_s"], 6) for m in mean],
                       "t_bubble_s": [round(m["t_bubble_s"], 6) for m in mean],
                       "mem_peak_bytes": [int(m["mem_peak_bytes"]) for m in mean]}
    return out


def totals(rows: list[dict[str, float]], per_step: dict) -> dict:
    """Whole-run totals from per-step means: seconds and bytes times the steps measured."""
    n = int(min(r["n"] for r in rows)) if rows else 0
    keys = [f"t_{p}_s" for p in _TIMES] + [f"bytes_{a}" for a in AXES]
    return {"steps": n, **{k: (round(per_step[k] * n, 4) if k.startswith("t_") else int(per_step[k] * n))
                           for k in keys if k in per_step}}
