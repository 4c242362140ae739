"""Hierarchical all-reduce (shm inside a node, gloo across nodes) on 4 real gloo ranks that pretend
to be nodes through $TRAINLIB_NODE_ID, against a single-process reference and flat torch all-reduce.

Tolerance: fp32 summation order, not bit equality. Hierarchical sums (g0 + g1) + (g2 + g3) (node
sums first), gloo's flat all-reduce and the reference's autograd accumulation add the same terms
in other orders; fp32 addition is not associative, so results agree to a few ulp of the gradient
magnitude (~1 here): 1e-6 on gradients, 1e-5 on weights after SGD steps.

One spawned group of 4 ranks runs every multi-rank case (a start costs seconds per rank here).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import pytest
import torch
import torch.nn as nn

import trainlib as tl
from trainlib.sync.hierarchical import NodeLayout, check_usable
from trainlib.sync.shm import ALIGN, NODE_ID_ENV
from trainlib.testing import run_ranks

WORLD = 4
FAULT_TIMEOUT_S = 4.0  # also bounds the fault case's set-up, so not much shorter on a loaded 2-core machine
# name -> node of each rank (a string per rank, used as $TRAINLIB_NODE_ID)
LAYOUTS = {
    "2x2": ["a", "a", "b", "b"],
    "2x2-interleaved": ["a", "b", "a", "b"],
    "one-node": ["a"] * 4,
    "4x1": ["a", "b", "c", "d"],
    "3+1": ["a", "a", "a", "b"],
}


class UnevenNet(nn.Module):
    """Odd sizes (buckets and chunks not divisible by ranks x ALIGN, a bucket smaller than one
    chunk), a branch some ranks skip in some steps, a never-used layer, a frozen layer, fp64."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 7)
        self.fc1 = nn.Linear(7, 37)
        self.branch = nn.Linear(37, 37)
        self.never = nn.Linear(37, 37)
        self.frozen = nn.Linear(37, 37).requires_grad_(False)
        self.fc2 = nn.Linear(37, 5)
        self.d64 = nn.Linear(3, 3).double()  # its own 12-element bucket: local index 1's chunk is empty

    def forward(self, idx: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = self.fc1(self.emb(idx).mean(1)).tanh()
        if use_branch:
            h = h + self.branch(h)
        h = self.fc2(self.frozen(h))
        return torch.cat([h[:, :3] + self.d64(h[:, :3].double()).float(), h[:, 3:]], 1)


def _batch(step: int, micro: int, rank: int):
    g = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    return torch.randint(0, 11, (6, 4), generator=g), torch.randn(6, 5, generator=g)


def _use_branch(step: int, micro: int, rank: int) -> bool:
    return (step + micro + rank) % 3 != 0


def _grad_diff(a: nn.Module, b: nn.Module) -> float:
    worst = 0.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        if pa.requires_grad:
            ga = pa.grad if pa.grad is not None else torch.zeros_like(pa)
            gb = pb.grad if pb.grad is not None else torch.zeros_like(pb)
            worst = max(worst, (ga.double() - gb.double()).abs().max().item())
    return worst


def _weight_diff(a: nn.Module, b: nn.Module) -> float:
    return max((pa.double() - pb.double()).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def _train_side_by_side(rank: int, transport: str, mesh: tl.Mesh | None = None) -> dict:
    """Hierarchical (or `transport`), flat torch and a single-process reference of the dp group's
    batches, trained together: 2 synced steps, then 2 steps of 3 micro-batches (2 under no_sync)."""
    mesh = mesh or tl.Mesh(dp=WORLD)
    peers = mesh.group_ranks("dp")
    torch.manual_seed(0)
    ref, ours, flat = UnevenNet(), UnevenNet(), UnevenNet()
    for m in (ours, flat):
        m.load_state_dict(ref.state_dict())
    dp = tl.DataParallel(ours, mesh=mesh, sync=tl.AllReduce(bucket_mb=0.0015, transport=transport))
    dp_flat = tl.DataParallel(flat, mesh=mesh, sync=tl.AllReduce(bucket_mb=0.0015, transport="torch"))
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (ref, ours, flat)]
    mse = nn.functional.mse_loss
    diffs_ref, diffs_flat = [], []
    for step in range(4):
        micros = 1 if step < 2 else 3
        for model in (dp, dp_flat):
            for i in range(micros):
                x, y = _batch(step, i, rank)
                with model.no_sync() if i < micros - 1 else contextlib.nullcontext():
                    (mse(model(x, _use_branch(step, i, rank)), y) / micros).backward()
        for r in peers:  # the dp average: mean over the dp group of each rank's loss
            for i in range(micros):
                x, y = _batch(step, i, r)
                (mse(ref(x, _use_branch(step, i, r)), y) / (micros * len(peers))).backward()
        diffs_ref.append(_grad_diff(ours, ref))
        diffs_flat.append(_grad_diff(ours, flat))
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    prefix = os.path.basename(dp.sync._shm.prefix) if dp.sync._shm is not None else None
    dp.close()
    dp_flat.close()
    leftovers = [f for f in os.listdir("/dev/shm") if prefix and f.startswith(prefix)]
    return {"resolved": dp.sync.resolved_transport, "grad_diff_ref": max(diffs_ref),
            "grad_diff_flat": max(diffs_flat), "weight_diff_ref": _weight_diff(ours, ref),
            "weight_diff_flat": _weight_diff(ours, flat), "bucket_numels": [b.numel for b in dp.buckets],
            "leftovers": leftovers}


def _resolve(**sync_kwargs) -> str:
    dp = tl.DataParallel(nn.Linear(5, 3), sync=tl.AllReduce(**sync_kwargs))
    dp.close()
    return dp.sync.resolved_transport


def _compressed(rank: int, compress: str) -> dict:
    """Explicit hierarchical with a 16-bit wire (auto sends compressed buckets to torch): the
    in-node sums and the cross-node sum run in that format, like flat torch's compressed path."""
    torch.manual_seed(0)
    exact, lossy, flat = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
    for m in (lossy, flat):
        m.load_state_dict(exact.state_dict())
    dps = [tl.DataParallel(exact, sync=tl.AllReduce(transport="torch")),
           tl.DataParallel(lossy, sync=tl.AllReduce(transport="hierarchical", compress=compress)),
           tl.DataParallel(flat, sync=tl.AllReduce(transport="torch", compress=compress))]
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(rank))
    for dp in dps:
        dp(x).pow(2).mean().backward()
        dp.close()

    def rel(m: nn.Module) -> float:
        return max(((pa.grad - pb.grad).abs().max() / pa.grad.abs().max()).item()
                   for pa, pb in zip(exact.parameters(), m.parameters()))
    return {"rel_err": rel(lossy), "flat_rel_err": rel(flat), "resolved": dps[1].sync.resolved_transport,
            "dtype": str(dps[1].buckets[0].comm.dtype)}


def _skip_backward_with_short_timeout(rank: int, timeout_s: float) -> dict:
    """Rank 3 never runs its backward: every other rank must fail within the timeout, naming itself
    and the operation it waited in (its node's shm barrier, or the cross-node all-reduce)."""
    from trainlib import runtime

    runtime._RUNTIME = dataclasses.replace(runtime._RUNTIME, timeout_s=timeout_s)
    dp = tl.DataParallel(nn.Linear(64, 64), sync=tl.AllReduce(transport="hierarchical"))
    if rank == 3:  # alive but absent (a rank that exits would close its sockets: a fast failure, not a timeout)
        time.sleep(timeout_s + 2)
        return {"skipped": True}
    t0 = time.monotonic()
    try:
        dp(torch.randn(3, 64)).sum().backward()
    except Exception as e:  # the end-of-backward wait re-raises the worker's error
        return {"error": f"{type(e).__name__}: {e}", "elapsed_s": time.monotonic() - t0}
    return {"error": None, "elapsed_s": time.monotonic() - t0}


def four_ranks() -> dict:
    """Every multi-rank case, in one group; each case sets this rank's pretend node first."""
    rt = tl.init()
    out: dict = {"auto": {}, "train": {}}

    def as_node(layout: str) -> None:
        os.environ[NODE_ID_ENV] = LAYOUTS[layout][rt.rank]

    for layout in LAYOUTS:
        as_node(layout)
        out["auto"][layout] = _resolve()
    as_node("2x2")
    out["auto"]["2x2+bf16"] = _resolve(compress="bf16")
    as_node("3+1")
    try:
        _resolve(transport="hierarchical")
        out["bad_layout_error"] = None
    except ValueError as e:
        out["bad_layout_error"] = str(e)
    for layout, transport in [("2x2", "auto"), ("2x2-interleaved", "hierarchical"), ("4x1", "hierarchical")]:
        as_node(layout)
        out["train"][layout] = _train_side_by_side(rt.rank, transport)
    # dp inside a larger mesh (dp groups {0, 2} and {1, 3}, each rank on its own node): the cross-node
    # groups are made by their members alone, not by the whole world
    as_node("4x1")
    out["train"]["dp2xtp2-4x1"] = _train_side_by_side(rt.rank, "hierarchical", tl.Mesh(dp=2, tp=2))
    as_node("2x2")
    out["compressed"] = {c: _compressed(rt.rank, c) for c in ("bf16", "fp16")}
    out["fault"] = _skip_backward_with_short_timeout(rt.rank, FAULT_TIMEOUT_S)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(four_ranks, WORLD, timeout_s=150)


def test_auto_picks_hierarchical_only_for_equal_multi_rank_nodes(results):
    for r in results:
        assert r["auto"] == {"2x2": "hierarchical", "2x2-interleaved": "hierarchical", "one-node": "shm",
                             "4x1": "torch", "3+1": "torch", "2x2+bf16": "torch"}, r["auto"]


@pytest.mark.parametrize("layout", ["2x2", "2x2-interleaved", "4x1", "dp2xtp2-4x1"])
def test_gradients_and_weights_equal_reference_and_flat_torch(results, layout):
    for rank, r in enumerate(results):
        t = r["train"][layout]
        assert t["resolved"] == "hierarchical", t
        assert t["grad_diff_ref"] <= 1e-6 and t["grad_diff_flat"] <= 1e-6, (rank, t)
        assert t["weight_diff_ref"] <= 1e-5 and t["weight_diff_flat"] <= 1e-5, (rank, t)
        assert t["leftovers"] == [], t
        numels = t["bucket_numels"]
        # several buckets; some whose chunks do not divide evenly, one smaller than a chunk (empty chunk)
        assert len(numels) >= 4 and any(n % (2 * ALIGN) for n in numels) and min(numels) < ALIGN, numels


def test_explicit_hierarchical_on_unequal_nodes_names_layout_and_fix(results):
    for r in results:
        msg = r["bad_layout_error"]
        assert msg is not None
        assert "[3, 1]" in msg and "node 0: ranks [0, 1, 2]" in msg and "--nproc-per-node" in msg, msg
        assert "transport='torch'" in msg, msg


@pytest.mark.parametrize("compress,tol", [("bf16", 2 ** -7), ("fp16", 2 ** -10)])
def test_explicit_hierarchical_with_compression_is_within_rounding(results, compress, tol):
    for r in results:
        c = r["compressed"][compress]
        assert c["resolved"] == "hierarchical" and c["dtype"] == f"torch.{ {'bf16': 'bfloat16', 'fp16': 'float16'}[compress]}"
        assert 0 < c["rel_err"] <= tol and c["flat_rel_err"] <= tol, c


def test_a_missing_rank_fails_the_others_within_the_timeout_naming_rank_and_step(results):
    for rank, r in enumerate(results[:3]):
        f = r["fault"]
        assert f["error"] is not None and f["error"].startswith("CollectiveTimeout"), f
        assert f"rank {rank}" in f["error"] and f"within {FAULT_TIMEOUT_S:.0f}s" in f["error"], f
        assert "barrier" in f["error"] if rank == 2 else "cross-node step of bucket 0" in f["error"], f
        assert FAULT_TIMEOUT_S - 0.1 <= f["elapsed_s"] < FAULT_TIMEOUT_S + 5, f
    assert results[3]["fault"] == {"skipped": True}


def test_node_layout_groups_ranks_by_node_and_pairs_local_indexes():
    facts = [(n, True, 1 << 30, 1 << 20) for n in (7, 9, 7, 9)]
    lay = NodeLayout.from_facts(facts, [0, 1, 2, 3], rank=3)
    assert lay.nodes == ((0, 2), (1, 3)) and lay.local == (1, 3) and lay.local_index == 1
    assert lay.cross == (2, 3) and lay.node_index == 1
    bad = NodeLayout.from_facts([(7, True, 1 << 30, 1)] * 3 + [(9, True, 1 << 30, 1)], [4, 5, 6, 7], rank=4)
    with pytest.raises(ValueError, match=r"\[3, 1\].*nproc-per-node"):
        check_usable(bad, [(7, True, 1 << 30, 1)] * 3 + [(9, True, 1 << 30, 1)])
    # each node's tmpfs must hold its own ranks' buckets (here: 2 x 48 MiB in a 64 MiB /dev/shm)
    full = [(7, True, 64 << 20, 48 << 20)] * 2 + [(9, True, 1 << 30, 48 << 20)] * 2
    with pytest.raises(ValueError, match="needs 96 MiB.*64 MiB are free"):
        check_usable(NodeLayout.from_facts(full, [0, 1, 2, 3], rank=0), full)
