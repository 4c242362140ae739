"""`trainlib bench zero --quick`: the JSON it writes, and trainlib's model-state memory per parameter for every
ZeRO stage against the formula (hand-written below for d = 2 ranks), within the benchmark's 10% tolerance.

One run of the benchmark (~50 s: 13 rows' memory, 9 rows' step time, activation checkpointing) feeds every
check; the DeepSpeed rows are checked only where DeepSpeed is installed.
"""
from __future__ import annotations

import importlib.util
import json
import statistics

import pytest
import torch
import torch.nn as nn

from trainlib.benchmarks import bench_zero, harness
from trainlib.benchmarks.zero_ranks import state_bytes

# bytes/param/rank with AdamW at d = 2, from ZeRO's accounting (params + grads + optimizer state, sharded by stage)
EXPECTED = {
    "trainlib-none": 4 + 4 + 8,                 # replicated fp32: 16
    "trainlib-optimizer": 4 + 4 + 8 / 2,        # ZeRO-1
    "trainlib-gradients": 4 + (4 + 8) / 2,      # ZeRO-2
    "trainlib-parameters": (4 + 4 + 8) / 2,     # ZeRO-3
    "trainlib-none-bf16": 2 + 4 + 12,           # bf16 params, fp32 grads, fp32 master + exp_avg + exp_avg_sq
    "trainlib-optimizer-bf16": 2 + 4 + 12 / 2,  # Megatron's distributed optimizer: 6 + 12/d
    "trainlib-gradients-bf16": 2 + (4 + 12) / 2,
    "trainlib-parameters-bf16": (2 + 4 + 12) / 2,
    "fsdp2-parameters": (4 + 4 + 8) / 2,
}
HAS_DS = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("bench") / "zero.json"
    assert harness.main(["zero", "--quick", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_state_bytes_counts_each_storage_once():
    """The walker against a hand count: Linear(64, 32) + AdamW after a step is 16 bytes/param, plus AdamW's
    step count (a 4-byte tensor per parameter tensor); a view and a second reference to a storage add nothing."""
    m = nn.Linear(64, 32)
    opt = torch.optim.AdamW(m.parameters(), foreach=False)
    m(torch.randn(4, 64)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in m.parameters())
    full = 16 * n + 4 * 2
    assert state_bytes([m, opt]) == full
    extra = {"alias": m.weight, "view": m.weight.data[:3], "grad_again": m.weight.grad}
    assert state_bytes([m, opt, extra]) == full
    assert state_bytes([m, opt, torch.zeros(10)]) == full + 40


def test_bad_budget_is_refused():
    with pytest.raises(SystemExit):
        bench_zero.parse(["--budget-gib", "0"])


def test_json_structure(result):
    assert result["meta"]["benchmark"] == "zero" and result["meta"]["quick"] is True
    assert result["meta"]["command"].startswith("trainlib bench zero")
    assert result["trainlib_sharding_error"] is None, result["trainlib_sharding_error"]
    rows = result["memory"]["rows"]
    assert set(EXPECTED) | {"fsdp2-gradients"} <= set(rows)
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["tensor_bytes"] > 0 and row["peak_rss_delta"] > 0
        assert set(row["tensor_bytes_per_param_at"]) == {"forward", "backward", "step"}
    st = result["step_time"]
    fp32 = {n for n, s in bench_zero.row_specs(True, HAS_DS).items() if s["precision"] == "fp32"}
    assert set(st["median_step_ms"]) == fp32
    reps = result["definitions"]["repetitions"]
    for name, ts in st["step_s"].items():
        assert len(ts) == reps and all(t > 0 for t in ts)
    # the summary's ratios are the medians of its own raw times (consistency, not a reference)
    med = {n: statistics.median(ts) for n, ts in st["step_s"].items()}
    for key, v in st["ratios"].items():
        a, b = key.split("/")
        assert v == round(med[a] / med[b], 4)
    assert {"trainlib-gradients/fsdp2-gradients", "trainlib-parameters/fsdp2-parameters",
            "trainlib-optimizer/trainlib-none", "trainlib-gradients/trainlib-none"} <= set(st["ratios"])
    ac = result["activation_checkpointing"]
    assert "error" in ac or set(ac["modes"]) == {"none", "full", "selective"}


def test_trainlib_memory_matches_zero_formulas(result):
    rows = result["memory"]["rows"]
    for name, expected in EXPECTED.items():
        row = rows[name]
        assert row["formula_bytes_per_param"] == pytest.approx(expected), name
        assert row["compared"] == "model_state_bytes"
        measured = row["model_state_bytes_per_param"]
        assert abs(measured / expected - 1) <= bench_zero.TOLERANCE, f"{name}: {measured} bytes/param vs {expected}"
        # the rest of what the rank holds between steps is communication buffers, never negative
        assert row["tensor_bytes_per_param"] >= measured - 1e-3
    assert result["summary"]["memory:trainlib_rows_within_10pct"] is True


def test_every_fp32_row_trained_the_same_model(result):
    """Same weights, same batches, fp32, no clipping: sharding changes where numbers live, not what they are."""
    st = result["step_time"]
    assert st["reference"] == "trainlib-none"
    for name, diff in st["max_param_diff_vs_reference"].items():
        if name.endswith("-bf16"):  # bf16 compute rounds differently (full run only)
            continue
        assert diff <= 1e-5, (name, diff)
        assert st["max_loss_diff_vs_reference"][name] <= 1e-5, name


@pytest.mark.skipif(not HAS_DS, reason="DeepSpeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")
def test_deepspeed_rows(result):
    assert result["deepspeed_error"] is None, result["deepspeed_error"]
    rows = result["memory"]["rows"]
    for s in (1, 2, 3):
        assert rows[f"deepspeed-zero{s}"]["tensor_bytes"] > 0
        assert f"trainlib-{bench_zero.STAGES[s]}/deepspeed-zero{s}" in result["step_time"]["ratios"]
