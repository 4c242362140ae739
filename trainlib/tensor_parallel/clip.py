"""Gradient-norm clipping that is correct on a (pp, dp, tp) mesh.

    ||g||^2 = sum over pp stages ( sum over tp of sharded ||g_shard||^2  +  replicated ||g||^2 )

Sharded parameters (`param.tp_sharded`) hold disjoint pieces of a full tensor, so their squares
are summed over tp; replicated ones (LayerNorm, row-parallel biases) hold the same gradient on
every tp rank and are counted once. Stages hold disjoint layers: summed over pp. After the
data-parallel average the gradient is equal across dp, so dp needs no reduction.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .. import comm


def grad_norm(params: Iterable[torch.nn.Parameter], mesh=None) -> torch.Tensor:
    """The global L2 norm of the gradients of a model split over `mesh` (float64 scalar)."""
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


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float, mesh=None) -> torch.Tensor:
    """Scale all gradients by min(1, max_norm / (||g|| + 1e-6)), as torch.nn.utils.clip_grad_norm_; returns ||g||."""
    params = [p for p in params if p.grad is not None]
    norm = grad_norm(params, mesh)
    coef = float(max_norm) / (float(norm) + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.detach().mul_(coef)
    return norm
