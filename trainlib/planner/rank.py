"""Predict every layout, rank the ones that fit by step time, and say why each loses to the one above.

    plans = rank(model, cluster, profile, global_batch=32)
    plans[0].layout, plans[0].step_s, plans[0].peak_bytes, plans[1].reason
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .layouts import Layout, enumerate_layouts
from .memory import MemoryBreakdown, peak_memory
from .profile import Profile
from .spec import ClusterSpec, ModelSpec
from .timing import TimeBreakdown, _group_span, step_time

COMPONENT_WORDS = {"compute": "compute", "tp": "tensor-parallel all-reduces", "bubble": "pipeline bubble",
                   "pp_actions": "pipeline per-action cost", "dp_sync": "exposed gradient sync",
                   "optimizer": "optimizer step"}


@dataclass
class Plan:
    layout: Layout
    time: TimeBreakdown
    memory: MemoryBreakdown
    fits: bool
    reason: str = ""      # why it ranks below the plan above it (or why it does not fit)

    @property
    def step_s(self) -> float:
        return self.time.total

    @property
    def peak_bytes(self) -> float:
        return self.memory.peak

    def to_json(self, global_batch: int) -> dict:
        return {"layout": self.layout.label(), "flags": self.layout.train_flags(global_batch),
                "step_s": round(self.step_s, 6), "peak_bytes": int(self.peak_bytes), "fits": self.fits,
                "time": self.time.as_dict(),
                "memory": {"states": int(self.memory.states), "activations": int(self.memory.activations),
                           "transient": int(self.memory.transient), "runtime": int(self.memory.runtime)},
                "reason": self.reason}


def shm_ranks(layout: Layout, cluster: ClusterSpec) -> int:
    """Ranks of a dp group that share one node's shared-memory transport: CPU, uncompressed all-reduce
    sync (compression and the parameter server take other paths); 1 when there is none."""
    if cluster.device != "cpu" or layout.sync != "allreduce" or layout.compress != "none" or layout.dp == 1:
        return 1
    return _group_span(cluster, layout.dp, layout.tp)[1]


def predict(model: ModelSpec, layout: Layout, cluster: ClusterSpec, prof: Profile, global_batch: int) -> Plan:
    t = step_time(model, layout, cluster, prof, global_batch)
    m = peak_memory(model, layout, global_batch, prof["runtime_bytes"], shm_ranks(layout, cluster),
                    accelerator=cluster.device != "cpu")
    return Plan(layout, t, m, m.peak <= cluster.memory_bytes)


def _differences(a: Layout, b: Layout) -> str:
    """What b changes relative to a, in the layout's words."""
    out = []
    for f in fields(Layout):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va != vb:
            out.append(f"{f.name} {va}->{vb}")
    return ", ".join(out)


def explain(better: Plan, worse: Plan) -> str:
    """'+3.1 ms (+4%): pipeline bubble +2.9 ms [pp 1->2, ...]': the component that grew the most."""
    dt = worse.step_s - better.step_s
    diff = _differences(better.layout, worse.layout)
    if dt <= 1e-9 * max(better.step_s, 1e-12):   # a tie on time: ranked by memory
        return f"same predicted time, +{(worse.peak_bytes - better.peak_bytes) / 2**20:.4g} MiB per device [{diff}]"
    deltas = {k: getattr(worse.time, k) - getattr(better.time, k) for k in COMPONENT_WORDS}
    key = max(deltas, key=deltas.get)
    pct = 100 * dt / better.step_s if better.step_s else 0.0
    return (f"+{dt * 1e3:.3g} ms (+{pct:.0f}%): {COMPONENT_WORDS[key]} +{deltas[key] * 1e3:.3g} ms "
            f"[{diff}]")


def rank(model: ModelSpec, cluster: ClusterSpec, prof: Profile, global_batch: int,
         precision: str = "fp32") -> list[Plan]:
    """Fitting plans by predicted step time (ties: less memory first), then those that do not fit."""
    plans = [predict(model, lay, cluster, prof, global_batch)
             for lay in enumerate_layouts(model, cluster, global_batch, precision)]
    fit = sorted((p for p in plans if p.fits), key=lambda p: (p.step_s, p.peak_bytes))
    for above, p in zip(fit, fit[1:]):
        p.reason = explain(above, p)
    nofit = sorted((p for p in plans if not p.fits), key=lambda p: p.peak_bytes)
    for p in nofit:
        p.reason = (f"does not fit: {p.peak_bytes / 2**30:.3g} GiB > {cluster.device_memory_gb:g} GiB per device "
                    f"(states {p.memory.states / 2**30:.3g}, activations {p.memory.activations / 2**30:.3g})")
    return fit + nofit
