"""PP x TP x DP composed by tl.parallelize, against single-process training of the same GPT.

One 4-rank group trains DP2xTP2, DP2xPP2, PP2xTP2 (and PP2xTP2 with sequence parallelism) for 10 steps each (AdamW, global-norm
clipping that is active) and records the loss and the clipped norm; every rank also trains the
single-process reference itself. The losses must agree within 1e-4 at every step.
"""
from __future__ import annotations

import pytest
import torch

import trainlib as tl
from trainlib import comm
from trainlib.models.gpt import GPT, GPTConfig, lm_loss
from trainlib.tensor_parallel import GPT_PLAN, GPT_SP_PLAN
from trainlib.testing import run_ranks

CFG = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32)
STEPS, BATCH, CLIP = 10, 8, 0.5
LAYOUTS = [("dp2xtp2", 1, 2, 2, False), ("dp2xpp2", 2, 2, 1, False), ("pp2xtp2", 2, 1, 2, False),
           ("pp2xtp2+sp", 2, 1, 2, True)]


def _batches():
    g = torch.Generator().manual_seed(7)
    xs = [torch.randint(0, CFG.vocab_size, (BATCH, CFG.seq_len), generator=g) for _ in range(STEPS)]
    return [(x, (3 * x + 1) % CFG.vocab_size) for x in xs]  # a learnable token map


def _reference() -> tuple[list[float], list[float]]:
    model = GPT(CFG, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, norms = [], []
    for x, y in _batches():
        loss = lm_loss(model(x), y)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms


def _compose_worker() -> dict:
    ref_losses, ref_norms = _reference()
    out = {"ref": ref_losses}
    for name, pp, dp, tp, sp in LAYOUTS:
        mesh = tl.Mesh(pp=pp, dp=dp, tp=tp)
        plan = (GPT_SP_PLAN if sp else GPT_PLAN) if tp > 1 else None
        pm = tl.parallelize(GPT(CFG, seed=3), mesh, tp_plan=plan, schedule="1f1b", microbatches=2 * pp,
                            sequence_parallel=sp)
        opt = torch.optim.AdamW(pm.parameters(), lr=3e-3)
        per_dp = BATCH // dp
        sl = slice(mesh.rank("dp") * per_dp, (mesh.rank("dp") + 1) * per_dp)
        losses, norms = [], []
        for x, y in _batches():
            loss = pm.step(x[sl], y[sl]).reshape(1).double()
            norms.append(pm.clip_grad_norm_(CLIP).item())
            opt.step()
            opt.zero_grad(set_to_none=True)
            comm.all_reduce(loss, op="avg", group=mesh.group("dp"))
            losses.append(loss.item())
        pm.close()
        out[name] = {"loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                     "norm": max(abs(a - b) / b for a, b in zip(norms, ref_norms)),
                     "clipped": sum(n > CLIP for n in ref_norms)}
    return out


@pytest.fixture(scope="module")
def composed():
    return run_ranks(_compose_worker, 4, timeout_s=170)


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_layout_tracks_single_process(layout, composed):
    for rank, res in enumerate(composed):
        r = res[layout]
        assert r["clipped"] >= 5, r  # clipping must actually act for the norm check to mean anything
        assert r["loss"] < 1e-4, (rank, layout, r)
        assert r["norm"] < 1e-4, (rank, layout, r)
    first, last = composed[0]["ref"][0], composed[0]["ref"][-1]
    assert last < first  # the reference itself learns


# ---- `trainlib train` on every kind of layout: the same losses as pure data parallelism --------
TRAIN_ARGS = ["--train.steps", "8", "--train.batch_size", "16", "--train.log_every", "4", "--model.n_layer", "4",
              "--model.d_model", "64", "--model.seq_len", "32", "--train.warmup_steps", "2"]
TRAIN_LAYOUTS = [(1, 4, 1, "1f1b"), (2, 1, 2, "1f1b"), (2, 2, 1, "zb-h1"), (1, 2, 2, "1f1b"), (4, 1, 1, "gpipe"),
                 (1, 1, 4, "1f1b"), (2, 2, 1, "interleaved")]


def _trainer_worker(metrics: str) -> list[dict]:
    from trainlib import trainer
    from trainlib.config import load_config

    out = []
    for pp, dp, tp, sched in TRAIN_LAYOUTS:
        cfg = load_config(None, TRAIN_ARGS + ["--mesh.pp", str(pp), "--mesh.dp", str(dp), "--mesh.tp", str(tp),
                                              "--mesh.schedule", sched, "--train.metrics", metrics])
        s = trainer.train(cfg)
        out.append({"layout": (pp, dp, tp, sched), "loss_first": s["loss_first"], "loss_last": s["loss_last"]})
    return out


def test_trainer_every_layout_matches_data_parallel(tmp_path):
    res = run_ranks(_trainer_worker, 4, str(tmp_path / "m.jsonl"), env={"TRAINLIB_NO_PROGRESS": "1"}, timeout_s=170)[0]
    base = res[0]
    assert base["loss_last"] < base["loss_first"] - 0.5, base  # it trains
    for r in res[1:]:
        assert abs(r["loss_first"] - base["loss_first"]) < 1e-4, (r, base)
        assert abs(r["loss_last"] - base["loss_last"]) < 1e-4, (r, base)
