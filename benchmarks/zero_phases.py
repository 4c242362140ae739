"""Where a ZeRO stage's step time goes: forward, backward and optimizer step, page faults, waits.

    python -m trainlib.benchmarks.zero_phases [--reps 15] [--big] [--pin]

One spawned group of 2 gloo ranks steps, in rotating order, bench zero's step model (3.3M-param GPT)
under trainlib stage 3 (with and without its pool of freed units' memory), trainlib stage 1, DeepSpeed
ZeRO-3 and the floor (the bare model and AdamW, no communication), and reports per candidate the
medians over repetitions of: milliseconds in forward, backward and the optimizer step; minor page faults
per step (getrusage); the training thread's time blocked on the shm transport's worker, and the worker's
time in its barriers. --big: a GPT whose units (50 MB) are past glibc's largest mmap threshold (32 MiB),
where a unit gathered into fresh memory is page-faulted in at every gather; the pool's floor is lowered
to the unit size so both trainlib rows differ only in it. --pin: glibc's mmap threshold pinned at 128 KiB
first, as bench zero's memory phase does (every large allocation then faults). Writes
benchmarks/results/zero-phases[-big][-pin].json.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from typing import Any

N_RANKS = 2
BIG = {"vocab": 256, "seq": 128, "layers": 4, "heads": 8, "d_model": 1024, "batch": 4}


def specs(big: bool) -> dict[str, dict[str, Any]]:
    out = {"trainlib-parameters": {"kind": "tl", "stage": 3, "pool": True},
           "trainlib-parameters-nopool": {"kind": "tl", "stage": 3, "pool": False},
           "trainlib-optimizer": {"kind": "tl", "stage": 1},
           "deepspeed-zero3": {"kind": "ds", "stage": 3},
           "floor": {"kind": "floor", "stage": 0}}
    if big:
        del out["trainlib-optimizer"]
    return out


def ranks(m: dict[str, int], cands_specs: dict[str, dict[str, Any]], reps: int, pin: bool, pool_floor: int | None
          ) -> dict[str, Any]:
    import torch

    import trainlib.benchmarks.dp_workloads as wl
    import trainlib.benchmarks.zero_ranks as zr
    from trainlib import comm
    from trainlib.data_parallel import sharded
    from trainlib.sync import shm

    if pin:
        wl.fix_malloc_threshold()
    if pool_floor is not None:
        sharded.POOL_MIN_BYTES = pool_floor
    torch.set_num_threads(1)
    acc = {"wait": 0.0, "barrier": 0.0}
    wait_for, barrier = shm.ShmWorker.wait_for, shm.ShmGroup.barrier

    def timed_wait(self, seq):
        t0 = time.perf_counter()
        wait_for(self, seq)
        acc["wait"] += time.perf_counter() - t0

    def timed_barrier(self, what):
        t0 = time.perf_counter()
        barrier(self, what)
        acc["barrier"] += time.perf_counter() - t0

    shm.ShmWorker.wait_for, shm.ShmGroup.barrier = timed_wait, timed_barrier
    batches = zr.make_batches(m, 4)
    cands = {}
    errors: dict[str, str] = {}
    for n, s in cands_specs.items():
        try:
            cands[n] = zr.build(n, s, m)
        except Exception as e:   # DeepSpeed missing or broken: the other rows still mean something
            if s["kind"] == "tl":
                raise
            errors[n] = f"{type(e).__name__}: {e}"[:500]
        if n in cands and s.get("pool") is False:
            cands[n].model.pool_gathered = False
    keys = ("forward", "backward", "step", "faults", "wait", "barrier")
    got: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in cands}
    for n in cands:
        cands[n].step(batches[0])
    for r in range(reps):
        names = list(cands)
        for n in names[r % len(names):] + names[:r % len(names)]:
            comm.barrier()
            acc.update(wait=0.0, barrier=0.0)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = [time.perf_counter()]
            cands[n].step(batches[r % len(batches)], lambda what: t.append(time.perf_counter()))
            t.append(time.perf_counter())
            g = got[n]
            for k, (a, b) in zip(("forward", "backward", "step"), zip(t, t[1:])):
                g[k].append((b - a) * 1e3)
            g["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            g["wait"].append(acc["wait"] * 1e3)
            g["barrier"].append(acc["barrier"] * 1e3)
    for c in cands.values():
        c.close()
    med = {n: {k: round(statistics.median(v), 1) for k, v in g.items()} for n, g in got.items()}
    for n, v in med.items():
        v["total"] = round(v["forward"] + v["backward"] + v["step"], 1)
    return {"medians": med, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainlib.benchmarks.zero_phases", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--big", action="store_true", help="units of 50 MB, past glibc's mmap threshold")
    p.add_argument("--pin", action="store_true", help="pin glibc's mmap threshold at 128 KiB first")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from trainlib.benchmarks.bench_zero import ENV, MODELS
    from trainlib.benchmarks.harness import git_state
    from trainlib.benchmarks.paths import results_dir
    from trainlib.testing import run_ranks

    m = BIG if args.big else MODELS["step"]
    pool_floor = 32 << 20 if not args.big else 0   # --big: both trainlib rows differ in the pool alone
    res = run_ranks(ranks, N_RANKS, m, specs(args.big), args.reps, args.pin, pool_floor, timeout_s=1800,
                    env={**ENV, "OMP_NUM_THREADS": "1"})[0]
    med = res["medians"]
    ds = med.get("deepspeed-zero3", {}).get("total")
    out = {"command": "python -m trainlib.benchmarks.zero_phases" + " --big" * args.big + " --pin" * args.pin
           + (f" --reps {args.reps}" if args.reps != 15 else ""),
           "git": git_state(), "date": time.strftime("%Y-%m-%dT%H:%M", time.gmtime()), "model": m,
           "world": N_RANKS, "units": "ms per step (forward, backward, step, total, wait, barrier); faults per step",
           "errors": res["errors"], "medians": med,
           "over_deepspeed_zero3": {n: round(v["total"] / ds, 4) for n, v in med.items()} if ds else None}
    name = "zero-phases" + "-big" * args.big + "-pin" * args.pin + ".json"
    with open(args.json or str(results_dir() / name), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({"medians": med, "over_deepspeed_zero3": out["over_deepspeed_zero3"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
