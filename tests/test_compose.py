"""PP x TP x DP composed by tl.parallelize, against single-process training of the same GPT.

One 4-rank group trains DP2xTP2, DP2xPP2, PP2xTP2 (and PP2xTP2 with sequence parallelism) for 10 steps each (AdamW, global-norm
clipping that is active) and records the loss and the clipped norm; every rank also trains the
single-process reference itself. The losses must agree within 1e-4 at every step, and the final
weights (tp slices gathered, every rank's copy of every parameter) with the reference's.
`trainlib train` on seven layouts is held to a single-process `trainlib train` the same way.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import trainlib as tl
from trainlib import comm
from trainlib.models.gpt import GPT, GPTConfig, lm_loss
from trainlib.tensor_parallel import GPT_PLAN, GPT_SP_PLAN, ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from trainlib.testing import run_ranks

CFG = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32)
STEPS, BATCH, CLIP = 10, 8, 0.5
LAYOUTS = [("dp2xtp2", 1, 2, 2, False), ("dp2xpp2", 2, 2, 1, False), ("pp2xtp2", 2, 1, 2, False),
           ("pp2xtp2+sp", 2, 1, 2, True)]
# Final weights after AdamW steps differ from the reference only by reduction order: measured 0.6e-6 to
# 1.3e-5 (tp=4), against ~3e-3 that one AdamW step moves a weight at peak lr.
WEIGHT_TOL = 1e-4


def _split_dim(module: torch.nn.Module, pname: str) -> int | None:
    """The dim a tensor-parallel layer slices this parameter along (None: every tp rank holds all of it)."""
    if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
        return 0
    if isinstance(module, RowParallelLinear) and pname == "weight":
        return 1
    return None


def _held_weights(model: torch.nn.Module, held, mesh) -> dict[str, torch.Tensor]:
    """This rank's parameters by their full-model names, tp slices gathered into whole tensors.

    `model` is the GPT that was parallelized (its modules are the stages', TP-converted in place);
    `held` the parameters this rank trains. Collective over tp: tp peers hold the same stages."""
    ids = {id(q) for q in held}
    out = {}
    for mname, mod in model.named_modules():
        for pname, q in mod.named_parameters(recurse=False):
            if id(q) not in ids:
                continue
            t = q.detach().contiguous()
            dim = _split_dim(mod, pname)
            if dim is not None and mesh.size("tp") > 1:
                parts = [torch.empty_like(t) for _ in range(mesh.size("tp"))]
                comm.all_gather(parts, t, group=mesh.group("tp"))
                t = torch.cat(parts, dim)
            out[f"{mname}.{pname}" if mname else pname] = t.clone()
    return out


def _weight_diff(mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max((mine[k].double() - ref[k].double()).abs().max().item() for k in mine)


def _assert_covers_reference(per_rank: list[set[str]], ref: dict) -> None:
    """Together the ranks hold every parameter of the reference, with the reference's names."""
    assert set().union(*per_rank) == set(ref), sorted(set(ref) ^ set().union(*per_rank))


def _batches():
    g = torch.Generator().manual_seed(7)
    xs = [torch.randint(0, CFG.vocab_size, (BATCH, CFG.seq_len), generator=g) for _ in range(STEPS)]
    return [(x, (3 * x + 1) % CFG.vocab_size) for x in xs]  # a learnable token map


def _reference() -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
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
    return losses, norms, {k: q.detach().clone() for k, q in model.named_parameters()}


def _train_against(pm, opt, mesh, gpt, ref) -> dict:
    """Train the composed model on this dp rank's slice of every batch; compare with the reference."""
    ref_losses, ref_norms, ref_weights = ref
    per_dp = BATCH // mesh.size("dp")
    sl = slice(mesh.rank("dp") * per_dp, (mesh.rank("dp") + 1) * per_dp)
    losses, norms = [], []
    for x, y in _batches():
        loss = pm.step(x[sl], y[sl]).reshape(1).double()
        norms.append(pm.clip_grad_norm_(CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        comm.all_reduce(loss, op="avg", group=mesh.group("dp"))
        losses.append(loss.item())
    sharded = getattr(pm.dp_model, "sharded", False)
    with pm.dp_model.gathered() if sharded else contextlib.nullcontext():  # stage 3 keeps slices between steps
        weights = _held_weights(gpt, pm.parameters(), mesh)
    pm.close()
    return {"loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "norm": max(abs(a - b) / b for a, b in zip(norms, ref_norms)),
            "clipped": sum(n > CLIP for n in ref_norms),
            "weights": _weight_diff(weights, ref_weights), "names": set(weights)}


def _compose_worker() -> dict:
    ref_losses, ref_norms, ref_weights = _reference()
    out = {"ref": ref_losses}
    for name, pp, dp, tp, sp in LAYOUTS:
        mesh = tl.Mesh(pp=pp, dp=dp, tp=tp)
        plan = (GPT_SP_PLAN if sp else GPT_PLAN) if tp > 1 else None
        gpt = GPT(CFG, seed=3)
        pm = tl.parallelize(gpt, mesh, tp_plan=plan, schedule="1f1b", microbatches=2 * pp,
                            sequence_parallel=sp)
        opt = torch.optim.AdamW(pm.parameters(), lr=3e-3)
        out[name] = _train_against(pm, opt, mesh, gpt, (ref_losses, ref_norms, ref_weights))
    out["ref_names"] = set(ref_weights)
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
        assert r["weights"] < WEIGHT_TOL, (rank, layout, r["weights"])
    _assert_covers_reference([res[layout]["names"] for res in composed], dict.fromkeys(composed[0]["ref_names"]))
    first, last = composed[0]["ref"][0], composed[0]["ref"][-1]
    assert last < first  # the reference itself learns


# ---- every ZeRO stage composed with TP and PP (1F1B and ZB-H1), against the same single process ----
SHARD_LAYOUTS = [(f"{name}/{stage}", pp, dp, tp, sched, stage)
                 for name, pp, dp, tp, sched in [("dp2xtp2", 1, 2, 2, "1f1b"), ("dp2xpp2", 2, 2, 1, "1f1b"),
                                                 ("dp2xpp2-zb", 2, 2, 1, "zb-h1")]
                 for stage in ("optimizer", "gradients", "parameters")]


def _sharded_compose_worker() -> dict:
    ref_losses, ref_norms, ref_weights = _reference()
    out = {"ref": ref_losses}
    for name, pp, dp, tp, sched, stage in SHARD_LAYOUTS:
        mesh = tl.Mesh(pp=pp, dp=dp, tp=tp)
        gpt = GPT(CFG, seed=3)
        pm = tl.parallelize(gpt, mesh, tp_plan=GPT_PLAN if tp > 1 else None, schedule=sched, microbatches=2 * pp,
                            shard=stage, bucket_mb=0.01)
        opt = tl.DistributedOptimizer(torch.optim.AdamW(pm.parameters(), lr=3e-3), pm)
        out[name] = _train_against(pm, opt, mesh, gpt, (ref_losses, ref_norms, ref_weights))
    out["ref_names"] = set(ref_weights)
    return out


@pytest.fixture(scope="module")
def sharded_composed():
    return run_ranks(_sharded_compose_worker, 4, timeout_s=240)


@pytest.mark.parametrize("layout", [name for name, *_ in SHARD_LAYOUTS])
def test_sharded_layout_tracks_single_process(layout, sharded_composed):
    """dp2xtp2 and dp2xpp2 (1F1B, ZB-H1) with each shard stage: losses, clipped norms and final
    weights (slices gathered) equal one process training the whole model on the whole batch."""
    for rank, res in enumerate(sharded_composed):
        r = res[layout]
        assert r["clipped"] >= 5, r
        assert r["loss"] < 1e-4, (rank, layout, r)
        assert r["norm"] < 1e-4, (rank, layout, r)
        assert r["weights"] < WEIGHT_TOL, (rank, layout, r["weights"])
    _assert_covers_reference([res[layout]["names"] for res in sharded_composed],
                             dict.fromkeys(sharded_composed[0]["ref_names"]))


# ---- `trainlib train` on every kind of layout: the single-process run's losses and final weights ----
TRAIN_ARGS = ["--train.steps", "8", "--train.batch_size", "16", "--train.log_every", "4", "--model.n_layer", "4",
              "--model.d_model", "64", "--model.seq_len", "32", "--train.warmup_steps", "2"]
TRAIN_LAYOUTS = [(1, 4, 1, "1f1b"), (2, 1, 2, "1f1b"), (2, 2, 1, "zb-h1"), (1, 2, 2, "1f1b"), (4, 1, 1, "gpipe"),
                 (1, 1, 4, "1f1b"), (2, 2, 1, "interleaved")]


def _train_capturing(args: list[str]) -> tuple[dict, torch.nn.Module, list]:
    """trainer.train(cfg), also returning the GPT it built and the parameters this rank trained."""
    from trainlib import trainer
    from trainlib.config import load_config

    seen: dict = {}

    def keep(fn, key):
        def wrapped(*a, **kw):
            seen[key] = fn(*a, **kw)
            return seen[key]
        return wrapped

    saved = trainer.build_model, trainer.wrap_parallel, trainer.wrap_data_parallel
    trainer.build_model = keep(saved[0], "gpt")
    trainer.wrap_parallel = keep(saved[1], "wrapped")
    trainer.wrap_data_parallel = keep(saved[2], "wrapped")
    try:
        summary = trainer.train(load_config(None, args))
    finally:
        trainer.build_model, trainer.wrap_parallel, trainer.wrap_data_parallel = saved
    return summary, seen["gpt"], list(seen["wrapped"].parameters())


def _trainer_reference(metrics: str) -> dict:
    """One process, mesh 1x1x1: the reference every layout must reproduce."""
    s, gpt, _ = _train_capturing(TRAIN_ARGS + ["--train.metrics", metrics])
    assert s["world_size"] == 1
    # numpy, not tensors: torch sends tensors between processes as shared memory handles that die
    # with the child that made them, and this child exits right after returning
    return {"loss_first": s["loss_first"], "loss_last": s["loss_last"],
            "weights": {k: q.detach().numpy().copy() for k, q in gpt.named_parameters()}}


def _trainer_worker(metrics: str, ref: dict) -> list[dict]:
    ref_weights = {k: torch.from_numpy(v) for k, v in ref["weights"].items()}
    out = []
    for pp, dp, tp, sched in TRAIN_LAYOUTS:
        s, gpt, held = _train_capturing(TRAIN_ARGS + ["--mesh.pp", str(pp), "--mesh.dp", str(dp), "--mesh.tp", str(tp),
                                                      "--mesh.schedule", sched, "--train.metrics", metrics])
        mesh = tl.Mesh(pp=pp, dp=dp, tp=tp)
        weights = _held_weights(gpt, held, mesh)
        out.append({"layout": (pp, dp, tp, sched), "loss_first": s["loss_first"], "loss_last": s["loss_last"],
                    "weights": _weight_diff(weights, ref_weights), "names": set(weights)})
    return out


def test_trainer_every_layout_matches_single_process(tmp_path):
    ref = run_ranks(_trainer_reference, 1, str(tmp_path / "ref.jsonl"), env={"TRAINLIB_NO_PROGRESS": "1"},
                    timeout_s=120)[0]
    assert ref["loss_last"] < ref["loss_first"] - 0.5, ref  # it trains
    ranks = run_ranks(_trainer_worker, 4, str(tmp_path / "m.jsonl"), ref, env={"TRAINLIB_NO_PROGRESS": "1"},
                      timeout_s=170)
    for i, (pp, dp, tp, sched) in enumerate(TRAIN_LAYOUTS):
        for rank, res in enumerate(ranks):
            r = res[i]
            assert abs(r["loss_first"] - ref["loss_first"]) < 1e-4, (rank, r, ref["loss_first"])
            assert abs(r["loss_last"] - ref["loss_last"]) < 1e-4, (rank, r, ref["loss_last"])
            assert r["weights"] < WEIGHT_TOL, (rank, r["layout"], r["weights"])
        _assert_covers_reference([res[i]["names"] for res in ranks], ref["weights"])
