"""`trainlib bench zero --scale / --billion`: the largest GPT that trains on 2 ranks in a memory budget, per row.

    predicted_peak   a rank's peak for a GPT of any size from bench zero's memory rows: model states scale with
                     the parameter count, the rest of the measured peak with the size of a unit (one block)
    scale            predictions for the budget (24 GiB), then the largest GPT predicted to fit what is free now,
                     run a few steps per stage under an address-space cap; the run calibrates the prediction
    billion          a few steps of a >= 1B-parameter GPT with shard="parameters", if the memory free now holds it
"""
from __future__ import annotations

from typing import Any

from trainlib.testing import run_ranks

N_RANKS = 2
GIB = 1 << 30
ENV = {"DS_ACCELERATOR": "cpu"}


def gpt_for(params: int, d_model: int = 2048, heads: int = 16, seq: int = 128, vocab: int = 256) -> dict[str, int]:
    """The deepest GPT of width d_model with at most `params` parameters (>= 1 layer)."""
    from trainlib.benchmarks.zero_ranks import block_params, gpt_params

    m = {"vocab": vocab, "seq": seq, "layers": 1, "heads": heads, "d_model": d_model, "batch": 1}
    fixed = gpt_params(m) - block_params(m)
    m["layers"] = max(1, (params - fixed) // block_params(m))
    return m


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def predicted_peak(row: dict[str, Any], memory: dict[str, Any], m: dict[str, int]) -> tuple[int, int]:
    """(own, RSS-view) peak bytes per rank of GPT m for one row. Model states scale with the parameter count;
    the rest of the measured steps peak (gathered units, gradient wires, autograd's fresh gradients, AdamW's
    temporaries, activations) is taken to scale with the size of a unit (one block), as all but activations
    do; the build peak (the full fp32 GPT, then its shards) with the parameter count. RSS-view adds the peers'
    shared buffers that RSS (and the address space) count."""
    from trainlib.benchmarks.zero_ranks import block_params, gpt_params

    n, n0, unit0 = gpt_params(m), memory["params"], block_params(memory["model"])
    state = row.get("model_state_bytes_per_param", row["tensor_bytes_per_param"])
    transient_per_unit_param = max(0.0, row["steps_own_peak_delta_per_param"] - state) * n0 / unit0
    own = row["baseline_rss"] + max(n * state + transient_per_unit_param * block_params(m),
                                    n * row["build_peak_rss_delta_per_param"])
    shared = max(0.0, row["peak_rss_delta_per_param"] - row["peak_own_delta_per_param"]) * n
    return int(own), int(own + shared)


def largest_fitting(row: dict[str, Any], memory: dict[str, Any], per_rank: float) -> dict[str, int] | None:
    """The deepest GPT (d_model 2048) whose predicted own peak fits `per_rank` bytes, or None."""
    best = None
    for layers in range(1, 1000):
        m = {**gpt_for(0), "layers": layers}
        if predicted_peak(row, memory, m)[0] > per_rank:
            break
        best = m
    return best


def scale(memory: dict[str, Any], budget_gib: float, run_rows: list[str], steps: int) -> dict[str, Any]:
    """Predict per row the largest GPT for `budget_gib` over 2 ranks; run, for `run_rows` in order, the largest
    predicted to fit what is free at that moment (less 6 GiB for the others), each rank's address space capped 15% + 1 GiB above its
    predicted RSS-view peak: a wrong prediction fails in that rank instead of taking the machine."""
    from trainlib.benchmarks.zero_ranks import gpt_params, scale_rank

    margin = 0.5 * GIB  # per rank: allocator slack, gloo buffers, the batch
    pred: dict[str, Any] = {}
    for name, row in memory["rows"].items():
        if "error" in row:
            continue
        m = largest_fitting(row, memory, budget_gib * GIB / N_RANKS - margin)
        pred[name] = {"gpt": m, "max_params": gpt_params(m) if m else 0,
                      "predicted_peak_gib_per_rank": round(predicted_peak(row, memory, m)[0] / GIB, 2) if m else None}
    out: dict[str, Any] = {"budget_gib": budget_gib, "ranks": N_RANKS, "prediction": pred, "runs": {}}
    out["available_gib_at_start"] = round(available_bytes() / GIB, 2)
    from trainlib.benchmarks.bench_zero import row_specs

    specs = row_specs(True, True)
    for name in run_rows:
        row = memory["rows"].get(name, {})
        free = available_bytes()  # again per row: the others on this machine come and go
        run_gib = min(budget_gib, (free - 6 * GIB) / GIB)  # 6 GiB stay free for them
        m = largest_fitting(row, memory, run_gib * GIB / N_RANKS - margin) if "error" not in row and row else None
        if m is None:
            out["runs"][name] = {"skipped": f"{free / GIB:.1f} GiB available: no GPT predicted to fit a "
                                            f"{run_gib:.1f} GiB run (6 GiB left to the others)"}
            continue
        own, rss_view = predicted_peak(row, memory, m)
        cap = int(1.15 * (rss_view - row["baseline_rss"])) + GIB
        res = run_ranks(scale_rank, N_RANKS, m, specs[name], steps, cap, timeout_s=1800, env=ENV,
                        expect_failure=True)
        ranks = [r if isinstance(r, dict) else {"fits": False, "error": str(r)[-800:]} for r in res]
        run = {"gpt": m, "params": gpt_params(m), "run_budget_per_rank_gib": round(run_gib / N_RANKS, 2),
               "predicted_peak_gib_per_rank": round(own / GIB, 2),
               "peak_rss_gib_per_rank": [round(r["peak_rss"] / GIB, 2) for r in ranks if "peak_rss" in r],
               "fits": all(r.get("fits") for r in ranks), "ranks": ranks}
        if run["fits"]:
            run["calibrated"] = calibrated(row, ranks, m, budget_gib * GIB / N_RANKS - margin)
        out["runs"][name] = run
    return out


def calibrated(row: dict[str, Any], ranks: list[dict], m: dict[str, int], per_rank: float) -> dict[str, Any]:
    """The budget's largest GPT again, from the run itself, for the same width: its steps peak less its model
    states is what a rank needs besides them (baseline, activations, gathered units, wires), a constant; its
    build peak (the full fp32 GPT, then the shards) scales with the parameter count. So
    peak(n) = max(build_peak * n / n_run, steps_rest + n * model-state bytes/param). (RSS: conservative where
    peers' shared buffers count.)"""
    from trainlib.benchmarks.zero_ranks import gpt_params

    state = row.get("model_state_bytes_per_param", row["tensor_bytes_per_param"])
    n = gpt_params(m)
    rest = max(r["steps_peak_rss"] for r in ranks) - n * state
    build = max(r["build_peak_rss"] - r["baseline_rss"] for r in ranks) / n
    base = max(r["baseline_rss"] for r in ranks)

    def peak(k: int) -> float:
        return max(base + build * k, rest + k * state)

    best = None
    for layers in range(1, 1000):
        big = {**m, "layers": layers}
        if peak(gpt_params(big)) > per_rank:
            break
        best = big
    return {"steps_besides_model_states_gib": round(rest / GIB, 2), "build_peak_bytes_per_param": round(build, 3),
            "fit": {"baseline": base, "build_per_param": build, "steps_rest": rest, "state_per_param": state},
            "gpt": best, "max_params": gpt_params(best) if best else 0,
            "predicted_peak_gib_per_rank": round(peak(gpt_params(best)) / GIB, 2) if best else None}


def billion(memory: dict[str, Any], steps: int, scaled: dict[str, Any] | None = None) -> dict[str, Any]:
    """A >= 1B-parameter GPT (d_model 2048, 20 layers) with shard="parameters"; peak RSS per rank. Runs only if
    the memory free now holds both ranks' predicted peaks with 2 GiB to spare -- predicted from --scale's run of
    the same width when there is one (calibrated), else from trainlib-parameters' memory row (predicted_peak);
    each rank's address space is capped 15% + 1 GiB above its prediction."""
    from trainlib.benchmarks.zero_ranks import gpt_params, scale_rank

    m = gpt_for(1_010_000_000)
    n = gpt_params(m)
    row = memory["rows"].get("trainlib-parameters", {})
    if "steps_own_peak_delta_per_param" not in row:
        return {"gpt": m, "params": n, "skipped": f"no trainlib-parameters memory row: {row.get('error')}"}
    own, rss_view = predicted_peak(row, memory, m)
    fit = ((scaled or {}).get("runs", {}).get("trainlib-parameters", {}).get("calibrated") or {}).get("fit")
    if fit:  # stage 3 keeps no shared-memory buffers: own and RSS view agree
        own = rss_view = int(max(fit["baseline"] + fit["build_per_param"] * n,
                                 fit["steps_rest"] + fit["state_per_param"] * n))
    free = available_bytes()
    out = {"gpt": m, "params": n, "shard": "parameters", "steps": steps,
           "predicted_peak_gib_per_rank": round(own / GIB, 2), "prediction_from": "scale run" if fit else "memory row",
           "available_gib_at_start": round(free / GIB, 2)}
    if free < N_RANKS * own + 2 * GIB:
        return {**out, "skipped": f"{free / GIB:.1f} GiB available < {(N_RANKS * own + 2 * GIB) / GIB:.1f} GiB "
                                  f"(2 ranks x {own / GIB:.1f} GiB predicted + 2 GiB to spare)"}
    cap = int(1.15 * rss_view) + GIB
    spec = {"kind": "tl", "stage": 3, "precision": "fp32"}
    res = run_ranks(scale_rank, N_RANKS, m, spec, steps, cap, timeout_s=3000, env=ENV, expect_failure=True)
    ranks = [r if isinstance(r, dict) else {"fits": False, "error": str(r)[-800:]} for r in res]
    return {**out, "ranks": ranks, "peak_rss_gib_per_rank": [round(r["peak_rss"] / GIB, 2) for r in ranks
                                                             if "peak_rss" in r]}
