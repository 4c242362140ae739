"""Pipeline schedules as data: for each rank, the ordered list of compute actions it runs.

    F(s, i)  forward of stage s on microbatch i
    B(s, i)  full backward (input and weight gradients)
    I(s, i)  input-gradient half of the backward      } zero-bubble split
    W(s, i)  weight-gradient half, may run later       } (Qi et al. 2023, "Zero Bubble Pipeline Parallelism")

Stage s lives on rank s % p (with v virtual stages per rank, rank r holds r, r+p, r+2p, ...).
Communication is implied: F(s, i) receives from stage s-1 and sends to s+1, B/I sends back.

Bubble fraction (idle time / compute time per rank), equal stage costs:
    GPipe, 1F1B              (p-1)/m            (Huang et al. 2019; Narayanan et al. 2021)
    interleaved 1F1B         (p-1)/(v*m)        (Narayanan et al. 2021, sec. 2.2)
    ZB-H1 with F=I=W         (p-1)/(3m)         (Qi et al. 2023, sec. 3)
`Schedule.simulate()` replays the actions with unit costs (F=I=W=1, B=2): it proves a schedule
is deadlock-free and gives its exact bubble; `Schedule.table()` prints the step x rank grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

COST = {"F": 1, "B": 2, "I": 1, "W": 1}


class ScheduleError(ValueError):
    """An impossible schedule request, or a schedule that would deadlock."""


@dataclass(frozen=True)
class Action:
    kind: str  # F | B | I | W
    stage: int
    mb: int

    def __str__(self) -> str:
        return f"{self.kind}{self.stage}.{self.mb}"


@dataclass
class Schedule:
    name: str
    p: int
    m: int
    v: int
    actions: list[list[Action]]  # per rank
    _sim: dict | None = field(default=None, repr=False)

    @property
    def n_stages(self) -> int:
        return self.p * self.v

    def rank_of(self, stage: int) -> int:
        return stage % self.p

    def deps(self, a: Action) -> list[Action]:
        last = self.n_stages - 1
        if a.kind == "F":
            return [Action("F", a.stage - 1, a.mb)] if a.stage > 0 else []
        if a.kind == "W":
            return [Action("I", a.stage, a.mb)]
        out = [Action("F", a.stage, a.mb)]
        if a.stage < last:
            out.append(Action(self._bwd_kind(a.stage + 1, a.mb), a.stage + 1, a.mb))
        return out

    def _bwd_kind(self, stage: int, mb: int) -> str:
        return "I" if Action("I", stage, mb) in self._index else "B"

    @property
    def _index(self) -> set[Action]:
        return {a for acts in self.actions for a in acts}

    def validate(self) -> None:
        """Every stage runs F and (B, or I then W) for every microbatch, on its own rank, once."""
        for r, acts in enumerate(self.actions):
            seen = set()
            for a in acts:
                if self.rank_of(a.stage) != r:
                    raise ScheduleError(f"{self.name}: action {a} is on rank {r} but stage {a.stage} lives on rank "
                                        f"{self.rank_of(a.stage)}")
                if a in seen:
                    raise ScheduleError(f"{self.name}: action {a} appears twice on rank {r}")
                seen.add(a)
            for s in range(r, self.n_stages, self.p):
                for i in range(self.m):
                    has_b = Action("B", s, i) in seen
                    has_iw = Action("I", s, i) in seen and Action("W", s, i) in seen
                    if Action("F", s, i) not in seen or has_b == has_iw:
                        raise ScheduleError(f"{self.name}: rank {r} must run F and either B or I+W for stage {s} "
                                            f"microbatch {i}")
        self.simulate()

    def simulate(self) -> dict:
        """Replay with unit costs: start time of every action, makespan, bubble; raises on deadlock."""
        if self._sim is not None:
            return self._sim
        kinds = self._index
        finish: dict[Action, int] = {}
        start: dict[Action, int] = {}
        pos, clock = [0] * self.p, [0] * self.p
        total = sum(len(a) for a in self.actions)
        while len(finish) < total:
            progressed = False
            for r in range(self.p):
                while pos[r] < len(self.actions[r]):
                    a = self.actions[r][pos[r]]
                    deps = [d if d in kinds else Action("B", d.stage, d.mb) for d in self.deps(a)]
                    if any(d not in finish for d in deps):
                        break
                    start[a] = max([clock[r], *(finish[d] for d in deps)])
                    finish[a] = clock[r] = start[a] + COST[a.kind]
                    pos[r] += 1
                    progressed = True
            if not progressed:
                stuck = {r: str(self.actions[r][pos[r]]) for r in range(self.p) if pos[r] < len(self.actions[r])}
                raise ScheduleError(f"{self.name} (p={self.p}, m={self.m}, v={self.v}) deadlocks: ranks wait at {stuck}")
        busy = sum(COST[a.kind] for a in self.actions[0])
        makespan = max(clock)
        self._sim = {"start": start, "makespan": makespan, "busy_per_rank": busy, "bubble": makespan / busy - 1}
        return self._sim

    def table(self, mark: tuple[int, int] | None = None) -> str:
        """Step x rank grid from the unit-cost replay; `mark=(rank, index)` flags one action with '*'."""
        sim = self.simulate()
        rows = [["." for _ in range(self.p)] for _ in range(sim["makespan"])]
        for r, acts in enumerate(self.actions):
            for k, a in enumerate(acts):
                t = sim["start"][a]
                label = str(a) + ("*" if mark == (r, k) else "")
                rows[t][r] = label
                for extra in range(1, COST[a.kind]):
                    rows[t + extra][r] = "~"
        width = max(6, *(len(c) for row in rows for c in row))
        head = "step  " + " ".join(f"{'rank ' + str(r):<{width}}" for r in range(self.p))
        body = [f"{t:<5} " + " ".join(f"{c:<{width}}" for c in row) for t, row in enumerate(rows)]
        return "\n".join([f"{self.name}: p={self.p} m={self.m} v={self.v}", head, *body])

    def __str__(self) -> str:
        return self.table()


def gpipe(p: int, m: int) -> Schedule:
    """All forwards, then all backwards (Huang et al. 2019). m activations in flight per stage."""
    return Schedule("gpipe", p, m, 1, [[Action("F", r, i) for i in range(m)] + [Action("B", r, i) for i in range(m)]
                                       for r in range(p)])


def one_f_one_b(p: int, m: int) -> Schedule:
    """PipeDream-flush 1F1B (Narayanan et al. 2021): p-r-1 warm-up forwards, then alternate F and B.

    Same bubble as GPipe but at most p - r activations in flight on rank r."""
    acts = []
    for r in range(p):
        w = min(p - r - 1, m)
        a = [Action("F", r, i) for i in range(w)]
        for i in range(m - w):
            a += [Action("F", r, w + i), Action("B", r, i)]
        a += [Action("B", r, i) for i in range(m - w, m)]
        acts.append(a)
    return Schedule("1f1b", p, m, 1, acts)


def interleaved_1f1b(p: int, m: int, v: int = 2) -> Schedule:
    """Megatron's interleaved 1F1B: v model chunks per rank, microbatches in groups of p.

    The k-th forward on a rank is chunk (k // p) % v of microbatch (k // (p v)) p + k % p; backwards
    visit chunks in reverse. Warm-up: 2 (p - r - 1) + (v - 1) p forwards. Bubble (p-1)/(v m)."""
    if m % p:
        raise ScheduleError(f"interleaved 1F1B needs microbatches ({m}) to be a multiple of pp ({p}); "
                            f"use {((m + p - 1) // p) * p} microbatches")
    total = m * v

    def unit(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // p) % v
        return (v - 1 - chunk if backward else chunk), (k // (p * v)) * p + k % p

    acts = []
    for r in range(p):
        w = min(2 * (p - r - 1) + (v - 1) * p, total)
        f = [Action("F", c * p + r, i) for c, i in (unit(k, False) for k in range(total))]
        b = [Action("B", c * p + r, i) for c, i in (unit(k, True) for k in range(total))]
        a = f[:w]
        for k in range(total - w):
            a += [f[w + k], b[k]]
        a += b[total - w:]
        acts.append(a)
    return Schedule("interleaved", p, m, v, acts)


def zb_h1(p: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023): 1F1B with the backward split into I (input grad, on the critical
    path) and W (weight grad, off it). Rank r runs its I's as early as 1F1B runs B's but keeps r
    W's pending, so the chain of I's back to stage 0 is not delayed by W's on the later stages,
    and the pending W's fill the cool-down where 1F1B idles. With F = I = W the bubble is
    (p-1)/(3m); every rank holds at most p microbatches' activations (1F1B's rank 0 peak)."""
    acts = []
    for r in range(p):
        w = min(p - r - 1, m)
        a = [Action("F", r, i) for i in range(w)]
        pending: list[int] = []
        for i in range(m - w):
            a += [Action("F", r, w + i), Action("I", r, i)]
            pending.append(i)
            while len(pending) > r:
                a.append(Action("W", r, pending.pop(0)))
        for i in range(m - w, m):
            a += [Action("I", r, i), Action("W", r, pending.pop(0) if pending else i)]
            if a[-1].mb != i:
                pending.append(i)
        a += [Action("W", r, i) for i in pending]
        acts.append(a)
    return Schedule("zb-h1", p, m, 1, acts)


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved_1f1b, "zb-h1": zb_h1}


def theory_bubble(name: str, p: int, m: int, v: int = 1) -> float:
    return {"gpipe": (p - 1) / m, "1f1b": (p - 1) / m, "interleaved": (p - 1) / (v * m),
            "zb-h1": (p - 1) / (3 * m)}[name]


def build_schedule(name: str, p: int, m: int, v: int | None = None) -> Schedule:
    """The named schedule for p ranks and m microbatches (v virtual stages for "interleaved"), validated."""
    key = name.lower().replace("_", "-")
    key = {"zbh1": "zb-h1", "interleaved-1f1b": "interleaved", "1f1b-interleaved": "interleaved"}.get(key, key)
    if key not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if p < 1 or m < 1:
        raise ScheduleError(f"pp={p} and microbatches={m} must be >= 1")
    if key == "interleaved":
        s = interleaved_1f1b(p, m, 2 if v is None else v)
    else:
        if v not in (None, 1):
            raise ScheduleError(f"virtual_stages={v} only applies to the interleaved schedule, not {key!r}")
        s = SCHEDULES[key](p, m)
    s.validate()
    return s
