"""Load a checkpoint under another layout: trainlib's resharding restore vs torch DCP's load.

    trainlib bench reshard [--quick]

One model state S (trainlib's GPT after one AdamW step: fp32 weights + exp_avg + exp_avg_sq + step;
d_model 512 x 8 layers = 25M params, 0.3 GB, or a small GPT with --quick) travels
    1 rank (unsharded)  --save-->  load on 2 ranks sharded  --save-->  load on 1 rank unsharded
in each system, on CPU gloo ranks (run_ranks):
    trainlib   saved by resume.state_of + checkpoint.save with the layout, loaded by resume.restore
               (what `trainlib train` calls on start; it sees the layout change and reshards: every
               new rank reads only the old ranks' files that hold its slices); 2-rank layout ZeRO-3
               (dp.shard=parameters), plus a tp=2 row (no DCP peer here: trainlib only)
    DCP        torch.distributed.checkpoint: get_state_dict + dcp.save; loaded by get_state_dict +
               dcp.load + set_state_dict (torch's resume recipe); 2-rank layout FSDP2 (fully_shard on
               every block, then the root); 1 rank is a plain module in a 1-rank group
    floor      read the old rank files trainlib reads (all of them, in these directions) into memory
               and sha256 them, as its verified read does: the cost of the bytes alone
Each direction's candidates run in one process group, alternating rounds, medians of the slowest
rank's load-call time (reshard_ranks.py says what is timed), and the median of the per-round
trainlib/DCP ratios (paired: both ran in the same round, so a slow phase of the machine hits both).
Before each load the target is zeroed and its optimizer state dropped; after each load every rank's
weights, moments and step count must equal its cut of S bit for bit (S kept aside in a safetensors
file), else `correct` is false.
read_bytes: what the loading process read through read() during the call (/proc/self/io rchar, page
cache included). Files are warm in the page cache (a restart on the same node; a cold read from
disk or S3 would add the same bytes/bandwidth to both). Ratios trainlib/DCP per direction (the
issue sets no target for them) and trainlib/floor.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from trainlib.benchmarks import reshard_ranks as rr
from trainlib.benchmarks.harness import median as _median
from trainlib.testing import run_ranks

MB = 1024 * 1024
FULL = ["--model.d_model", "512", "--model.n_layer", "8", "--model.n_head", "8", "--model.seq_len", "128",
        "--train.batch_size", "4"]
QUICK = ["--model.d_model", "64", "--model.n_layer", "2", "--model.n_head", "2", "--model.seq_len", "32",
         "--train.batch_size", "4"]
ZERO3, TP2 = ["--dp.shard", "parameters"], ["--mesh.tp", "2"]
# direction -> (world size of the loading ranks, jobs); sources are made by the phase before
TO_TWO = [
    {"name": "trainlib:1->2zero3", "system": "trainlib", "layout": ZERO3, "source": "tl-1", "save_as": "tl-2zero3"},
    {"name": "dcp:1->2fsdp2", "system": "dcp", "layout": [], "source": "dcp-1", "save_as": "dcp-2fsdp2"},
    {"name": "trainlib:1->2tp2", "system": "trainlib", "layout": TP2, "source": "tl-1", "save_as": "tl-2tp2"},
    {"name": "floor:1->2", "system": "floor", "layout": [], "source": "tl-1"},
]
TO_ONE = [
    {"name": "trainlib:2zero3->1", "system": "trainlib", "layout": [], "source": "tl-2zero3"},
    {"name": "dcp:2fsdp2->1", "system": "dcp", "layout": [], "source": "dcp-2fsdp2"},
    {"name": "trainlib:2tp2->1", "system": "trainlib", "layout": [], "source": "tl-2tp2"},
    {"name": "floor:2zero3->1", "system": "floor", "layout": [], "source": "tl-2zero3"},
]
PAIRS = {"1->2 sharded": ("trainlib:1->2zero3", "dcp:1->2fsdp2"),
         "2 sharded->1": ("trainlib:2zero3->1", "dcp:2fsdp2->1")}
FLOORS = {"1->2 sharded": ("trainlib:1->2zero3", "floor:1->2"),
          "2 sharded->1": ("trainlib:2zero3->1", "floor:2zero3->1")}


def _row(per_rank: list[dict], name: str) -> dict:
    """One candidate's figures from every rank's log (medians of the slowest rank come from rank 0)."""
    r0 = per_rank[0][name]
    reads = [sorted(r[name]["read_bytes"])[len(r[name]["read_bytes"]) // 2] for r in per_rank]
    return {"median_s": round(r0["median_s"], 5), "all_s": [round(x, 5) for x in r0["all_s"]],
            "rank_median_s": [round(sorted(r[name]["rank_s"])[len(r[name]["rank_s"]) // 2], 5) for r in per_rank],
            "read_bytes_per_rank": reads, "correct": all(not r[name]["mismatch"] for r in per_rank),
            "mismatch": sorted({m for r in per_rank for m in r[name]["mismatch"]})[:10]}


def run(quick: bool) -> dict:
    model = QUICK if quick else FULL
    reps = 3 if quick else 9
    timeout = 300 if quick else 1800
    work = Path(tempfile.mkdtemp(prefix="bench-reshard-"))
    try:
        made = run_ranks(rr.make_state, 1, model, str(work), timeout_s=timeout)[0]
        two = run_ranks(rr.load_phase, 2, model, str(work), reps, TO_TWO, timeout_s=timeout)
        one = run_ranks(rr.load_phase, 1, model, str(work), reps, TO_ONE, timeout_s=timeout)
        ck_bytes = {d: rr.dir_bytes(work / d) for d in ("tl-1", "dcp-1", "tl-2zero3", "dcp-2fsdp2", "tl-2tp2")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {j["name"]: _row(two, j["name"]) for j in TO_TWO}
    rows.update({j["name"]: _row(one, j["name"]) for j in TO_ONE})
    ratios = {d: round(rows[t]["median_s"] / rows[p]["median_s"], 3) for d, (t, p) in PAIRS.items()}
    # per round: both ran in the same round, so a slow phase of the shared machine hits both; the median
    # of these paired ratios is steadier than the ratio of medians on a busy machine
    paired = {d: round(_median([a / b for a, b in zip(rows[t]["all_s"], rows[p]["all_s"])]), 3)
              for d, (t, p) in PAIRS.items()}
    floor_ratios = {d: round(rows[t]["median_s"] / rows[f]["median_s"], 3) for d, (t, f) in FLOORS.items()}
    read_ratios = {d: round(max(rows[t]["read_bytes_per_rank"]) / max(1, max(rows[p]["read_bytes_per_rank"])), 3)
                   for d, (t, p) in PAIRS.items()}
    state_mb = made["params"] * 3 * 4 / MB   # fp32 weights + two AdamW moments
    summary = {"params": made["params"], "state_MB": round(state_mb, 1), "reps": reps,
               "correct": all(r["correct"] for r in rows.values()),
               **{f"load_s:{n}": r["median_s"] for n, r in rows.items()},
               **{f"ratio_trainlib/dcp:{d}": v for d, v in ratios.items()},
               **{f"paired_ratio_trainlib/dcp:{d}": v for d, v in paired.items()},
               **{f"read_ratio_trainlib/dcp:{d}": v for d, v in read_ratios.items()},
               **{f"ratio_trainlib/read_sha256_floor:{d}": v for d, v in floor_ratios.items()}}
    return {"model_overrides": model, "reps": reps, "checkpoint_bytes": ck_bytes, "loads": rows,
            "ratio_trainlib_over_dcp": ratios, "paired_ratio_trainlib_over_dcp": paired,
            "read_bytes_ratio_trainlib_over_dcp": read_ratios,
            "ratio_trainlib_over_read_sha256_floor": floor_ratios,
            "summary": summary}


def plot(result: dict, path: str) -> None:
    """Median load seconds per candidate, grouped by direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = result["loads"]
    names = list(loads)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    colors = {"trainlib": "C0", "dcp": "C1", "floor": "C7"}
    ax.bar(names, [loads[n]["median_s"] for n in names], color=[colors[n.split(":")[0]] for n in names])
    ax.set_ylabel("median load seconds (slowest rank)")
    ax.set_title(f"load under another layout: {result['summary']['state_MB']} MB of state")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table_headline(s: dict) -> str:
    """This benchmark's line in `trainlib bench table` (benchmarks/README.md), from a result's summary."""
    from trainlib.benchmarks.harness import ratio_text

    dirs = [k.split(":", 1)[1] for k in s if k.startswith("ratio_trainlib/dcp:")]
    floor = [k.split(":", 1)[1] for k in s if k.startswith("ratio_trainlib/read_sha256_floor:")]
    out = (f"{s['state_MB']} MB of weights + AdamW state loaded under another layout: trainlib restore "
           + ", ".join(f"{d} {ratio_text(s[f'ratio_trainlib/dcp:{d}'])}" for d in dirs)
           + " of DCP's load time (paired per round: " + ", ".join(
               f"{ratio_text(s.get(f'paired_ratio_trainlib/dcp:{d}', 'n/a'))}" for d in dirs)
           + "; bytes read " + ", ".join(f"{ratio_text(s[f'read_ratio_trainlib/dcp:{d}'])}" for d in dirs)
           + f"); all loads bit-exact: {s['correct']}")
    if floor:
        out += "; vs reading+sha256 of the same files: " + ", ".join(
            f"{d} {ratio_text(s[f'ratio_trainlib/read_sha256_floor:{d}'])}" for d in floor)
    return out
