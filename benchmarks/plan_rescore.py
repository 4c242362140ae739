"""Re-predict a stored `trainlib bench plan` validation with the planner as it is now, without re-running it.

    python -m trainlib.benchmarks.plan_rescore [benchmarks/results/plan-validation.json] [--profile P.json]
    python -m trainlib.benchmarks.plan_rescore RUN.json --with OTHER_RUN.json [--with ...]   # agreement, pooled
        (the earlier runs are kept in benchmarks/results/plan-validation-runs/, named by their start time)

A validation run takes ~22 minutes on 2 cores; its measurements do not depend on the cost model. This
takes the stored rows (layout, measured time and peak memory), re-ranks every (place, model) group with today's
trainlib.planner and the run's own profile (or --profile), and prints the summary the run would have
had: a change to the step-time model is scored in seconds. Each group's compute_efficiency is the one
the run re-fitted to its probe (backed out from the stored prediction of the group's first row), its
memory-bound figures scaled by the memory bandwidth the run sounded beside it (where recorded), so
with an unchanged model the predictions come back exactly (`drift` 0). A model change chosen by this
score is fitted to these measurements: confirm it with a fresh `trainlib bench plan` before trusting it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from typing import Any

from trainlib.benchmarks.paths import results_dir

CLUSTER_PLACE = "cluster 2x1 "   # bench_plan's place label for the emulated cluster, then the link rate


def _cluster(place: str, goodput_Bps: float | None):
    from trainlib.benchmarks.bench_plan import emulated_cluster, local_cluster

    if place.startswith(CLUSTER_PLACE):
        if not goodput_Bps:
            raise ValueError(f"rows of {place!r} but the file records no cluster goodput")
        return emulated_cluster(goodput_Bps, place.removeprefix(CLUSTER_PLACE))
    return local_cluster()


def _with_efficiency(prof, eff: float):
    p = copy.deepcopy(prof)
    p.values["compute_efficiency"] = eff
    return p


def _predict(prof, place: str, model: str, labels: set[str], goodput: float | None) -> dict[str, Any]:
    from trainlib.benchmarks.bench_plan import rank_layouts

    return {p.layout.label(): p for p in rank_layouts(model, _cluster(place, goodput), prof)
            if p.layout.label() in labels}


def _run_efficiency(prof, place: str, model: str, row: dict, goodput: float | None) -> float:
    """The compute_efficiency at which the model (as now) gives `row`'s stored compute seconds (its
    whole prediction for an older file without a breakdown): bisection, both fall as efficiency rises.
    The compute part alone, so that a change to the communication terms is not absorbed into it."""
    stored = (row.get("predicted_breakdown") or {}).get("compute")
    lo, hi = 1e-3, 10.0
    for _ in range(50):
        mid = (lo + hi) / 2
        p = _predict(_with_efficiency(prof, mid), place, model, {row["layout"]}, goodput)[row["layout"]]
        got, want = (p.time.compute, stored) if stored else (p.step_s, row["predicted_s"])
        lo, hi = (mid, hi) if got > want else (lo, mid)
    return (lo + hi) / 2


def _runtime_refit(prof):
    """runtime_bytes is the calibration probe's measured peak less what the memory model gives for it:
    with the memory model as it is now, from the peak the profile recorded (where it did)."""
    from trainlib.planner.calibrate import runtime_bytes

    ranks = (prof.measured or {}).get("per_rank") or []
    peaks = [r["probe_peak_bytes"] for r in ranks if "probe_peak_bytes" in r]
    if not peaks:
        return prof
    p = copy.deepcopy(prof)
    p.values["runtime_bytes"] = runtime_bytes(max(peaks), len(ranks))
    return p


def _feature_refit(prof):
    """A profile from before microbatch_block_s or dp_step_s was a figure: each fitted from the probes its
    calibration timed anyway (measured feature_probes_s: the probe in microbatches, at dp=2), where it did; and
    full checkpointing's figures fitted as calibrate fits them now (recompute_fit: before 2026-12-02 04:00 the
    recompute share was a second unknown)."""
    from trainlib.planner.calibrate import dp_step_fit, microbatch_fit, recompute_fit

    probes = (prof.measured or {}).get("feature_probes_s") or {}
    p = copy.deepcopy(prof)
    measured = {**probes, "probe_s": (prof.measured or {}).get("probe_s")}
    for key, fit, needs in (("microbatch_block_s", microbatch_fit, "probe_plain_micro_s"), ("dp_step_s", dp_step_fit, "dp2_s")):
        if prof.sources.get(key, "").startswith("default") and needs in probes:
            p.values[key] = fit(p.values, measured)
            p.sources[key] = "fitted by plan_rescore from the calibration's own feature probes"
    if "probe_full_s" in probes and measured["probe_s"]:
        p.values["recompute_share"], p.values["checkpoint_call_s"] = recompute_fit(
            p.values, measured, probes.get("probe_plain_s", measured["probe_s"]))
    return p


def _carried(prof, run_prof, refit: dict):
    """prof with every figure the run re-fitted (bench_plan._rows' "refit") carried over as a ratio to the
    run's own profile; a per-op figure the run did not record (or recorded at 0) moves as op_s did."""
    from trainlib.planner.calibrate import PER_OP

    p = copy.deepcopy(prof)
    for k, v in refit.items():
        if k != "compute_efficiency" and run_prof[k] > 0:
            p.values[k] = prof[k] * v / run_prof[k]
    for k in PER_OP:
        if k not in refit or run_prof[k] == 0:
            p.values[k] = prof[k] * refit["op_s"] / run_prof["op_s"]
    return p


def rescore(result: dict, profile=None) -> dict[str, Any]:
    """{"summary": bench_plan.summarize of the re-predicted rows, "rows": them, "drift": the largest
    relative change of a prediction against the stored one}."""
    from trainlib.benchmarks.bench_plan import summarize
    from trainlib.planner.calibrate import with_memory
    from trainlib.planner.profile import Profile

    run_prof = Profile.from_json(result["profile"], "the validation's profile")
    prof = _feature_refit(_runtime_refit(profile or run_prof))
    goodput = (result.get("cluster") or {}).get("goodput_Bps")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["place"], r["model"]), []).append(r)
    rows, drift = [], 0.0
    for (place, model), g in groups.items():
        run_g, prof_g = run_prof, prof
        refit = g[0].get("refit") or {}
        if "op_s" in refit:   # every figure the run re-fitted is recorded: each carried to `prof` as a ratio
            prof_g = _carried(prof, run_prof, refit)
            eff = refit["compute_efficiency"]
        else:
            mem = refit.get("mem_Bps")
            if mem:   # the memory bandwidth the run sounded beside this group, as a ratio carried to `prof`
                ratio = mem / run_prof["mem_Bps"]
                run_g = with_memory(run_prof, mem, "the validation's sounding")
                prof_g = with_memory(prof, prof["mem_Bps"] * ratio, "the validation's sounding")
            # the efficiency the run re-fitted, found under the run's own profile, then carried to `prof`
            eff = _run_efficiency(run_g, place, model, g[0], goodput)
        plans = _predict(_with_efficiency(prof_g, eff), place, model, {r["layout"] for r in g}, goodput)
        missing = sorted({r["layout"] for r in g} - plans.keys())
        if missing:
            raise ValueError(f"{place} / {model}: the planner no longer ranks {missing}; rescoring needs the same layouts")
        rank = {label: i + 1 for i, label in enumerate(sorted(plans, key=lambda k: plans[k].step_s))}
        for r in g:
            p = plans[r["layout"]]
            drift = max(drift, abs(p.step_s - r["predicted_s"]) / r["predicted_s"])
            kept = {k: v for k, v in r.items() if k != "predicted_probe_refit_s"}   # the run's, not this model's
            rows.append({**kept, "predicted_s": p.step_s, "planner_rank": rank[r["layout"]],
                         "time_error": abs(p.step_s - r["measured_s"]) / r["measured_s"],
                         # runs before 2026-12-02 04:00 scaled their steps to a probe's reading of the host's
                         # speed and kept the raw times beside
                         **({"raw_time_error": abs(p.step_s - r["raw_measured_s"]) / r["raw_measured_s"]}
                            if r.get("raw_measured_s") else {}),
                         "predicted_breakdown": p.time.as_dict(), "predicted_bytes": p.peak_bytes,
                         "memory_error": abs(p.peak_bytes - r["measured_bytes"]) / max(1.0, r["measured_bytes"])})
    return {"summary": summarize(rows), "rows": rows, "drift": drift}


def _key(r: dict) -> tuple[str, str, str]:
    return r["place"], r["model"], r["layout"]


def reproducibility(a: list[dict], b: list[dict]) -> dict[str, Any]:
    """How far two runs' measurements of the same layouts agree: the floor under any prediction's error read
    from one run. Relative differences (b over a) of step time (scaled and raw) and peak memory: median, p90,
    worst, how many over the worst-case target; Spearman of one run's times against the other's, per group."""
    from trainlib.benchmarks.bench_plan import TARGETS, spearman

    pa, pb = {_key(r): r for r in a}, {_key(r): r for r in b}
    common = [k for k in pa if k in pb]
    out: dict[str, Any] = {"layouts": len(common)}
    for field in ("measured_s", "raw_measured_s", "measured_bytes"):
        d = sorted(abs(pb[k][field] / pa[k][field] - 1) for k in common if pa[k].get(field) and pb[k].get(field))
        if d:
            out[field] = {"median": round(statistics.median(d), 4), "p90": round(d[int(0.9 * (len(d) - 1))], 4),
                          "worst": round(d[-1], 4), "over_worst_target": sum(x > TARGETS["worst_time_error"] for x in d)}
    rhos = {}
    for g in sorted({k[:2] for k in common}):
        ks = [k for k in common if k[:2] == g]
        rho = spearman([pa[k]["measured_s"] for k in ks], [pb[k]["measured_s"] for k in ks])
        if rho is not None:
            rhos[f"{g[0]} / {g[1]}"] = round(rho, 3)
    out["spearman_per_group"] = rhos
    return out


def pooled(runs: list[list[dict]]) -> list[dict]:
    """One validation from several runs' rows (each re-predicted with the model as it is now): per layout the
    median of every run's steps (each scaled to its own run's host speed; raw alike), the median of the
    runs' peak memory, and the geometric mean of the runs' predictions (each from its own calibration and
    re-fits): more repetitions of the same measurement, the same prediction's calibration noise averaged.
    The head-to-head duels are left out (the pooled medians decide the first choice)."""
    by = [{_key(r): r for r in rows} for rows in runs]
    out = []
    for k in (k for k in by[0] if all(k in b for b in by[1:])):
        rs = [b[k] for b in by]
        steps = [t for r in rs for t in r["all_s"]]
        raw = [t for r in rs for t in r.get("raw_all_s", [])]
        pred = math.exp(statistics.fmean(math.log(r["predicted_s"]) for r in rs))
        pbytes = math.exp(statistics.fmean(math.log(r["predicted_bytes"]) for r in rs))
        row = {"place": k[0], "model": k[1], "layout": k[2], "runs": len(rs), "predicted_s": pred,
               "measured_s": statistics.median(steps), "runs_measured_s": [r["measured_s"] for r in rs],
               "predicted_bytes": pbytes, "measured_bytes": statistics.median(r["measured_bytes"] for r in rs)}
        row["time_error"] = abs(pred - row["measured_s"]) / row["measured_s"]
        row["memory_error"] = abs(pbytes - row["measured_bytes"]) / max(1.0, row["measured_bytes"])
        if raw:
            row["raw_measured_s"] = statistics.median(raw)
            row["raw_time_error"] = abs(pred - row["raw_measured_s"]) / row["raw_measured_s"]
        out.append(row)
    for g in {(r["place"], r["model"]) for r in out}:
        members = sorted((r for r in out if (r["place"], r["model"]) == g), key=lambda r: r["predicted_s"])
        for i, r in enumerate(members):
            r["planner_rank"] = i + 1
    return out


def _brief(s: dict) -> dict[str, Any]:
    keys = ("median_time_error", "worst_time_error", "spearman_all", "spearman_min", "spearman_median",
            "median_memory_error", "worst_memory_error", "memory_within_10pct")
    return {**{k: s.get(k) for k in keys}, "top1_ok": sum(s["top1_ok"].values()), "groups": len(s["top1_ok"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainlib.benchmarks.plan_rescore", description=__doc__.split("\n\n")[0])
    p.add_argument("result", nargs="?", default=str(results_dir() / "plan-validation.json"))
    p.add_argument("--profile", help="a planner profile to use instead of the run's own")
    p.add_argument("--json", help="also write the re-predicted validation (the result's format) to this path")
    p.add_argument("--with", dest="others", action="append", default=[], metavar="RESULT",
                   help="another run's result: print how far the runs' measurements agree (reproducibility) "
                        "and the validation pooled over all of them (pooled)")
    args = p.parse_args(argv)
    from trainlib.benchmarks.bench_plan import summarize
    from trainlib.planner.profile import load

    with open(args.result) as f:
        result = json.load(f)
    out = rescore(result, load(args.profile) if args.profile else None)
    if args.others:
        runs = [out["rows"]]
        for path in args.others:
            with open(path) as f:
                runs.append(rescore(json.load(f), load(args.profile) if args.profile else None)["rows"])
        pool = summarize(pooled(runs))
        print(json.dumps({"runs": [_brief(summarize(r)) for r in runs],
                          "reproducibility": [reproducibility(runs[0], r) for r in runs[1:]],
                          "pooled": {**_brief(pool), "spearman_per_group": {k: g["spearman"] for k, g in
                                                                           pool["groups"].items()}}}, indent=1))
        return 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "rows": out["rows"], "summary": out["summary"]}, f, indent=1)
    print(json.dumps({"stored": _brief(result["summary"]), "now": _brief(out["summary"]),
                      "max_prediction_drift": round(out["drift"], 4),
                      "groups_now": {k: {"first_over_best": g["first_over_best"], "median_time_error":
                                         g["median_time_error"], "spearman": g["spearman"]}
                                     for k, g in out["summary"]["groups"].items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
