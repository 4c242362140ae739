"""benchmarks/gpu_check.sh --dry-run: the GPU check's CPU run prints one JSON whose figures are all
there, finite and positive, and whose training runs agree with their references (at world 1,
DataParallel equals the bare module and every shard stage equals the unsharded run)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainlib.benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent
OPS = ("pack", "unpack", "scale_cast", "epilogue", "unscale_epilogue")
KERNEL_FIGURES = ("fused_GBps", "torch_GBps", "copy_GBps", "speedup_vs_torch", "fraction_of_copy_bw")
# numpy, which runs Triton's interpreter, warns on the overflow and NaN arithmetic of the kernels
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")


def positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    env.pop("TRAINLIB_KERNELS", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)  # the whole of stdout is one JSON document


def test_kernel_bandwidths_for_every_backend(report):
    k = report["kernels"]
    assert report["dry_run"] is True and k["device"] == "cpu" and report["meta"]["benchmark"] == "gpu_check"
    triton_here = all(importlib.util.find_spec(m) is not None for m in ("numpy", "triton"))
    measured = ["reference", "cpu", *(["triton"] if triton_here else [])]
    if not triton_here:
        assert "triton" in k["backends"]["triton"]["skipped"]
    for backend in measured:
        ops = k["backends"][backend]
        assert set(ops) == set(OPS), (backend, ops)
        for op in OPS:
            assert ops[op], (backend, op)
            for size, row in ops[op].items():
                bad = {f: row.get(f) for f in KERNEL_FIGURES if not positive(row.get(f))}
                assert not bad, (backend, op, size, bad)


def test_data_parallel_world1_equals_the_bare_module(report):
    dp = report["data_parallel"]
    assert dp["backend"] == "gloo" and dp["world_size"] == 1 and positive(dp["params"])
    for name in ("trainlib", "torch_ddp", "plain"):
        assert positive(dp["steps_per_s"][name]) and positive(dp["final_loss"][name]), (name, dp)
    assert positive(dp["trainlib_vs_torch_ddp"]) and positive(dp["trainlib_vs_plain"])
    # one rank: the dp average is the rank's own gradient, so the same steps give the same loss
    assert dp["loss_max_abs_diff_vs_plain"] <= 1e-5, dp["final_loss"]


def test_shard_stages_or_the_reason_they_are_missing(report):
    shard = report["shard"]
    why = gpu_check.shard_unavailable()
    if why is not None:
        assert shard == {"available": False, "reason": why} and why.startswith("shard API not available")
        return
    assert shard["available"] is True and set(shard["stages"]) == {"none", "optimizer", "gradients", "parameters"}
    for stage, row in shard["stages"].items():
        for precision in ("fp32", "bf16"):
            run = row[precision]
            assert positive(run.get("steps_per_s")) and positive(run.get("loss")), (stage, precision, run)
            assert run["steps"] == shard["steps"] and run["peak_memory_bytes"] is None  # CUDA only
        # world 1: sharding is the identity, so every stage repeats the unsharded fp32 arithmetic
        assert row["fp32_loss_abs_diff_vs_unsharded"] <= 1e-5, (stage, row)
        assert row["bf16_within_rtol"] is True, (stage, row)
        assert row["bf16_loss_abs_diff_vs_fp32"] <= shard["bf16_loss_rtol"] * row["fp32"]["loss"]


def test_shard_guard_names_a_wrapper_without_shard():
    why = gpu_check.shard_unavailable(torch.nn.parallel.DistributedDataParallel)
    assert why == "shard API not available: DistributedDataParallel has no shard= yet"


def test_gpu_run_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("there is a GPU here: the real run is benchmarks/gpu_check.sh itself")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "no CUDA device here; run with --dry-run" in proc.stderr
    assert proc.stdout == ""
