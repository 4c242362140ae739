"""Pipeline schedules against a single-process full-batch run of the same layers (same seed).

p in {2, 4} x m in {p, 2p} x {gpipe, 1f1b, interleaved, zb-h1}: the loss and every gradient
within 1e-5, and the most activations each rank held at once equals the peak that the schedule's
definition gives (`expected_peak`). Failure cases (shape/dtype change between microbatches, a killed stage) must raise
the pipeline's timeout error naming stage, microbatch and action, not hang.
"""
from __future__ import annotations

import os
import re
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlib as tl
import trainlib.comm  # noqa: F401  (tl.comm)
from trainlib.pipeline import Pipeline, PipelineError, build_schedule, theory_bubble
from trainlib.pipeline.partition import PartitionError, balance
from trainlib.pipeline.schedules import ScheduleError
from trainlib.testing import RankError, run_ranks

SCHEDULES = ["gpipe", "1f1b", "interleaved", "zb-h1"]
TOL = 1e-5


def make_layers(n: int = 8, d: int = 6) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n)]


def loss_fn(y, t):
    return F.mse_loss(y, t)


def expected_peak(name: str, p: int, m: int, v: int, rank: int) -> int:
    """Most (stage, microbatch) activations `rank` holds at once, from each schedule's definition.

    An activation is held from its F until its B (or, split, its W)."""
    if name == "gpipe":  # every forward before any backward
        return m
    if name == "1f1b":  # p - rank - 1 warm-up forwards, then the F of the first F/B pair
        return min(p - rank, m)
    if name == "zb-h1":  # 1F1B's p - rank, plus the `rank` W's it keeps pending (Qi et al. 2023, ZB-H1)
        return min(p, m)
    if name == "interleaved":  # Megatron: 2 (p - rank - 1) + (v - 1) p warm-up forwards, then F/B pairs
        return min(2 * (p - rank - 1) + (v - 1) * p + 1, v * m)
    raise KeyError(name)


def replay_peak(schedule, rank: int) -> tuple[int, dict[int, int]]:
    """(peak per rank, peak per stage) of activations held when `rank` runs its actions in order."""
    held, per_stage, peak, peak_stage = 0, {}, 0, {}
    for a in schedule.actions[rank]:
        step = {"F": 1, "B": -1, "W": -1, "I": 0}[a.kind]  # I keeps the activation for W
        held += step
        per_stage[a.stage] = per_stage.get(a.stage, 0) + step
        peak = max(peak, held)
        peak_stage[a.stage] = max(peak_stage.get(a.stage, 0), per_stage[a.stage])
    return peak, peak_stage


class _Watched(Pipeline):
    """A Pipeline that records the most activations it really held at once (its saved (x, y) pairs)."""

    held_peak = 0

    def _forward(self, *args) -> None:
        super()._forward(*args)
        self.held_peak = max(self.held_peak, len(self._state.saved))  # only a forward adds one


def _schedules_worker(p: int) -> dict:
    mesh = tl.Mesh(pp=p, dp=1, tp=1)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4 * p, 6, generator=g), torch.randn(4 * p, 6, generator=g)
    ref = make_layers()
    full = nn.Sequential(*ref)
    ref_loss = loss_fn(full(x), t)
    ref_loss.backward()
    out = {}
    for name in SCHEDULES:
        for m in (p, 2 * p):
            layers = make_layers()
            pipe = _Watched(layers, mesh, schedule=name, microbatches=m, loss_fn=loss_fn)
            errs = []
            for step in range(2):  # the second step checks that per-step state resets
                for q in pipe.parameters():
                    q.grad = None
                loss = pipe.step(x, t)
                errs.append(abs(loss.item() - ref_loss.item()))
            for mine, theirs in zip(layers, ref):
                for q, g in zip(mine.parameters(), theirs.parameters()):
                    if q.grad is not None:
                        errs.append((q.grad - g.grad).abs().max().item())
                    elif any(pipe.holds_stage(s) and mine in list(pipe.stages[s]) for s in pipe.stages):
                        errs.append(float("inf"))  # a layer of mine without a gradient
            out[(name, m)] = {"err": max(errs), "peak": pipe.stats()["peak_inflight"], "held": pipe.held_peak,
                              "v": pipe.virtual_stages}
    return out


@pytest.fixture(scope="module")
def p4():
    return run_ranks(_schedules_worker, 4, 4, timeout_s=150)


@pytest.fixture(scope="module")
def p2():
    return run_ranks(_schedules_worker, 2, 2, timeout_s=150)


@pytest.mark.parametrize("p", [2, 4])
def test_every_schedule_matches_single_process(p, p2, p4):
    results = {2: p2, 4: p4}[p]
    for rank, res in enumerate(results):
        for (name, m), r in res.items():
            assert r["err"] < TOL, (p, rank, name, m, r)


@pytest.mark.parametrize("p", [2, 4])
def test_peak_inflight_activations(p, p2, p4):
    # what each rank really held (runtime) against the schedule's definition, every schedule and m
    results = {2: p2, 4: p4}[p]
    for rank, res in enumerate(results):
        for (name, m), r in res.items():
            want = expected_peak(name, p, m, r["v"], rank)
            assert r["held"] == want, (name, p, m, rank, r)
            # the runtime's per-stage counters (what `trainlib bench pp` reports) agree with the actions
            assert r["peak"] == replay_peak(build_schedule(name, p, m), rank)[1], (name, p, m, rank, r)
            if name != "interleaved":  # one stage per rank: the stage's peak is the rank's
                assert r["peak"] == {rank: want}, (name, p, m, rank, r)


@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("interleaved", 2), ("interleaved", 3)])
def test_schedule_peak_activations_equal_the_definition(name, v):
    for p in (1, 2, 3, 4, 8):
        for m in range(1, 17):
            if name == "interleaved" and m % p:
                continue
            s = build_schedule(name, p, m, v if name == "interleaved" else None)
            got = [replay_peak(s, r)[0] for r in range(p)]
            assert got == [expected_peak(name, p, m, v, r) for r in range(p)], (name, p, m, v)


@pytest.mark.parametrize("name,p,m,v", [(n, p, m, 2 if n == "interleaved" else 1) for n in SCHEDULES
                                        for p in (2, 4) for m in (4, 8, 16) if m >= p])
def test_simulated_bubble_equals_theory(name, p, m, v):
    s = build_schedule(name, p, m, v if name == "interleaved" else None)
    assert s.simulate()["bubble"] == pytest.approx(theory_bubble(name, p, m, v), abs=1e-12)


def test_schedule_table_and_errors():
    s = build_schedule("1f1b", 2, 2)
    table = s.table(mark=(1, 1))
    assert "rank 0" in table and "B1.0*" in table and table.count("\n") == 1 + 3 * (2 + 2 - 1)  # title + header + makespan rows
    with pytest.raises(ScheduleError, match="multiple of pp"):
        build_schedule("interleaved", 4, 6)
    with pytest.raises(ScheduleError, match="unknown schedule"):
        build_schedule("2f2b", 2, 2)
    with pytest.raises(PartitionError, match="at most 3 stages"):
        balance([1, 1, 1], 4)
    assert balance([5, 1, 1, 1, 1, 5], 3) == [0, 1, 5, 6]


class _Drifting(nn.Module):
    """Changes its output on the second microbatch: shape (`mode="shape"`) or dtype."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode, self.calls, self.lin = mode, 0, nn.Linear(6, 6)

    def forward(self, x):
        self.calls += 1
        y = self.lin(x)
        if self.calls == 2 and self.mode == "shape":
            return y[:, :4]
        if self.calls == 2 and self.mode == "dtype":
            return y.double()
        return y


def _failure_worker(mode: str) -> str:
    mesh = tl.Mesh(pp=2, dp=1, tp=1)
    layers = [_Drifting(mode if not mode.startswith("kill") else "none"), nn.Linear(6, 6)]
    pipe = Pipeline(layers, mesh, schedule="1f1b", microbatches=4, loss_fn=loss_fn)
    # both stages set up before the faulty step: a sender that fails at once and exits would
    # otherwise take the store (rank 0 hosts it) from a receiver still building its groups
    tl.comm.barrier()
    pipe.step(torch.randn(8, 6), torch.randn(8, 6))
    if mode.startswith("kill"):
        tl.comm.barrier()  # step 1 is fully received everywhere
        if mesh.rank("pp") == (0 if mode == "kill" else 1):
            os._exit(1)  # a stage dies between steps, as a crashed process would
        if mode == "kill_last":
            time.sleep(1.0)  # its connection is closed before the survivor posts its next transfer
    pipe.step(torch.randn(8, 6), torch.randn(8, 6))
    return "finished"


@pytest.mark.parametrize("mode", ["shape", "dtype", "kill"])
def test_failures_raise_named_timeout(mode):
    res = run_ranks(_failure_worker, 2, mode, env={"TRAINLIB_TIMEOUT_S": "3"}, expect_failure=True, timeout_s=60)
    assert all(isinstance(r, RankError) for r in res), res
    receiver = str(res[1])
    assert "PipelineTimeout" in receiver and "stage 1, microbatch" in receiver and "action" in receiver, receiver
    if mode == "kill":
        assert "stage 1, microbatch 0, action F1.0" in receiver, receiver
    else:
        sender = str(res[0])
        assert "PipelineError" in sender and "microbatch 1" in sender, sender
        # the receiver fails receiving microbatch 1 (or 0, if the sender's process exited before its
        # asynchronous send of microbatch 0 was delivered), or sending microbatch 0's gradient back to
        # the dead sender (gloo refuses that post at once)
        assert re.search(r"stage 1, microbatch [01], action (F1\.[01]|B1\.0) ", receiver) and "*" in receiver, receiver


def test_transfer_posted_to_a_dead_stage_raises_named_timeout():
    # gloo refuses the post itself (not the wait) once the peer's connection is closed: the pipeline
    # must still name the stage, microbatch and action (CI once saw the bare gloo RuntimeError)
    res = run_ranks(_failure_worker, 2, "kill_last", env={"TRAINLIB_TIMEOUT_S": "3"}, expect_failure=True,
                    timeout_s=60)
    survivor = str(res[0])
    assert "PipelineTimeout" in survivor and "stage 0, microbatch 0, action F0.0" in survivor, survivor
    assert "closed by peer" in survivor or "reset by peer" in survivor, survivor


class _CountBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _CountBackward.calls += 1
        return g


class _Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return _CountBackward.apply(torch.tanh(self.lin(x)))


def _zb_count_worker() -> int:
    mesh = tl.Mesh(pp=2, dp=1, tp=1)
    pipe = Pipeline([_Counted(), _Counted()], mesh, schedule="zb-h1", microbatches=4, loss_fn=loss_fn)
    pipe.step(torch.randn(8, 6), torch.randn(8, 6))
    return _CountBackward.calls


def test_zb_weight_step_does_not_redo_the_input_backward():
    # I walks the stage graph once per microbatch; W reuses the captured gradients (a second walk
    # from the output would call the counter 8 times on the stage whose input needs a gradient)
    assert run_ranks(_zb_count_worker, 2, timeout_s=60) == [4, 4]


def _single_rank_interleaved_worker() -> float:
    mesh = tl.Mesh(pp=1, dp=1, tp=1)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    ref = nn.Sequential(*make_layers(4))
    ref_loss = loss_fn(ref(x), t)
    ref_loss.backward()
    layers = make_layers(4)
    pipe = Pipeline(layers, mesh, schedule="interleaved", microbatches=4, loss_fn=loss_fn)  # 2 stages, 1 rank
    errs = [abs(pipe.step(x, t).item() - ref_loss.item())]
    for mine, theirs in zip(layers, ref):
        errs += [(q.grad - r.grad).abs().max().item() for q, r in zip(mine.parameters(), theirs.parameters())]
    return max(errs)


def test_virtual_stages_on_one_rank():
    # consecutive stages on the same rank hand tensors over locally (no self-send), prefetch included
    assert run_ranks(_single_rank_interleaved_worker, 1, timeout_s=60)[0] < TOL


def _dp_pp_overlap_worker() -> dict:
    """dp2 x pp2: each stage's buckets start reducing right after its last backward (issue 14 item 10)."""
    mesh = tl.Mesh(pp=2, dp=2, tp=1)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(32, 6, generator=g), torch.randn(32, 6, generator=g)
    ref_layers = make_layers(8)
    loss_fn(nn.Sequential(*ref_layers)(x), t).backward()   # full batch = the dp average of equal halves
    ref_norm = torch.cat([p.grad.reshape(-1) for m in ref_layers for p in m.parameters()]).norm().item()
    half = slice(16 * mesh.rank("dp"), 16 * mesh.rank("dp") + 16)
    out = {}
    for schedule, shard in (("interleaved", None), ("zb-h1", None), ("interleaved", "gradients")):
        layers = make_layers(8)
        pm = tl.parallelize(layers, mesh, loss_fn=loss_fn, schedule=schedule, microbatches=4,
                            virtual_stages=2 if schedule == "interleaved" else None, bucket_mb=0.0002, shard=shard)
        dp, calls = pm.dp_model, []
        stage_params = [{id(p) for p in stage.parameters()} for stage in pm.local]
        spans = [b.part for b in dp.buckets if not all(id(p) in stage_params[b.part] for p in b.params)]
        reduce_part = dp.reduce_part

        def recording(part, reduce_part=reduce_part, dp=dp, calls=calls):
            reduce_part(part)
            calls.append((part, all(b.started for b in dp.buckets if b.part == part),
                          sum(not b.started for b in dp.buckets)))
        dp.reduce_part = recording
        loss = pm.step(x[half], t[half]).item()
        res = {"spans": spans, "calls": calls, "n_parts": len(pm.local), "norm": pm.grad_norm().item(), "ref_norm": ref_norm, "loss": loss}
        if shard is None:
            kept = {id(m) for stage in pm.local for m in stage}
            res["grad_err"] = max((p.grad - r.grad).abs().max().item() for i, m in enumerate(layers) if id(m) in kept
                                  for p, r in zip(m.parameters(), ref_layers[i].parameters()))
        out[f"{schedule}/{shard}"] = res
        pm.close()
    return out


def test_dp_over_pp_reduces_each_stage_when_its_backward_is_done():
    for res in run_ranks(_dp_pp_overlap_worker, 4, timeout_s=180):
        for key, r in res.items():
            assert r["spans"] == [], (key, r)                      # no bucket holds two stages' parameters
            assert sorted(p for p, _, _ in r["calls"]) == list(range(r["n_parts"])), (key, r)   # each stage once
            assert all(started for _, started, _ in r["calls"]), (key, r)
            if key.startswith("interleaved"):   # the first stage done launches while the other still runs
                assert r["calls"][0][2] > 0, (key, r)
            assert abs(r["norm"] - r["ref_norm"]) < 1e-4 * max(1.0, r["ref_norm"]), (key, r)
            if "grad_err" in r:
                assert r["grad_err"] < TOL, (key, r)


def _changing_batch_worker() -> float:
    # after step 1 the header rides with microbatch 0's activation; a new shape must still get through
    mesh = tl.Mesh(pp=2, dp=1, tp=1)
    layers, ref = make_layers(4), nn.Sequential(*make_layers(4))
    pipe = Pipeline(layers, mesh, schedule="1f1b", microbatches=4, loss_fn=loss_fn)
    g = torch.Generator().manual_seed(3)
    errs = []
    for batch in (8, 8, 16, 16, 8):
        x, t = torch.randn(batch, 6, generator=g), torch.randn(batch, 6, generator=g)
        for m in (*layers, ref):
            m.zero_grad(set_to_none=True)
        ref_loss = loss_fn(ref(x), t)
        ref_loss.backward()
        errs.append(abs(pipe.step(x, t).item() - ref_loss.item()))
        for i in range(4):
            if pipe.holds_stage(0 if i < 2 else 1):
                errs += [(q.grad - r.grad).abs().max().item()
                         for q, r in zip(layers[i].parameters(), ref[i].parameters())]
    return max(errs)


def test_batch_shape_may_change_between_steps():
    assert max(run_ranks(_changing_batch_worker, 2, timeout_s=60)) < TOL
