"""`trainlib bench table [--write]`: the latest result of every benchmark as one markdown table.

Rows are read from benchmarks/results/*.json (each file carries the command that produced it, its
date and, since the harness records it, the git commit), so the table in benchmarks/README.md is
regenerated from the measurements, never typed by hand. Cost-model output is labelled a prediction. `--write` replaces the block between the `results:begin` / `results:end` markers there.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Callable

from .harness import results_dir

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _x(v: Any) -> str:
    return f"{v:.2f}x" if isinstance(v, (int, float)) else str(v)


def _allreduce(s: dict) -> str:
    mb = s["largest_bytes"] / 2**20
    mpi = f", MPI {s['mpi_busbw_GBps']:.2f}" if s.get("mpi_busbw_GBps") else ""
    small = f"; at 4 KB MPI is {s['small_4KB_mpi_over_gloo_speedup']}x faster than gloo" \
        if s.get("small_4KB_mpi_over_gloo_speedup") else ""
    return (f"busbw at {mb:g} MB: gloo {s['gloo_busbw_GBps']:.2f}{mpi} GB/s; memcpy {s['memcpy_GBps']:.1f} GB/s "
            f"(gloo = {s['gloo_fraction_of_memcpy']:.3f} of memcpy){small}")


def _dp(s: dict) -> str:
    parts = []
    for w in ("gpt", "wide_mlp"):
        if f"{w}:best_vs_ddp_best" in s:
            parts.append(f"{w} step time {_x(s[f'{w}:best_vs_ddp_best'])} of the best DDP config "
                         f"({s[f'{w}:best_transport']}; {_x(s[f'{w}:trainlib-shm/ddp_default'])} of default DDP with shm)")
    mem = s.get("memory:trainlib:peak_rss_saving_in_grad_bytes")
    if mem is not None:
        parts.append(f"peak RSS below DDP default by {mem:.2f} x grad bytes "
                     f"(attainable {s['memory:attainable_peak_saving_in_grad_bytes']:.2f})")
    return "; ".join(parts)


def _kernels(s: dict) -> str:
    out = []
    for key, r in s.items():
        if not isinstance(r, dict) or "small_speedup_min" not in r:
            continue
        ep = r["epilogue_speedup_vs_torch_ops"]
        out.append(f"{r['threads']} thread(s): 1000 small tensors >= {r['small_speedup_min']:.1f}x vs per-tensor "
                   f"copies, large >= {r['large_fraction_min']:.2f} of memcpy, epilogue {ep['small']:.0f}x/"
                   f"{ep['large']:.0f}x vs torch ops")
    return "; ".join(out)


def _ps(s: dict) -> str:
    if "ps_speedup" in s:  # `bench ps --model`: computed from a formula, nothing was timed
        return (f"PREDICTION of the cost model, not a measurement: {s['nodes']} nodes x {s['gpus_per_node']} GPUs at {s['nic_gbps']:g} Gb/s: all-reduce "
                f"{s['allreduce_ms']} ms, PS dedicated {s['ps_dedicated_ms']} ms ({s['winner']} wins)")
    return (f"authentication costs +{s['auth_cost_at_4MB'] * 100:.0f}% at 4 MB partitions; unauthenticated PS moves "
            f"{s['ps_insecure_fraction_of_raw_pyzmq']:.2f} of raw pyzmq; step time vs all-reduce: GPT "
            f"{_x(s['gpt_ps_colocated_over_allreduce'])} colocated, wide MLP {_x(s['wide_mlp_ps_colocated_over_allreduce'])}")


def _tp(s: dict) -> str:
    return (f"step time {_x(s['ratio_trainlib_over_dtensor'])} of torch DTensor TP "
            f"({s['trainlib_step_ms']} vs {s['torch_dtensor_step_ms']} ms), loss difference {s['loss_abs_diff']}")


def _pp(s: dict) -> str:
    bubbles = ", ".join(f"{k.split('_', 1)[1]} {v}" for k, v in s.items() if k.startswith("bubble_") and "m=8" in k)
    over = ", ".join(f"{k.split('_')[-1]} {v}" for k, v in s.items() if k.startswith("overhead_ratio"))
    return (f"bubble (p=4): {bubbles}; worst error {s['max_bubble_error_points']} points; per-action overhead "
            f"vs torch.distributed.pipelining: {over}")


def _checkpoint(s: dict) -> str:
    return (f"{s['checkpoint_MB']} MB: save {s['save_s'] * 1e3:.1f} ms = {_x(s['save_ratio_vs_torch_save_fsync'])} of "
            f"torch.save+fsync, load {_x(s['load_ratio_vs_torch_load'])} of torch.load; "
            f"{s['save_share_at_every_100'] * 100:.2f}% of step time at every=100")


def _mutants(s: dict) -> str:
    return f"planted bugs: {s['score']} by the tests aimed at them; survived: {', '.join(s['survived']) or 'none'}"


def _cluster(s: dict) -> str:
    wins = "; ".join(f"{k} {v}" for k, v in s["winners"].items() if "/mlp/" in k)
    return (f"cost model (calibrated at the first rate) vs measured step time: median error "
            f"{s['median_error'] * 100:.0f}%, worst {s['worst_error'] * 100:.0f}%; fastest for the wide MLP: {wins}")


def _zero(s: dict) -> str:
    st = ("optimizer", "gradients", "parameters")
    mem = "/".join(f"{s[f'memory:trainlib-{x}:bytes_per_param']:g}" for x in st)
    over = max(abs(v - 1) for k, v in s.items() if k.startswith("memory:trainlib") and k.endswith(":over_formula"))
    out = (f"trainlib ZeRO-1/2/3 fp32 model states {mem} bytes/param/rank at d=2 (formula 12/10/8; worst row "
           f"{over * 100:.1f}% off); step time ZeRO-3 {_x(s['step:trainlib-parameters/fsdp2-parameters'])} of FSDP2, "
           f"ZeRO-1/2/3 {'/'.join(_x(s[f'step:trainlib-{x}/deepspeed-zero{i + 1}']) for i, x in enumerate(st) if f'step:trainlib-{x}/deepspeed-zero{i + 1}' in s) or 'n/a'} of DeepSpeed, "
           f"ZeRO-1/2 {_x(s['step:trainlib-optimizer/trainlib-none'])}/{_x(s['step:trainlib-gradients/trainlib-none'])} "
           f"of unsharded")
    pred = {k.split(":")[1]: v for k, v in s.items() if k.startswith("scale:") and k.endswith("max_params_pred")}
    cal = {k.split(":")[1]: v for k, v in s.items() if k.startswith("scale:") and k.endswith("max_params_calibrated")}
    if pred:  # a prediction (calibrated by a run of the same width where one ran), not a run of that size
        out += "; PREDICTED largest GPT in 24 GiB (* calibrated by a smaller run): " + ", ".join(
            f"{n.removeprefix('trainlib-')} {cal.get(n, v) / 1e9:.2f}B{'*' if n in cal else ''}"
            for n, v in pred.items() if n.startswith("trainlib-") and not n.endswith("bf16"))
    if "billion:params" in s:
        out += f"; {s['billion:params'] / 1e9:.2f}B-param GPT, ZeRO-3: peak RSS {s['billion:peak_rss_gib_per_rank']} GiB/rank"
    return out


def _reshard(s: dict) -> str:
    dirs = [k.split(":", 1)[1] for k in s if k.startswith("ratio_trainlib/dcp:")]
    floor = [k.split(":", 1)[1] for k in s if k.startswith("ratio_trainlib/read_sha256_floor:")]
    out = (f"{s['state_MB']} MB of weights + AdamW state loaded under another layout: trainlib restore "
           + ", ".join(f"{d} {_x(s[f'ratio_trainlib/dcp:{d}'])}" for d in dirs)
           + " of DCP's load time (paired per round: " + ", ".join(
               f"{_x(s.get(f'paired_ratio_trainlib/dcp:{d}', 'n/a'))}" for d in dirs)
           + "; bytes read " + ", ".join(f"{_x(s[f'read_ratio_trainlib/dcp:{d}'])}" for d in dirs)
           + f"); all loads bit-exact: {s['correct']}")
    if floor:
        out += "; vs reading+sha256 of the same files: " + ", ".join(
            f"{d} {_x(s[f'ratio_trainlib/read_sha256_floor:{d}'])}" for d in floor)
    return out


HEADLINES: dict[str, Callable[[dict], str]] = {
    "allreduce": _allreduce, "dp": _dp, "kernels": _kernels, "ps": _ps, "tp": _tp, "pp": _pp,
    "checkpoint": _checkpoint, "mutants": _mutants, "cluster": _cluster, "zero": _zero,
    "reshard": _reshard,
}


def _headline(name: str, summary: dict) -> str:
    fn = HEADLINES.get(name)
    try:
        return fn(summary) if fn else ""
    except (KeyError, TypeError):
        pass  # an older result file with other keys: show the raw summary instead
    return "; ".join(f"{k} {v}" for k, v in list(summary.items())[:6])


def _commit(meta: dict) -> str:
    git = meta.get("git")
    if not git:
        return "not recorded"
    return git["commit"][:7] + (f" + {len(git['modified'])} modified" if git.get("modified") else "")


def render(folder: Path | None = None) -> str:
    """One markdown table row per result file: benchmark, what it found, command, date, commit."""
    folder = folder or results_dir()
    rows = ["| result file | headline (ratios measured in one run) | command | date (UTC) | commit |",
            "|---|---|---|---|---|"]
    for path in sorted(folder.glob("*.json")):
        d = json.loads(path.read_text())
        meta = d.get("meta", {})
        name = meta.get("benchmark", path.stem.split("-")[0])
        line = _headline(name, d.get("summary", {})).replace("|", "/")
        rows.append(f"| `{path.name}` | {line} | `{meta.get('command', '?')}` | {meta.get('date', '?')[:16]} "
                    f"| {_commit(meta)} |")
    return "\n".join(rows) + "\n"


def write(readme: Path) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} block to replace; add the two markers first")
    block = f"{BEGIN}\n{render()}{END}"
    readme.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trainlib bench table", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="update benchmarks/README.md in place")
    args = p.parse_args(argv)
    if args.write:
        write(Path(__file__).resolve().parent / "README.md")
    else:
        print(render(), end="")
    return 0
