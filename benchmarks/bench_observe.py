"""What the step breakdown costs: the default job with --observe.breakdown on vs off.

    trainlib bench observe [--quick]

The default job (`trainlib train`: the default GPT on 2 gloo ranks, shm all-reduce) runs whole
training loops through trainer.train, on and off alternating (harness.alternate) in one pair of
ranks; a repetition's figure is its wall time per step (the trainer's wall_s / steps, warm-up
step included on both sides). The ratio on / off of the medians is the overhead (target <= 1.02).
The "on" side's last breakdown (the run summary's per-step means) is kept as a sample of what
the breakdown reports for this job.

On a shared 2-core machine whole steps vary by tens of percent between repetitions, more than the
overhead itself, so the run also times the instrumentation alone: one measured step's worth of
recorder work (open, the phase switches and byte/transfer records the default job makes per
step, close with its peak-memory read) in a tight loop; that cost over the "off" step time is an
upper bound of the overhead that noise cannot hide.
"""
from __future__ import annotations

import os
import time

from trainlib.benchmarks.harness import alternate
from trainlib.testing import run_ranks


def _worker(steps: int, reps: int, metrics_dir: str) -> dict:
    from trainlib import trainer
    from trainlib.config import load_config

    last: dict = {}

    def job(on: bool):
        def run() -> float:
            cfg = load_config(None, [f"--train.steps={steps}", f"--observe.breakdown={str(on).lower()}",
                                     f"--train.metrics={metrics_dir}/{'on' if on else 'off'}.jsonl"])
            summary = trainer.train(cfg)
            if on:
                last.update(summary["breakdown"])
            return summary["wall_s"] / steps
        return run

    job(True)()   # warm-up: first-touch allocations, the forkserver's lazy imports
    res = alternate({"on": job(True), "off": job(False)}, reps)
    return {"times": res, "breakdown": last}


# what one step of the default job records: data, forward, backward, optimizer phases, the sync
# wait, ~4 buckets launched (bytes + a transfer interval each) -- rounded up
PHASES_PER_STEP, BUCKETS_PER_STEP = 8, 6


def instrumentation_s(loops: int) -> float:
    """Seconds of recorder work per measured step (module docstring), median of 5 timings."""
    from trainlib.observe import step_stats

    def one() -> float:
        t0 = time.perf_counter()
        for _ in range(loops):
            rec = step_stats.open_step({})
            for _ in range(PHASES_PER_STEP):
                with step_stats.phase("forward"):
                    pass
            for _ in range(BUCKETS_PER_STEP):
                rec.add_bytes("dp", 1 << 20)
                rec.transfer(rec.t0, time.perf_counter())
            step_stats.close_step(rec)
        return (time.perf_counter() - t0) / loops

    return sorted(one() for _ in range(5))[2]


def run(quick: bool) -> dict:
    import tempfile

    steps, reps = (8, 3) if quick else (40, 7)
    with tempfile.TemporaryDirectory(prefix="bench-observe-") as tmp:
        out = run_ranks(_worker, 2, steps, reps, tmp, timeout_s=1800, env={"TRAINLIB_NO_PROGRESS": "1"})[0]
    on, off = out["times"]["on"]["median_s"], out["times"]["off"]["median_s"]
    cost = instrumentation_s(200 if quick else 2000)
    return {"config": {"job": "trainlib train (default GPT, 2 ranks)", "steps_per_rep": steps, "reps": reps,
                       "omp_threads": os.environ.get("OMP_NUM_THREADS", "1")},
            "times": out["times"], "sample_breakdown": out["breakdown"],
            "summary": {"step_s_on": round(on, 5), "step_s_off": round(off, 5), "overhead_ratio": round(on / off, 4),
                        "instrumentation_us_per_step": round(cost * 1e6, 1),
                        "instrumentation_share": round(cost / off, 6)}}


def table_headline(summary: dict) -> str:
    return (f"breakdown on / off: {summary['overhead_ratio']:.3f}x step time (default job); the recorder alone "
            f"{summary['instrumentation_us_per_step']:.0f} us/step = {100 * summary['instrumentation_share']:.3f}%")
