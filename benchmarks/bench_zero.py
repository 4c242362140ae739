"""Sharded data parallel (ZeRO-1/2/3): trainlib vs torch FSDP2 and DeepSpeed -- memory per parameter, step time, scale.

    trainlib bench zero [--quick] [--scale] [--billion]

Same model (trainlib's GPT), same AdamW, same batches, 2 ranks over gloo on CPU, fp32 unless marked bf16.
Rows: trainlib-none (today's replicated DataParallel), trainlib-{optimizer,gradients,parameters} (ZeRO-1/2/3),
the same with the bf16 policy (MixedPrecision(param_dtype=bf16, reduce_dtype=fp32): fp32 master slices),
fsdp2-gradients (fully_shard, reshard_after_forward=False: FSDP2's ZeRO-2-like mode; it has no ZeRO-1),
fsdp2-parameters (reshard_after_forward=True: ZeRO-3), both also with MixedPrecisionPolicy(bf16, fp32 reduce),
deepspeed-zero{1,2,3} (DS_ACCELERATOR=cpu, gloo).

1. Memory, each row alone in the process (one at a time, fresh state): model-state bytes per parameter =
   the distinct tensor storages reachable from the model and optimizer (params, grads, optimizer state,
   flat buckets, master copies), the largest of three points of a step once the optimizer has state
   (after forward, after backward, after the update), vs the ZeRO formula (see `formula`); and the peak
   RSS above the pre-build baseline (VmHWM), which adds activations, transient buffers and the full model
   every row builds before sharding it.
2. Step time, in a fresh group (glibc's allocator as a training process has it): every fp32 row (and, in the
   full run, trainlib's and FSDP2's bf16 stage 2/3 rows) built side by side from the same weights, stepped in
   rotating order
   (medians of alternating repetitions); ratios trainlib/FSDP2, trainlib/DeepSpeed at the same stage and
   trainlib stage k / trainlib unsharded; each row's losses and final weights vs trainlib-none's.
   The full run repeats the trainlib/DeepSpeed rows on the same GPT with one sequence per rank, where
   communication is a larger share of the step ("step_comm"), beside the floor: the bare model and AdamW
   with no wrapper and no communication (zero_floor.py), the lowest step time any runtime could reach.
3. --scale (zero_scale.py): the largest GPT predicted to train on 2 ranks in 24 GiB per row, from the measured
   memory rows; per trainlib stage the largest predicted to fit the memory free now is run a few steps with
   each rank's address space capped (RLIMIT_AS), so a wrong prediction fails in that rank, not on the
   machine, and the run calibrates the 24 GiB prediction.
4. --billion: a few steps of a >= 1B-parameter GPT with shard="parameters", peak RSS per rank (if it fits now).
5. Activation checkpointing: benchmarks.ac_memory (none / full / selective): activation bytes kept vs time.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from typing import Any

from trainlib.benchmarks.harness import median
from trainlib.testing import run_ranks

N_RANKS = 2
REFERENCE = "trainlib-none"
STAGES = {0: "none", 1: "optimizer", 2: "gradients", 3: "parameters"}
TOLERANCE = 0.10  # measured model-state bytes/param within 10% of the formula
TARGETS = {"fsdp2": 1.0, "deepspeed": 0.7, "unsharded": 1.15}  # step-time ratio ceilings (issue 11)
# bf16 rows that join the step-time group in the full run: trainlib vs FSDP2 at the same stage and policy
BF16_STEP_ROWS = ("trainlib-gradients-bf16", "trainlib-parameters-bf16",
                  "fsdp2-gradients-bf16", "fsdp2-parameters-bf16")
ENV = {"DS_ACCELERATOR": "cpu"}

# GPT shapes: memory rows want model states to dwarf activations; step rows a model whose step is
# compute and communication in proportions like a real one's (and that fits the time budget)
MODELS = {
    "memory": {"vocab": 256, "seq": 64, "layers": 8, "heads": 8, "d_model": 512, "batch": 2},
    "memory_quick": {"vocab": 256, "seq": 32, "layers": 2, "heads": 4, "d_model": 256, "batch": 2},
    "step": {"vocab": 256, "seq": 128, "layers": 4, "heads": 4, "d_model": 256, "batch": 8},
    "step_quick": {"vocab": 256, "seq": 32, "layers": 2, "heads": 4, "d_model": 128, "batch": 4},
    # the step model with one sequence per rank: a third of the compute, the same bytes to communicate
    "step_comm": {"vocab": 256, "seq": 128, "layers": 4, "heads": 4, "d_model": 256, "batch": 1},
}


def formula(stage: int, d: int, precision: str = "fp32") -> float:
    """Model-state bytes per parameter per rank, ZeRO's accounting (Rajbhandari et al. 2020, sec. 3/5):
    params + grads + K/d of optimizer state, each term divided by d once its stage shards it.

    fp32 + AdamW: params 4, grads 4, K = 8 (exp_avg, exp_avg_sq; the fp32 parameters are their own
    master copy): 16, 4+4+8/d, 4+(4+8)/d, (4+4+8)/d.  bf16 policy with fp32 reduce: bf16 params 2, fp32
    gradient buffer 4, K = 12 (fp32 master + exp_avg + exp_avg_sq): 18, 2+4+12/d (Megatron's distributed
    optimizer, 6+12/d), 2+(4+12)/d, (2+4+12)/d. (The paper's mixed-precision case has 2-byte gradients:
    2+2+12/d at stage 1.)"""
    p, g, k = (4, 4, 8) if precision == "fp32" else (2, 4, 12)
    if stage == 0:
        return p + g + k
    if stage == 1:
        return p + g + k / d
    if stage == 2:
        return p + (g + k) / d
    return (p + g + k) / d


def formula_text(stage: int, precision: str) -> str:
    fp32 = {0: "4+4+8 = 16", 1: "4+4+8/d", 2: "4+(4+8)/d", 3: "(4+4+8)/d"}
    bf16 = {0: "2+4+12 = 18", 1: "2+4+12/d (Megatron 6+12/d)", 2: "2+(4+12)/d", 3: "(2+4+12)/d"}
    return (fp32 if precision == "fp32" else bf16)[stage]


def row_specs(tl_ok: bool, ds_ok: bool) -> dict[str, dict[str, Any]]:
    """Every row of the benchmark; trainlib's sharded rows need the shard= API, DeepSpeed rows DeepSpeed."""
    specs: dict[str, dict[str, Any]] = {REFERENCE: {"kind": "tl", "stage": 0, "precision": "fp32"}}
    if tl_ok:
        for s in (1, 2, 3):
            specs[f"trainlib-{STAGES[s]}"] = {"kind": "tl", "stage": s, "precision": "fp32"}
        for s in (0, 1, 2, 3):
            specs[f"trainlib-{STAGES[s]}-bf16"] = {"kind": "tl", "stage": s, "precision": "bf16"}
    for p in ("fp32", "bf16"):  # bf16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
        sfx = "" if p == "fp32" else "-bf16"
        specs[f"fsdp2-gradients{sfx}"] = {"kind": "fsdp2", "stage": 2, "precision": p}
        specs[f"fsdp2-parameters{sfx}"] = {"kind": "fsdp2", "stage": 3, "precision": p}
    if ds_ok:
        for s in (1, 2, 3):
            specs[f"deepspeed-zero{s}"] = {"kind": "ds", "stage": s, "precision": "fp32"}
    return specs


def deepspeed_status() -> str | None:
    from trainlib.benchmarks.bench_dp import deepspeed_status as status

    return status()


# ---- 1 + 2: spawned groups -----------------------------------------------------------------------------------
def measure(quick: bool, specs: dict[str, dict[str, Any]], reps: int, k: int, mem_reps: int,
            warm: bool) -> dict[str, Any]:
    from trainlib.benchmarks.zero_ranks import group

    mem_model = MODELS["memory_quick" if quick else "memory"]
    step_model = MODELS["step_quick" if quick else "step"]
    step_specs = {n: s for n, s in specs.items() if s["precision"] == "fp32" or (not quick and n in BF16_STEP_ROWS)}
    ranks = run_ranks(group, N_RANKS, mem_model, specs, 3, mem_reps, None, {}, 0, 0, warm, timeout_s=1800, env=ENV)
    out = {"memory": memory_rows(mem_model, specs, [r["memory"] for r in ranks])}
    # step times in a group of their own: the memory phase pins glibc's mmap threshold (so that freed
    # tensors leave RSS), and a process so pinned page-faults every large allocation in again -- every
    # candidate's step measured 25-35% slower that way (benchmarks/zero_phases.py --pin), which no
    # training process pays
    ranks = run_ranks(group, N_RANKS, None, {}, 0, 0, step_model, step_specs, reps, k, warm, timeout_s=1800, env=ENV)
    out["step_time"] = step_rows(ranks[0]["steps"])
    if not quick:
        comm_specs = {n: s for n, s in specs.items() if s["precision"] == "fp32" and s["kind"] in ("tl", "ds")}
        comm_specs["floor"] = {"kind": "floor", "stage": 0, "precision": "fp32"}
        ranks = run_ranks(group, N_RANKS, None, {}, 0, 0, MODELS["step_comm"], comm_specs, reps, k, warm,
                          timeout_s=1800, env=ENV)
        out["step_time_comm"] = step_rows(ranks[0]["steps"])
    return out


def memory_rows(m: dict[str, int], specs: dict[str, dict], per_rank: list[dict[str, dict]]) -> dict[str, Any]:
    """Per row: the larger rank's figures (ranks own chunks of different sizes), per parameter, vs the formula."""
    from trainlib.benchmarks.zero_ranks import gpt_params

    n = gpt_params(m)
    rows: dict[str, Any] = {}
    for name, spec in specs.items():
        recs = [r[name] for r in per_rank]
        if any("error" in r for r in recs):
            rows[name] = {"error": next(r["error"] for r in recs if "error" in r)}
            continue
        tb, rss = max(r["tensor_bytes"] for r in recs), max(r["peak_rss_delta"] for r in recs)
        own = max(r["peak_own_delta"] for r in recs)
        row: dict[str, Any] = {"tensor_bytes": tb, "tensor_bytes_per_param": round(tb / n, 3),
                               "tensor_bytes_per_param_at": {p: round(max(r["tensor_bytes_at"][p] for r in recs) / n, 3)
                                                             for p in recs[0]["tensor_bytes_at"]},
                               "peak_rss_delta": rss, "peak_rss_delta_per_param": round(rss / n, 3),
                               "peak_rss_delta_all": [r["peak_rss_delta_all"] for r in recs],
                               "peak_own_delta": own, "peak_own_delta_per_param": round(own / n, 3),
                               **{f"{k}_per_param": round(max(r[k] for r in recs) / n, 3)
                                  for k in ("build_peak_rss_delta", "steps_peak_rss_delta", "steps_own_peak_delta")},
                               "baseline_rss": max(r["baseline_rss"] for r in recs)}
        row["seconds"] = max(r["seconds"] for r in recs)
        ms = max(r["model_state_bytes"] for r in recs) if recs[0]["model_state_bytes"] is not None else None
        if ms is not None:  # held storage = model states + communication buffers kept between steps
            row.update({"model_state_bytes": ms, "model_state_bytes_per_param": round(ms / n, 3),
                        "model_state_bytes_per_param_at": {
                            p: round(max(r["model_state_bytes_at"][p] for r in recs) / n, 3)
                            for p in recs[0]["model_state_bytes_at"]},
                        "buffer_bytes_per_param": round((tb - ms) / n, 3)})
        # what the formula is held to: model states where they are separable from buffers (trainlib, FSDP2),
        # else everything held (DeepSpeed: its flat buffers and partitions are one object graph).
        # fsdp2-gradients is held to stage 2's formula: it keeps the gathered parameters from forward to
        # backward (4 + 12/d after forward), then reshards (16/d after backward)
        f = formula(spec["stage"], N_RANKS, spec["precision"])
        got = (ms if ms is not None else tb) / n
        row.update({"formula": formula_text(spec["stage"], spec["precision"]), "formula_bytes_per_param": f,
                    "compared": "model_state_bytes" if ms is not None else "tensor_bytes",
                    "measured_over_formula": round(got / f, 4), "within_tolerance": abs(got / f - 1) <= TOLERANCE,
                    "held_over_formula": round(tb / n / f, 4)})
        rows[name] = row
    return {"params": n, "model": m, "rows": rows}


def step_rows(res: dict[str, Any]) -> dict[str, Any]:
    med = {n: median(ts) for n, ts in res["step_s"].items()}
    res["median_step_ms"] = {n: round(t * 1e3, 3) for n, t in med.items()}
    ratios: dict[str, float] = {}
    pairs = [(f"trainlib-{STAGES[s]}", f"deepspeed-zero{s}", "deepspeed") for s in (1, 2, 3)]
    pairs += [(f"trainlib-{x}{p}", f"fsdp2-{x}{p}", "fsdp2")
              for p in ("", "-bf16") for x in ("gradients", "parameters")]
    pairs += [(f"trainlib-{STAGES[s]}", REFERENCE, "unsharded") for s in (1, 2, 3)]
    checks: dict[str, bool | None] = {}
    for a, b, peer in pairs:
        if a in med and b in med:
            key = f"{a}/{b}"
            ratios[key] = round(med[a] / med[b], 4)
            # stage 3 pays its all-gathers: no target against unsharded (the issue sets one at stage 1/2)
            checks[key] = None if (peer == "unsharded" and a.endswith("parameters")) else ratios[key] <= TARGETS[peer]
    if "floor" in med:   # how low any runtime could go: the target is out of reach where floor/peer > target
        for s in (1, 2, 3):
            if f"deepspeed-zero{s}" in med:
                ratios[f"floor/deepspeed-zero{s}"] = round(med["floor"] / med[f"deepspeed-zero{s}"], 4)
    res["ratios"], res["meets_target"] = ratios, checks
    return res


# ---- 5: activation checkpointing ------------------------------------------------------------------------------
def _ac_rank(quick: bool) -> dict[str, Any]:
    """Full: ac_memory's own run (a GPT of 8 layers x 256, seq 256, batch 16). Quick: a small GPT, 3 repetitions."""
    import torch

    from trainlib.benchmarks import ac_memory
    from trainlib.models.gpt import GPT, GPTConfig

    torch.set_num_threads(1)
    if not quick:
        return ac_memory.run(False)
    cfg = GPTConfig(seq_len=64, n_layer=2, n_head=4, d_model=64)
    x = torch.randint(0, cfg.vocab_size, (8, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    rows = ac_memory.compare(lambda: GPT(cfg, seed=0), (x, (3 * x + 1) % cfg.vocab_size), repeats=3)
    return {"model": {"config": cfg.__dict__, "batch": 8}, "repeats": 3, "modes": rows}


def activation_checkpointing(quick: bool) -> dict[str, Any]:
    if importlib.util.find_spec("trainlib.benchmarks.ac_memory") is None:
        return {"error": "benchmarks/ac_memory.py is not in this checkout"}
    try:
        return run_ranks(_ac_rank, 1, quick, timeout_s=900, init=False)[0]
    except Exception as e:  # another module's failure is recorded here, not fatal to the ZeRO figures
        return {"error": f"{type(e).__name__}: {e}"[-2000:]}


# ---- entry ---------------------------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainlib bench zero", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", action="store_true", help="predict the largest GPT per stage in --budget-gib; run "
                                                        "the largest that fits the memory free now (minutes)")
    p.add_argument("--budget-gib", type=float, default=24.0, help="memory of the 2 ranks together (default 24)")
    p.add_argument("--billion", action="store_true", help="a few steps of a >= 1B-parameter GPT, shard=parameters "
                                                          "(needs ~16 GiB free; minutes)")
    args = p.parse_args(argv)
    if args.budget_gib <= 0:
        p.error(f"--budget-gib={args.budget_gib}: must be positive, e.g. 24")
    return args


def run(quick: bool, argv: list[str] | None = None) -> dict:
    from trainlib.benchmarks.zero_ranks import trainlib_sharding_available

    args = parse(argv or [])
    tl_error = trainlib_sharding_available()
    ds_error = deepspeed_status()
    specs = row_specs(tl_error is None, ds_error is None)
    reps, k = (3, 1) if quick else (15, 1)
    t0 = time.perf_counter()
    res = measure(quick, specs, reps, k, mem_reps=1 if quick else 2, warm=not quick)
    phase_s = {"memory_and_step_time": round(time.perf_counter() - t0, 1)}
    out: dict[str, Any] = {
        "definitions": {"ranks": N_RANKS, "backend": "gloo (CPU)", "optimizer": "torch AdamW(lr=3e-4, foreach=False)",
                        "repetitions": reps, "steps_per_repetition": k, "statistic": "median",
                        "tensor_bytes": "everything held: distinct storages reachable from the model, optimizer and "
                                        "wrapper/engine, max over after-forward/after-backward/after-step of steps "
                                        "2-3, larger rank; another rank's shared-memory buffers mapped here count 0",
                        "model_state_bytes": "the same walk from the model states only (parameters and their grads, "
                                             "the optimizer, the buckets' parameter/master/gradient storage), without "
                                             "communication buffers; what the formula is held to (DeepSpeed: "
                                             "tensor_bytes, not separable); buffer_bytes = tensor - model_state",
                        "peak_rss_delta": "VmHWM - RSS before building the row (row alone in the process), larger "
                                          "rank; min over repetitions",
                        "peak_own_delta": "peak_rss_delta less the peers' share of shared-memory buffers that RSS "
                                          "counts in full (max RSS - PSS at the probes, above its baseline): "
                                          "this rank's own peak; what --scale predicts from",
                        "formula": formula.__doc__.split("\n\n")[0].replace("\n", " "),
                        "tolerance": TOLERANCE, "targets": TARGETS,
                        "fsdp2_stages": "FSDP2 has no ZeRO-1; fsdp2-gradients = fully_shard(reshard_after_forward="
                                        "False), its ZeRO-2-like mode (parameters stay gathered from forward to "
                                        "backward, then reshard); fsdp2-parameters = reshard_after_forward=True",
                        "deepspeed_config": "fp32, buckets (reduce/allgather/stage3 prefetch) = one block's "
                                            "parameters, other settings DeepSpeed's defaults",
                        "models": {k_: v for k_, v in MODELS.items() if k_.endswith("_quick") == quick}},
        "trainlib_sharding_error": tl_error, "deepspeed_error": ds_error,
        "unavailable_rows": {**({f"trainlib-{STAGES[s]}{p}": tl_error for s in (1, 2, 3) for p in ("", "-bf16")}
                                if tl_error else {}),
                             **({f"deepspeed-zero{s}": ds_error for s in (1, 2, 3)} if ds_error else {})},
        **res}
    t0 = time.perf_counter()
    out["activation_checkpointing"] = activation_checkpointing(quick)
    phase_s["activation_checkpointing"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    if args.scale or args.billion:
        from trainlib.benchmarks import zero_scale
    if args.scale:
        # stage 3 first: the row the claim (well over 1B in 24 GiB) rests on gets the most memory
        runnable = [n for n in ("trainlib-parameters", "trainlib-gradients", "trainlib-optimizer", "trainlib-none")
                    if n in specs]
        out["scale"] = zero_scale.scale(res["memory"], args.budget_gib, runnable, steps=2)
    if args.billion:
        out["billion"] = (zero_scale.billion(res["memory"], 3, out.get("scale")) if tl_error is None
                          else {"skipped": tl_error})
    if args.scale or args.billion:
        out["result_suffix"] = "-scale" if not args.billion else "-billion"
        phase_s["scale_and_billion"] = round(time.perf_counter() - t0, 1)
    out["phase_s"] = phase_s
    out["summary"] = headline(out)
    return out


def headline(out: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for name, row in out["memory"]["rows"].items():
        if "measured_over_formula" in row:
            s[f"memory:{name}:bytes_per_param"] = row.get("model_state_bytes_per_param", row["tensor_bytes_per_param"])
            s[f"memory:{name}:over_formula"] = row["measured_over_formula"]
            s[f"memory:{name}:held_over_formula"] = row["held_over_formula"]
    s["memory:trainlib_rows_within_10pct"] = all(r.get("within_tolerance", False)
                                                 for n, r in out["memory"]["rows"].items() if n.startswith("trainlib"))
    st = out["step_time"]
    for key, v in st["ratios"].items():
        s[f"step:{key}"] = v
    s["step:targets_met"] = {k_: v for k_, v in st["meets_target"].items() if v is not None}
    if "step_time_comm" in out:
        for key, v in out["step_time_comm"]["ratios"].items():
            s[f"step_comm:{key}"] = v
        s["step_comm:targets_met"] = {k_: v for k_, v in out["step_time_comm"]["meets_target"].items()
                                      if v is not None}
    diffs = st["max_loss_diff_vs_reference"]
    s["step:max_loss_diff_fp32_vs_trainlib-none"] = max(v for n, v in diffs.items() if not n.endswith("-bf16"))
    if any(n.endswith("-bf16") for n in diffs):
        s["step:max_loss_diff_bf16_vs_trainlib-none"] = max(v for n, v in diffs.items() if n.endswith("-bf16"))
    ac = out.get("activation_checkpointing", {})
    for mode, row in ac.get("modes", {}).items():
        if mode != "none" and "activation_ratio" in row:
            s[f"ac:{mode}:activation_ratio"] = round(row["activation_ratio"], 3)
            s[f"ac:{mode}:time_ratio"] = round(row["time_ratio"], 3)
    for name, p in out.get("scale", {}).get("prediction", {}).items():
        s[f"scale:{name}:max_params_pred"] = p["max_params"]
    for name, r in out.get("scale", {}).get("runs", {}).items():
        if "calibrated" in r:
            s[f"scale:{name}:max_params_calibrated"] = r["calibrated"]["max_params"]
            s[f"scale:{name}:ran_params"] = r["params"]
    if "billion" in out and out["billion"].get("peak_rss_gib_per_rank"):
        s["billion:params"] = out["billion"]["params"]
        s["billion:peak_rss_gib_per_rank"] = out["billion"]["peak_rss_gib_per_rank"]
    return s


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, 6.5))
    rows = {n: r for n, r in result["memory"]["rows"].items() if "error" not in r}
    names = list(rows)
    a1.barh(names, [r["tensor_bytes_per_param"] for r in rows.values()], label="tensor storage held", color="tab:cyan")
    a1.barh(names, [r.get("model_state_bytes_per_param", r["tensor_bytes_per_param"]) for r in rows.values()],
            label="of it model states (DeepSpeed: not separable)", color="tab:blue")
    a1.barh(names, [r["peak_own_delta_per_param"] for r in rows.values()], height=0.25, color="tab:orange",
            label="peak RSS delta (less peers' shared buffers)")
    fx = [(i, r["formula_bytes_per_param"]) for i, r in enumerate(rows.values()) if "formula_bytes_per_param" in r]
    if fx:
        a1.scatter([f for _, f in fx], [i for i, _ in fx], color="k", marker="|", s=300, label="ZeRO formula", zorder=3)
    a1.set_xlabel("bytes per parameter, per rank")
    a1.set_title(f"model states, 2 ranks, GPT {result['memory']['params'] / 1e6:.1f}M params")
    a1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=7)
    ratios = result["step_time"]["ratios"]
    a2.barh(list(ratios), list(ratios.values()),
            color=["tab:green" if v else "tab:red" if v is False else "tab:gray"
                   for v in result["step_time"]["meets_target"].values()])
    a2.axvline(1.0, color="k", lw=0.8)
    a2.set_xlabel("ratio of medians, alternating reps (green: meets target)")
    a2.set_title("step time, same model, batch and stage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table_headline(s: dict) -> str:
    """This benchmark's line in `trainlib bench table` (benchmarks/README.md), from a result's summary."""
    from trainlib.benchmarks.harness import ratio_text

    st = ("optimizer", "gradients", "parameters")
    mem = "/".join(f"{s[f'memory:trainlib-{x}:bytes_per_param']:g}" for x in st)
    over = max(abs(v - 1) for k, v in s.items() if k.startswith("memory:trainlib") and k.endswith(":over_formula"))
    out = (f"trainlib ZeRO-1/2/3 fp32 model states {mem} bytes/param/rank at d=2 (formula 12/10/8; worst row "
           f"{over * 100:.1f}% off); step time ZeRO-3 {ratio_text(s['step:trainlib-parameters/fsdp2-parameters'])} of FSDP2, "
           f"ZeRO-1/2/3 {'/'.join(ratio_text(s[f'step:trainlib-{x}/deepspeed-zero{i + 1}']) for i, x in enumerate(st) if f'step:trainlib-{x}/deepspeed-zero{i + 1}' in s) or 'n/a'} of DeepSpeed, "
           f"ZeRO-1/2 {ratio_text(s['step:trainlib-optimizer/trainlib-none'])}/{ratio_text(s['step:trainlib-gradients/trainlib-none'])} "
           f"of unsharded")
    comm = [s.get(f"step_comm:trainlib-{x}/deepspeed-zero{i + 1}") for i, x in enumerate(st)]
    if all(v is not None for v in comm):
        out += f"; one sequence per rank: ZeRO-1/2/3 {'/'.join(ratio_text(v) for v in comm)} of DeepSpeed"
    pred = {k.split(":")[1]: v for k, v in s.items() if k.startswith("scale:") and k.endswith("max_params_pred")}
    cal = {k.split(":")[1]: v for k, v in s.items() if k.startswith("scale:") and k.endswith("max_params_calibrated")}
    if pred:  # a prediction (calibrated by a run of the same width where one ran), not a run of that size
        out += "; PREDICTED largest GPT in 24 GiB (* calibrated by a smaller run): " + ", ".join(
            f"{n.removeprefix('trainlib-')} {cal.get(n, v) / 1e9:.2f}B{'*' if n in cal else ''}"
            for n, v in pred.items() if n.startswith("trainlib-") and not n.endswith("bf16"))
    if "billion:params" in s:
        out += f"; {s['billion:params'] / 1e9:.2f}B-param GPT, ZeRO-3: peak RSS {s['billion:peak_rss_gib_per_rank']} GiB/rank"
    return out
