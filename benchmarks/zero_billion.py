"""A few steps of a >= 1B-parameter GPT with ZeRO-3 on 2 gloo ranks, and each rank's peak memory.

    python -m trainlib.benchmarks.zero_billion [--d-model 2048 --layers 20 --steps 3]

Unlike `trainlib bench zero --billion` (which runs only when its prediction from the memory rows
says it fits), this just runs it: check `free -g` first (it needs about 2 x 9 GiB). Writes
benchmarks/results/zero-billion-run.json: parameters, per-rank build and training peaks (VmHWM over
the RSS before the model was built), step times and losses.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

GIB = 2 ** 30


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def rank_run(d_model: int, layers: int, steps: int) -> dict:
    import trainlib as tl
    from trainlib.models.gpt import GPT, GPTConfig, lm_loss

    torch.set_num_threads(1)
    base = _status("VmRSS")
    model = GPT(GPTConfig(vocab_size=256, seq_len=64, n_layer=layers, n_head=16, d_model=d_model), seed=1)
    n = sum(p.numel() for p in model.parameters())
    dp = tl.DataParallel(model, tl.Mesh(dp=-1), shard="parameters", sync=tl.AllReduce(transport="torch"))
    opt = tl.DistributedOptimizer(torch.optim.AdamW(dp.parameters(), lr=1e-5, foreach=False), dp)
    build = _status("VmHWM") - base
    # one fixed batch per rank: a loss that falls step after step shows the updates land
    x = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(dp.mesh.rank("dp")))
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = lm_loss(dp(x), x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(round(time.perf_counter() - t0, 2))
        losses.append(round(loss.item(), 4))
    peak = _status("VmHWM") - base
    dp.close()
    return {"params": n, "build_peak_gib": round(build / GIB, 2), "build_peak_bytes_per_param": round(build / n, 2),
            "peak_gib": round(peak / GIB, 2), "peak_bytes_per_param": round(peak / n, 2), "step_s": times,
            "losses": losses}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainlib.benchmarks.zero_billion", description=__doc__)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=None, help="default benchmarks/results/zero-billion-run.json")
    args = p.parse_args(argv)
    from trainlib.benchmarks.harness import git_state
    from trainlib.benchmarks.paths import results_dir
    from trainlib.testing import run_ranks

    ranks = run_ranks(rank_run, 2, args.d_model, args.layers, args.steps, timeout_s=3000,
                      env={"OMP_NUM_THREADS": "1"})
    out = {"command": f"python -m trainlib.benchmarks.zero_billion --d-model {args.d_model} --layers {args.layers} "
                      f"--steps {args.steps}", "git": git_state(), "ranks": ranks,
           "shard": "parameters", "precision": "fp32", "world": 2}
    path = args.json or str(results_dir() / "zero-billion-run.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({"json": path, "params": ranks[0]["params"], "peak_gib_per_rank": [r["peak_gib"] for r in ranks],
                      "step_s": ranks[0]["step_s"], "losses": ranks[0]["losses"]}))
    return 0


def table_headline(result: dict) -> str:
    """The results table's line (benchmarks/table.py) for a zero-billion-run.json."""
    r = result["ranks"]
    steps = [s for rank in r for s in rank["step_s"]]
    return (f"{r[0]['params'] / 1e9:.3f}B-param GPT, ZeRO-3 {result['precision']} on {result['world']} gloo ranks: "
            f"peak {max(x['peak_gib'] for x in r):.2f} GiB/rank ({max(x['peak_bytes_per_param'] for x in r)} B/param), "
            f"{min(steps):.0f}-{max(steps):.0f} s/step, loss {r[0]['losses'][0]:.2f} -> {r[0]['losses'][-1]:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
