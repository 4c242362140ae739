"""Tensor-parallel step time: trainlib's Megatron layers vs torch DTensor TP on the same model.

    trainlib bench tp [--quick]

The default GPT on tp = 2 ranks (gloo). Both sides shard the same modules the same way:
attn.qkv and mlp.fc column-wise, attn.proj and mlp.proj row-wise (torch: ColwiseParallel /
RowwiseParallel through parallelize_module); embeddings and the head stay replicated so the loss
is the same plain cross-entropy. A step is forward + backward of one batch; each repetition
runs a few steps of one side, the sides alternate (harness.alternate), medians. The time of a
step is the slowest rank's. The first losses of both sides are checked against each other.
"""
from __future__ import annotations

import copy
import time

import torch

from trainlib.benchmarks.harness import alternate
from trainlib.testing import run_ranks

TP = 2


def _plan_names(n_layer: int) -> dict[str, str]:
    out = {}
    for i in range(n_layer):
        out.update({f"blocks.{i}.attn.qkv": "colwise", f"blocks.{i}.attn.proj": "rowwise",
                    f"blocks.{i}.mlp.fc": "colwise", f"blocks.{i}.mlp.proj": "rowwise"})
    return out


def _worker(cfg_kw: dict, batch: int, reps: int, steps: int) -> dict:
    import trainlib as tl
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from trainlib import comm
    from trainlib.models.gpt import GPT, GPTConfig, lm_loss
    from trainlib.tensor_parallel import apply_plan

    cfg = GPTConfig(**cfg_kw)
    mesh = tl.Mesh(pp=1, dp=1, tp=TP)
    base = GPT(cfg, seed=0)
    plan = _plan_names(cfg.n_layer)
    ours = apply_plan(copy.deepcopy(base), mesh, plan)
    dmesh = init_device_mesh("cpu", (TP,))
    peer = parallelize_module(copy.deepcopy(base), dmesh,
                              {k: ColwiseParallel() if v == "colwise" else RowwiseParallel() for k, v in plan.items()})
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)

    def step(model) -> float:
        loss = lm_loss(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    losses = {"trainlib": step(ours), "torch_dtensor": step(peer)}  # also the warm-up

    def timed(model):
        def run() -> float:
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(model)
            dt = torch.tensor([(time.perf_counter() - t0) / steps], dtype=torch.float64)
            comm.all_reduce(dt, op="max")
            return float(dt.item())
        return run

    res = alternate({"trainlib": timed(ours), "torch_dtensor": timed(peer)}, reps)
    from torch.distributed.tensor import DTensor

    sharded = {"trainlib": sum(getattr(p, "tp_sharded", False) for p in ours.parameters()),
               "torch_dtensor": sum(isinstance(p, DTensor) for p in peer.parameters())}
    return {"losses": losses, "times": res, "sharded_params": sharded}


def run(quick: bool) -> dict:
    cfg = dict(vocab_size=256, seq_len=64, n_layer=2, n_head=4, d_model=128) if quick else \
        dict(vocab_size=256, seq_len=128, n_layer=4, n_head=8, d_model=256)
    batch = 4 if quick else 8
    r = run_ranks(_worker, TP, cfg, batch, 3 if quick else 11, 2 if quick else 5, timeout_s=900)[0]
    t_ours, t_peer = r["times"]["trainlib"]["median_s"], r["times"]["torch_dtensor"]["median_s"]
    diff = abs(r["losses"]["trainlib"] - r["losses"]["torch_dtensor"])
    summary = {"trainlib_step_ms": round(1e3 * t_ours, 2), "torch_dtensor_step_ms": round(1e3 * t_peer, 2),
               "ratio_trainlib_over_dtensor": round(t_ours / t_peer, 3), "loss_abs_diff": diff,
               "sharded_params": r["sharded_params"]}
    return {"model": cfg, "batch": batch, "tp": TP, **r, "summary": summary}


def table_headline(s: dict) -> str:
    """This benchmark's line in `trainlib bench table` (benchmarks/README.md), from a result's summary."""
    from trainlib.benchmarks.harness import ratio_text

    return (f"step time {ratio_text(s['ratio_trainlib_over_dtensor'])} of torch DTensor TP "
            f"({s['trainlib_step_ms']} vs {s['torch_dtensor_step_ms']} ms), loss difference {s['loss_abs_diff']}")
