"""Smoke test of `trainlib bench dp`: its smallest piece (one spawned group, candidates side by side) has
the result shape the benchmark writes, and the candidates trained the same model -- trainlib equals torch
DDP, and DDP equals a single process stepping on the global batch (the reference).

The ratio and busbw checks below recompute the benchmark's own formulas from its own raw times: they
catch a summary that misreports its raw data, not a wrong measurement, so this file is a smoke test
of the benchmark, not evidence for its figures (those are the stored results in benchmarks/results/)."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from trainlib.benchmarks import bench_dp, dp_workloads as wl
from trainlib.benchmarks.dp_ranks import _bucket_for, busbw_rank, step_group
from trainlib.testing import run_ranks


def _single_process_reference(batches_per_rank: list[list[tuple]], steps: int) -> torch.Tensor:
    """The tiny wide MLP trained by one process on the concatenation of both ranks' batches."""
    w = wl.workloads(True)["wide_mlp"]
    model = wl.build_model(w, tiny=True)
    opt = wl.make_optimizer(w, model.parameters())
    n = len(batches_per_rank[0])
    for i in range(steps):
        x = torch.cat([b[i % n][0] for b in batches_per_rank])
        y = torch.cat([b[i % n][1] for b in batches_per_rank])
        wl.loss_fn(w, model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return wl.flat_params(model)


SIZES = [64 * 1024, 256 * 1024]


def _group(specs: dict) -> dict:
    """One spawned group for everything: the step-time piece, then the bus-bandwidth piece."""
    import torch.distributed as dist

    out = step_group("wide_mlp", specs, 2, 1, True, True, True)
    dp, b = _bucket_for(SIZES[0], "torch")
    b.comm.fill_(dist.get_rank() + 1.0)
    dp.sync.start(b)
    dp.sync.wait()
    out["bucket_sum"] = b.comm.clone()
    dp.close()
    out["busbw"] = busbw_rank(SIZES, ["torch"], 2, True)
    return out


def test_smoke_bench_dp_step_group_matches_ddp_and_single_process():
    specs = wl.candidate_specs(with_shm=False, with_ds=False, ddp_grid=False)
    specs = {n: specs[n] for n in ("trainlib", "trainlib-bf16", "ddp-default")}
    specs["ddp-bucket1-view"] = {"kind": "ddp", "bucket_cap_mb": 1, "view": True}
    ranks = run_ranks(_group, 2, bench_dp.ordered(specs), timeout_s=120)
    res = ranks[0]
    bucket_sum, bw = res.pop("bucket_sum"), res.pop("busbw")
    ref_params, steps = res.pop("reference_params"), res["steps_per_candidate"]
    batches = [r["batches"] for r in ranks]
    res.pop("batches")
    res = bench_dp.summarize_steps(res)
    out = json.loads(json.dumps(res))  # what the benchmark writes must be JSON as is

    assert out["reference"] == "ddp-default" and steps == 3
    assert set(out["median_step_ms"]) == set(specs) and all(t > 0 for t in out["median_step_ms"].values())
    assert len(out["step_s"]["trainlib"]) == 2
    assert out["ddp_best"] in ("ddp-default", "ddp-bucket1-view")
    assert set(out["ratio_vs_ddp_default"]) == {"trainlib", "trainlib-bf16"}
    # smoke: the summary's ratios are the medians of its own raw times (same formula, not a reference)
    med = {n: statistics.median(ts) for n, ts in out["step_s"].items()}
    assert out["ratio_vs_ddp_default"]["trainlib"] == round(med["trainlib"] / med["ddp-default"], 4)
    assert out["ratio_vs_ddp_best"]["trainlib"] == round(med["trainlib"] / min(med["ddp-default"],
                                                                              med["ddp-bucket1-view"]), 4)
    # same weights, same batches, fp32: trainlib's gradients are DDP's, so are the weights after 3 steps
    assert out["max_param_diff_vs_reference"]["trainlib"] <= 1e-6
    assert out["max_loss_diff_vs_reference"]["trainlib"] <= 1e-6
    assert out["max_param_diff_vs_reference"]["ddp-bucket1-view"] <= 1e-6
    # bf16 on the wire: close to fp32, but not bit-equal (the check can see a difference)
    assert 0 < out["max_param_diff_vs_reference"]["trainlib-bf16"] < 1e-2
    # DDP itself equals one process on the global batch
    expected = _single_process_reference(batches, steps)
    torch.testing.assert_close(ref_params, expected, rtol=1e-5, atol=1e-6)

    # the bucket path that busbw times really all-reduces: ranks held 1 and 2
    assert torch.equal(bucket_sum, torch.full((SIZES[0] // 4,), 3.0))
    rows = json.loads(json.dumps(bench_dp.busbw_rows(bw, SIZES)))
    assert [r["bytes"] for r in rows] == SIZES
    for r in rows:
        for name in ("trainlib-torch", "gloo"):
            t = statistics.median(bw[name][r["bytes"]])  # busbw = algbw * 2(n-1)/n, n = 2
            assert r[name]["busbw_GBps"] == round(r["bytes"] / t / 1e9 * 2 * (2 - 1) / 2, 4) > 0


def test_result_file_names_commit_command_and_machine(tmp_path):
    """A stored result can be traced: the harness writes the git commit (and the tracked files that differed
    from it), the command and the machine next to the figures, and the table shows the commit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from trainlib.benchmarks import table

    repo = Path(bench_dp.__file__).resolve().parent.parent
    out = tmp_path / "checkpoint-quick.json"
    subprocess.run([sys.executable, "-m", "trainlib.cli", "bench", "checkpoint", "--quick", "--json", str(out),
                    "--plot", str(tmp_path / "c.png")], check=True, capture_output=True, timeout=180,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    meta = json.loads(out.read_text())["meta"]
    assert meta["command"] == f"trainlib bench checkpoint --quick --json {out} --plot {tmp_path / 'c.png'}"
    assert meta["machine"]["cpus"] == os.cpu_count() and meta["machine"]["torch"] == torch.__version__

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()

    if not git("rev-parse", "--show-toplevel") or Path(git("rev-parse", "--show-toplevel")).resolve() != repo:
        assert meta["git"] is None  # an unpacked archive or an installed copy: no commit to name
        pytest.skip("not a git checkout: nothing more to compare")
    assert meta["git"]["commit"] == git("rev-parse", "HEAD") and isinstance(meta["git"]["modified"], list)
    assert git("rev-parse", "HEAD")[:7] in table.render(tmp_path)
