"""Tensor parallel at tp=2 against a single-process run of the same model (same seed).

One spawned group checks the layers, `apply_plan` on a model written here, the whole GPT with
vocab-parallel cross-entropy, collective counts per block and global-norm clipping.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlib as tl
from trainlib import comm
from trainlib.data_parallel import grad_norm
from trainlib.models.gpt import GPT, GPTConfig, lm_loss
from trainlib.tensor_parallel import (GPT_PLAN, GPT_SP_PLAN, ColumnParallelLinear, PlanError, RowParallelLinear,
                                      VocabParallelEmbedding, apply_plan, sync_sequence_parallel_grads,
                                      vocab_parallel_cross_entropy)
from trainlib.testing import run_ranks

TOL = 1e-5


class TinyTagger(nn.Module):
    """A model trainlib did not write: embedding -> MLP -> per-token classifier."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.emb = nn.Embedding(12, 8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
        self.out = nn.Linear(8, 6)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, ids):
        return self.out(torch.relu(self.body(self.emb(ids))))


TAGGER_PLAN = {"emb": "vocab", "body.0": "colwise", "body.2": "rowwise", "out": "colwise_gather"}


def full_slice(module: nn.Module, pname: str, full: torch.Tensor) -> torch.Tensor:
    """The part of a full tensor that `module` (maybe tensor-parallel) holds on this rank."""
    if isinstance(module, ColumnParallelLinear):
        return full[module.rank * module.out_local:(module.rank + 1) * module.out_local]
    if isinstance(module, RowParallelLinear) and pname == "weight":
        return full[:, module.rank * module.in_local:(module.rank + 1) * module.in_local]
    if isinstance(module, VocabParallelEmbedding):
        return full[module.vocab_start:module.vocab_start + module.vocab_local]
    return full


def grad_error(ref: nn.Module, tp: nn.Module) -> float:
    ref_p = dict(ref.named_parameters())
    err = 0.0
    for mname, m in tp.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            full = ref_p[f"{mname}.{pname}" if mname else pname].grad
            err = max(err, (full_slice(m, pname, full) - p.grad).abs().max().item())
    return err


def _tp_worker() -> dict:
    mesh = tl.Mesh(pp=1, dp=1, tp=2)
    group = mesh.group("tp")
    out = {}
    torch.manual_seed(0)

    # --- a model written here, through apply_plan(plan)
    ref = TinyTagger()
    tp = apply_plan(copy.deepcopy(ref), mesh, TAGGER_PLAN)
    ids = torch.randint(0, 12, (4, 5))
    y = torch.randn(4, 5, 6)
    F.mse_loss(ref(ids), y).backward()
    loss_tp = F.mse_loss(tp(ids), y)
    loss_tp.backward()
    out["tagger_loss"] = abs(loss_tp.item() - F.mse_loss(ref(ids), y).item())
    out["tagger_grad"] = grad_error(ref, tp)
    out["tagger_types"] = [type(tp.emb).__name__, type(tp.body[0]).__name__, type(tp.body[2]).__name__]

    # --- vocab-parallel cross-entropy alone (including a bf16 input's gradient dtype)
    logits = torch.randn(6, 10, requires_grad=True)
    target = torch.randint(0, 10, (6,))
    F.cross_entropy(logits, target).backward()
    local = logits.detach()[:, mesh.rank("tp") * 5:(mesh.rank("tp") + 1) * 5].clone().requires_grad_()
    ce = vocab_parallel_cross_entropy(local, target, group)
    ce.backward()
    out["ce_loss"] = abs(ce.item() - F.cross_entropy(logits, target).item())
    out["ce_grad"] = (local.grad - logits.grad[:, mesh.rank("tp") * 5:(mesh.rank("tp") + 1) * 5]).abs().max().item()

    # --- the whole GPT, tp=2, logits never gathered
    cfg = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32)
    gref = GPT(cfg, seed=1)
    gtp = apply_plan(copy.deepcopy(gref), mesh, GPT_PLAN)
    idx = torch.randint(0, 64, (3, 16))
    tgt = torch.randint(0, 64, (3, 16))
    lref = lm_loss(gref(idx), tgt)
    lref.backward()
    logits_local = gtp(idx)
    out["gpt_logits_width"] = logits_local.shape[-1]
    ltp = vocab_parallel_cross_entropy(logits_local, tgt, group)
    ltp.backward()
    out["gpt_loss"] = abs(ltp.item() - lref.item())
    out["gpt_grad"] = grad_error(gref, gtp)

    # --- global grad norm over tp: sharded squares summed, replicated counted once
    ref_norm = torch.nn.utils.clip_grad_norm_(gref.parameters(), float("inf")).item()
    out["norm_err"] = abs(grad_norm(gtp.parameters(), mesh).item() - ref_norm)

    # --- collectives per transformer block: Megatron's 2 all-reduces forward, 2 backward
    block = gtp.blocks[0]
    x = torch.randn(2, 16, 32, requires_grad=True)
    before = comm.recent_collectives()[-1].seq
    yb = block(x)
    mid = comm.recent_collectives()[-1].seq
    yb.sum().backward()
    recs = comm.recent_collectives()
    out["block_fwd"] = sorted({r.op for r in recs if before < r.seq <= mid}), sum(before < r.seq <= mid for r in recs)
    out["block_bwd"] = sorted({r.op for r in recs if r.seq > mid}), sum(r.seq > mid for r in recs)

    # --- sequence parallelism: same loss and grads; per block 2 all-gathers + 2 reduce-scatters each way
    gref.zero_grad(set_to_none=True)
    lm_loss(gref(idx), tgt).backward()
    gsp = apply_plan(copy.deepcopy(GPT(cfg, seed=1)), mesh, GPT_SP_PLAN, sequence_parallel=True)
    lsp = vocab_parallel_cross_entropy(gsp(idx), tgt, group)
    lsp.backward()
    sync_sequence_parallel_grads(gsp, mesh)
    out["sp_loss"] = abs(lsp.item() - lref.item())
    out["sp_grad"] = grad_error(gref, gsp)
    x = torch.randn(2, 8, 32, requires_grad=True)  # this rank's half of a 16-token sequence
    before = comm.recent_collectives()[-1].seq
    yb = gsp.blocks[0](x)
    mid = comm.recent_collectives()[-1].seq
    yb.sum().backward()
    recs = comm.recent_collectives()
    fwd = [r.op for r in recs if before < r.seq <= mid]
    bwd = [r.op for r in recs if r.seq > mid]
    out["sp_fwd"] = {op: fwd.count(op) for op in set(fwd)}
    out["sp_bwd"] = {op: bwd.count(op) for op in set(bwd)}
    out["sp_shape"] = list(yb.shape)
    return out


@pytest.fixture(scope="module")
def tp_results():
    return run_ranks(_tp_worker, 2, timeout_s=120)


def test_apply_plan_on_a_model_written_here(tp_results):
    for r in tp_results:
        assert r["tagger_types"] == ["VocabParallelEmbedding", "ColumnParallelLinear", "RowParallelLinear"]
        assert r["tagger_loss"] < TOL and r["tagger_grad"] < TOL, r


def test_vocab_parallel_cross_entropy(tp_results):
    for r in tp_results:
        assert r["ce_loss"] < TOL and r["ce_grad"] < TOL, r


def test_gpt_tp2_matches_single_process(tp_results):
    for r in tp_results:
        assert r["gpt_logits_width"] == 32  # vocab 64 / tp 2: the full logits never exist
        assert r["gpt_loss"] < TOL and r["gpt_grad"] < TOL, r
        assert r["norm_err"] < 1e-6, r


def test_collectives_per_block_match_megatron(tp_results):
    for r in tp_results:
        assert r["block_fwd"] == (["all_reduce[sum]"], 2), r
        assert r["block_bwd"] == (["all_reduce[sum]"], 2), r


def test_sequence_parallel_matches_and_counts(tp_results):
    for r in tp_results:
        assert r["sp_loss"] < TOL and r["sp_grad"] < TOL, r
        assert r["sp_shape"] == [2, 8, 32]  # activations between blocks stay split along the sequence
        assert r["sp_fwd"] == {"all_gather": 2, "reduce_scatter": 2}, r
        assert r["sp_bwd"] == {"all_gather": 2, "reduce_scatter": 2}, r


def test_plan_errors_name_the_fix():
    m = TinyTagger()
    with pytest.raises(PlanError, match="match no module"):
        apply_plan(copy.deepcopy(m), None, {"nothing.*": "colwise"})
    with pytest.raises(PlanError, match="needs Linear"):
        apply_plan(copy.deepcopy(m), None, {"emb": "colwise"})
    with pytest.raises(PlanError, match="not a style"):
        apply_plan(copy.deepcopy(m), None, {"out": "diagonal"})
    # tp=1 (no mesh): conversion is the identity numerically
    ids = torch.randint(0, 12, (2, 3))
    torch.testing.assert_close(apply_plan(copy.deepcopy(m), None, TAGGER_PLAN)(ids), m(ids), rtol=0, atol=0)
