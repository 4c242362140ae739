"""`tl.clip_grad_norm_`: global-norm gradient clipping, fused over gradient buckets.

For a DataParallel model the squared norm comes from the bucket epilogue kernel (one pass per flat
bucket that also flags inf/nan) instead of one reduction per parameter. On a (pp, dp, tp) mesh:

    ||g||^2 = sum_pp ( sum_tp ||g_sharded||^2 + ||g_replicated||^2 )

tp-replicated parameters (LayerNorm, row-parallel biases; everything without `tp_sharded`) carry
the same gradient on every tp rank, so each rank adds 1/tp of their square before the tp sum.
Gradients are equal across dp after the average, so dp needs no reduction -- except when the
optimizer is sharded (DataParallel(shard=...)): each dp rank then holds only its chunk of the
reduced gradient, and the chunks' squares are summed over dp.

A plain parameter list (a model that is not wrapped in DataParallel, e.g. tensor parallel alone)
takes the per-parameter path: sharded parameters (`param.tp_sharded`) hold disjoint pieces of a
full tensor, so their squares are summed over tp; replicated ones are counted once.
This is the one gradient-norm module of trainlib: tensor parallelism has none of its own.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .. import comm
from .wrapper import DataParallel


def grad_norm(model: DataParallel | Iterable[torch.nn.Parameter], mesh=None) -> torch.Tensor:
    """The global L2 norm of the gradients (float64 scalar; inf/nan if any gradient is non-finite)."""
    if not isinstance(model, DataParallel):
        return _param_norm(model, mesh)
    mesh = mesh if mesh is not None else model.mesh
    tp = mesh.size("tp")
    if model.sharded:
        return _sharded_norm(model, mesh)
    nonfinite, sq = model.grad_stats()
    total = sq.double().reshape(1)
    if tp > 1:
        replicated = sum((p.grad.detach().double().pow(2).sum() for b in model.buckets for p in b.params
                          if not getattr(p, "tp_sharded", False)), torch.zeros((), dtype=torch.float64))
        total -= replicated * (1 - 1 / tp)
        comm.all_reduce(total, group=mesh.group("tp"))
    if mesh.size("pp") > 1:
        comm.all_reduce(total, group=mesh.group("pp"))
    if nonfinite:
        total.fill_(float("nan"))  # a NaN anywhere must not be hidden by the sum
    flag = torch.tensor([1.0 if not torch.isfinite(total).all() else 0.0], dtype=torch.float64)
    if tp > 1 or mesh.size("pp") > 1:  # every rank must agree that the step is non-finite
        comm.all_reduce(flag, op="max")
    return total[0].sqrt() if flag.item() == 0 else torch.tensor(float("nan"), dtype=torch.float64)


def _param_norm(params: Iterable[torch.nn.Parameter], mesh=None) -> torch.Tensor:
    """The global norm of a plain parameter list, one reduction per parameter (no buckets to fuse over)."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if getattr(p, "tp_sharded", False):
            sharded += sq
        else:
            replicated += sq
    if mesh is not None and mesh.size("tp") > 1:
        comm.all_reduce(sharded, group=mesh.group("tp"))
    total = (sharded + replicated).reshape(1)
    if mesh is not None and mesh.size("pp") > 1:
        comm.all_reduce(total, group=mesh.group("pp"))
    return total[0].sqrt()


def _sharded_norm(model: DataParallel, mesh) -> torch.Tensor:
    """The global norm from dp-disjoint gradient chunks: [sharded, replicated, nonfinite] summed over dp."""
    tp, pp = mesh.size("tp"), mesh.size("pp")
    nonfinite, sharded, replicated = model.sharded_grad_stats(split_tp=tp > 1)
    t = torch.tensor([sharded, replicated, 1.0 if nonfinite else 0.0], dtype=torch.float64,
                     device=model.buckets[0].grad.device)   # NCCL reduces device tensors only
    if model.owners > 1:
        comm.all_reduce(t, group=mesh.group("dp"))
    if tp > 1:  # tp-sharded parts are disjoint over tp; replicated ones are equal on every tp rank
        comm.all_reduce(t[0:1], group=mesh.group("tp"))
    total = (t[0] + t[1]).reshape(1)
    flag = t[2:3].clone()
    if pp > 1:
        comm.all_reduce(total, group=mesh.group("pp"))
    if tp > 1 or pp > 1:
        comm.all_reduce(flag, op="max")
    return total[0].sqrt().cpu() if flag.item() == 0 else torch.tensor(float("nan"), dtype=torch.float64)


def clip_grad_norm_(model: DataParallel | Iterable[torch.nn.Parameter], max_norm: float, mesh=None) -> torch.Tensor:
    """Scale gradients by min(1, max_norm / (||g|| + 1e-6)) as torch.nn.utils.clip_grad_norm_ does; returns ||g||.

    A non-finite norm leaves the gradients untouched and is returned as NaN, for the caller's
    skip-or-raise policy."""
    if max_norm <= 0:
        raise ValueError(f"max_norm={max_norm} must be > 0")
    params = None if isinstance(model, DataParallel) else [p for p in model if p.grad is not None]
    norm = grad_norm(model if params is None else params, mesh)
    coef = float(max_norm) / (float(norm) + 1e-6)
    if torch.isfinite(norm) and coef < 1.0:
        if params is None and model.sharded:
            model.scale_grads_(coef)
        elif params is None:
            for b in model.buckets:
                b.grads.mul_(coef)
        else:
            for p in params:
                p.grad.detach().mul_(coef)
    return norm
