"""The step breakdown (trainlib/observe/step_stats.py) and --profile.steps traces, on real gloo ranks.

One spawned pair of ranks runs every multi-rank case (trainer runs for dp2, pp2, tp2 and ps with a
trace each, a slowed rank, breakdown off, and the byte count against the ring formula).
References: the wall clock between the trainer's log records, the ring all-reduce formula over
the buckets' real sizes, the pipeline's activation sizes, a JSON reader for the traces, and
hand-computed tables for the aggregation."""
from __future__ import annotations

import json
import time

import pytest

from trainlib.observe.step_stats import _union
from trainlib.observe.window import aggregate
from trainlib.testing import run_ranks

TINY = ["--model.n_layer=2", "--model.d_model=32", "--model.seq_len=32", "--train.batch_size=8",
        "--train.log_every=3"]
LAYOUTS = {"dp2": [], "pp2": ["--mesh.pp=2"], "tp2": ["--mesh.tp=2"], "ps": ["--sync.kind=ps"]}
PARTS = ("forward", "backward", "sync_wait", "optimizer", "data", "bubble", "other")
SLEEP_S = 0.03
B, T, D = 8, 32, 32   # TINY's batch, sequence and width


def _train(argv: list[str]) -> tuple[dict, list[dict]]:
    from trainlib import trainer
    from trainlib.callbacks import Callback
    from trainlib.config import load_config

    class Logs(Callback):
        def __init__(self) -> None:
            self.records: list[dict] = []

        def on_log(self, record):
            self.records.append(record)

    logs = Logs()
    summary = trainer.train(load_config(None, argv), callbacks=[logs])
    return summary, logs.records


def _slowed_sampler(rank: int):
    """The real sampler, with SLEEP_S added to every batch on `rank`: a straggler made on purpose."""
    import torch.distributed as dist

    from trainlib import trainer

    base = trainer.DistributedSampler

    class Slow(base):
        def next_batch(self):
            if dist.get_rank() == rank:
                time.sleep(SLEEP_S)
            return super().next_batch()

    return base, Slow


def _dp_bytes(transport: str, compress: str | None) -> dict:
    """Two steps of a tiny GPT under tl.parallelize, and of a bare tl.DataParallel: bytes sent on
    dp per step against the ring all-reduce formula over the real buckets."""
    import torch

    import trainlib as tl
    from trainlib.compose import parallelize
    from trainlib.models.gpt import GPT, GPTConfig

    mesh = tl.Mesh(dp=2)
    cfg = GPTConfig(n_layer=1, n_head=2, d_model=32, seq_len=16, vocab_size=256)
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(tl.init().rank))
    pm = parallelize(GPT(cfg, seed=0), mesh, sync=tl.AllReduce(bucket_mb=0.01, compress=compress,
                                                               transport=transport))
    for _ in range(2):
        pm.step(x, x)
    s = pm.last_step_stats()
    n = mesh.size("dp")
    ref = sum(int(2 * (n - 1) * b.nbytes / n) for b in pm.dp_model.buckets)
    dp = tl.DataParallel(GPT(cfg, seed=0), mesh=mesh, sync=tl.AllReduce(bucket_mb=0.01, transport=transport))
    for _ in range(2):
        torch.nn.functional.cross_entropy(dp(x).reshape(-1, 256), x.reshape(-1)).backward()
    d = dp.last_step_stats()
    ref_dp = sum(int(2 * (n - 1) * b.nbytes / n) for b in dp.buckets)
    pm.close()
    dp.close()
    return {"pm": s.as_dict(), "pm_ref": ref, "buckets": len(pm.dp_model.buckets), "dp": d.as_dict(), "dp_ref": ref_dp,
            "transport": pm.dp_model.sync.resolved_transport}


def worker(tmp: str) -> dict:
    from trainlib import trainer

    out: dict = {"layouts": {}}
    for name, extra in LAYOUTS.items():
        argv = [*TINY, "--train.steps=6", f"--train.metrics={tmp}/{name}.jsonl", "--profile.steps=2:2",
                f"--profile.dir={tmp}/trace_{name}", *extra]
        out["layouts"][name] = _train(argv)
    base, slow = _slowed_sampler(rank=1)
    trainer.DistributedSampler = slow
    try:
        out["slowed"] = _train([*TINY, "--train.steps=6", f"--train.metrics={tmp}/slow.jsonl"])
    finally:
        trainer.DistributedSampler = base
    out["off"] = _train([*TINY, "--train.steps=2", f"--train.metrics={tmp}/off.jsonl", "--observe.breakdown=false"])
    out["bytes"] = [_dp_bytes("torch", None), _dp_bytes("auto", None), _dp_bytes("torch", "bf16")]
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stepstats")
    return tmp, run_ranks(worker, 2, str(tmp), timeout_s=240, env={"TRAINLIB_NO_PROGRESS": "1"})


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parts_sum_to_the_step_and_to_the_wall_clock(ranks, layout):
    _, results = ranks
    summary, records = results[0]["layouts"][layout]
    assert [r["step"] for r in records] == [1, 3, 6]
    for r in records:
        parts = sum(r[f"t_{p}_s"] for p in PARTS)
        assert abs(parts - r["t_step_s"]) <= 0.05 * r["t_step_s"], (layout, r)
        assert all(r[f"t_{p}_s"] >= 0 for p in PARTS) and r["t_forward_s"] > 0 and r["t_backward_s"] > 0, r
        assert r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
        assert len(r["per_rank"]["t_step_s"]) == 2 and r["straggler_rank"] in (0, 1)
        assert r["mem_peak_bytes"] == max(r["per_rank"]["mem_peak_bytes"]) > 0
        assert 0.0 <= r["overlap"] <= 1.0
    # reference: rank 0's own steps 4..6 against the wall clock between its records (which also
    # holds step 3's logging, hence the lower bound's slack)
    wall = records[2]["elapsed_s"] - records[1]["elapsed_s"]
    measured = 3 * records[2]["per_rank"]["t_step_s"][0]
    assert 0.5 * wall <= measured <= 1.02 * wall + 1e-3, (layout, measured, wall)
    b = summary["breakdown"]
    assert b["totals"]["steps"] == 6 and set(b) >= {"t_step_s", "bytes_dp", "straggler_rank", "per_rank"}
    last = records[-1]
    axis = {"dp2": "dp", "pp2": "pp", "tp2": "tp", "ps": "ps"}[layout]
    assert last[f"bytes_{axis}"] > 0, last
    assert all(last[f"bytes_{a}"] == 0 for a in ("dp", "tp", "pp", "ps") if a != axis), last
    if layout == "pp2":
        # activations forward and their gradients back: m microbatches of (B/m, T, D) fp32 each way,
        # plus microbatch 0's 80-byte header and the step's few scalar collectives
        act = 2 * B * T * D * 4
        assert act <= last["bytes_pp"] <= act + 1024, last
        assert last["t_bubble_s"] > 0 and all(x > 0 for x in last["per_rank"]["t_bubble_s"]), last
    else:
        assert last["t_bubble_s"] == 0, last
    if layout == "tp2":
        assert last["overlap"] <= 0.05, last   # tensor-parallel all-reduces block the step: ~nothing hidden


def test_a_slowed_rank_is_named_and_the_other_waits_for_it(ranks):
    _, results = ranks
    _, base = results[0]["layouts"]["dp2"]
    _, slow = results[0]["slowed"]
    for r in slow[1:]:   # after the first (warm-up) step
        assert r["straggler_rank"] == 1, r
        assert r["t_data_s"] >= 0 and r["per_rank"]["t_sync_wait_s"][0] >= 0.6 * SLEEP_S, r
    grown = slow[-1]["per_rank"]["t_sync_wait_s"][0] - base[-1]["per_rank"]["t_sync_wait_s"][0]
    assert grown >= 0.6 * SLEEP_S, (slow[-1], base[-1])


def test_breakdown_off_adds_no_keys(ranks):
    _, results = ranks
    summary, records = results[0]["off"]
    assert records and not any(k.startswith(("t_", "bytes_")) for r in records for k in r), records
    assert "breakdown" not in summary


def test_bytes_dp_match_the_ring_formula_over_the_buckets(ranks):
    _, results = ranks
    for rank in results:
        torch_, auto, bf16 = rank["bytes"]
        assert torch_["buckets"] > 2 and auto["transport"] == "shm", auto
        for r in (torch_, auto, bf16):
            assert r["pm"]["bytes_dp"] == r["pm_ref"] > 0, r
            assert r["dp"]["bytes_dp"] == r["dp_ref"], r
            assert r["pm"]["bytes_tp"] == r["pm"]["bytes_pp"] == 0
            assert r["pm"]["comm_s"] > 0 and r["dp"]["t_sync_wait_s"] >= 0
        assert bf16["pm_ref"] * 2 == torch_["pm_ref"]   # bf16 on the wire: half the bytes


@pytest.mark.parametrize("layout,names", [
    ("dp2", {"trainlib.step#2", "trainlib.data", "trainlib.forward", "trainlib.backward", "trainlib.optimizer",
             "trainlib.bucket_launch", "trainlib.bucket_wait"}),
    ("pp2", {"trainlib.pp.F", "trainlib.pp.B", "trainlib.pp.recv_wait"}),
    ("ps", {"trainlib.ps_push", "trainlib.ps_pull", "trainlib.bucket_wait"}),
])
def test_profile_steps_write_a_chrome_trace_per_rank_with_named_ranges(ranks, layout, names):
    tmp, _ = ranks
    for rank in (0, 1):
        path = tmp / f"trace_{layout}" / f"trace_rank{rank}.json"
        events = json.loads(path.read_text())["traceEvents"]
        seen = {e.get("name") for e in events}
        assert names <= seen, (path, sorted(n for n in seen if str(n).startswith("trainlib")))
        assert "trainlib.step#3" not in seen   # only the asked-for step


def test_union_and_aggregate_against_hand_computed_tables():
    assert _union([(0, 2), (1, 3), (5, 6), (5.5, 5.7)], 0, 10) == pytest.approx(4.0)
    assert _union([(-1, 1), (9, 12)], 0, 10) == pytest.approx(2.0)

    def row(n, step, sync, bubble, mem, dp, comm, exposed):
        parts = {"forward": step - sync - bubble, "backward": 0, "sync_wait": sync, "optimizer": 0, "data": 0,
                 "bubble": bubble, "other": 0}
        return {"n": n, "t_step_s": step * n, **{f"t_{p}_s": v * n for p, v in parts.items()},
                "bytes_dp": dp * n, "bytes_tp": 0, "bytes_pp": 0, "bytes_ps": 0, "comm_s": comm * n,
                "exposed_comm_s": exposed * n, "mem_peak_bytes": mem}

    # three ranks: rank 2 computes longest (waits least), rank 1 has the median step time
    rows = [row(2, 1.0, 0.5, 0.0, 10, 100, 0.5, 0.25), row(2, 1.1, 0.6, 0.0, 30, 100, 0.5, 0.25),
            row(2, 1.2, 0.1, 0.0, 20, 100, 0.5, 0.0)]
    a = aggregate(rows)
    assert a["t_step_s"] == 1.1 and a["t_sync_wait_s"] == 0.6 and a["step_s_median"] == 1.1
    assert (a["step_s_min"], a["step_s_max"]) == (1.0, 1.2)
    assert a["straggler_rank"] == 2 and a["mem_peak_bytes"] == 30 and a["bytes_dp"] == 300
    assert a["overlap"] == pytest.approx(1 - 0.5 / 1.5, abs=1e-4)
    assert a["bw_gbps"] == pytest.approx(100 * 8 / 0.5 / 1e9, abs=1e-4)
    assert a["per_rank"]["t_sync_wait_s"] == [0.5, 0.6, 0.1]
