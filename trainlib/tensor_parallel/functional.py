"""Megatron's conjugate communication operators f and g (Shoeybi et al. 2019, "Megatron-LM", sec. 3).

    f = copy_to_tp        forward: identity            backward: all-reduce over tp
    g = reduce_from_tp    forward: all-reduce over tp  backward: identity

An MLP  Y = GeLU(X A) B  with A split by columns and B by rows needs exactly one f before A and
one g after B, so a transformer block costs 2 all-reduces forward and 2 backward (attention + MLP).
`gather_from_tp` / `scatter_to_tp` move a tensor between "split along the last dim" and
"replicated" (a column-parallel layer whose user wants the full output).

Every collective goes through trainlib.comm (timeouts, collective log). A tp group of one rank
makes all of these the identity, with no communication.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm


def tp_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def tp_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if tp_size(group) == 1:
        return t
    # a fresh buffer: autograd may still hold `t` (and all-reduce works in place)
    out = t.contiguous().clone()
    comm.all_reduce(out, group=group)
    return out


def _split_last(t: torch.Tensor, group) -> torch.Tensor:
    n = tp_size(group)
    if n == 1:
        return t
    if t.shape[-1] % n:
        raise ValueError(f"cannot split last dim {t.shape[-1]} of shape {list(t.shape)} over tp={n}; "
                         f"make it divisible by {n}")
    return t.chunk(n, dim=-1)[tp_rank(group)].contiguous()


def _gather_last(t: torch.Tensor, group) -> torch.Tensor:
    n = tp_size(group)
    if n == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(n)]
    comm.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather along the last dim. Backward: keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim. Backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ScatterToTP.apply(x, group)


# ---- sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
# Transformer Models", sec. 4.2.2): between a row-parallel layer and the next column-parallel one,
# activations are split along the sequence dim, so LayerNorm, dropout and residuals work on T/tp
# tokens. g becomes a reduce-scatter (forward) and f an all-gather (forward); the conjugates swap
# in backward. Same bytes as the all-reduce they replace, 1/tp of the activation memory.

SEQ_DIM = 1  # (B, T, ...) activations


def _gather_seq(t: torch.Tensor, group) -> torch.Tensor:
    n = tp_size(group)
    if n == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(n)]
    comm.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=SEQ_DIM)


def _split_seq(t: torch.Tensor, group) -> torch.Tensor:
    n = tp_size(group)
    if n == 1:
        return t
    if t.shape[SEQ_DIM] % n:
        raise ValueError(f"sequence parallelism splits dim {SEQ_DIM} of shape {list(t.shape)} over tp={n}; "
                         f"use a sequence length divisible by {n}")
    return t.chunk(n, dim=SEQ_DIM)[tp_rank(group)].contiguous()


def _reduce_scatter_seq(t: torch.Tensor, group) -> torch.Tensor:
    n = tp_size(group)
    if n == 1:
        return t
    if t.shape[SEQ_DIM] % n:
        raise ValueError(f"sequence parallelism splits dim {SEQ_DIM} of shape {list(t.shape)} over tp={n}; "
                         f"use a sequence length divisible by {n}")
    parts = [p.contiguous() for p in t.chunk(n, dim=SEQ_DIM)]
    out = torch.empty_like(parts[0])
    comm.reduce_scatter(out, parts, group=group)
    return out


class _GatherSeq(torch.autograd.Function):
    """SP's f: all-gather the sequence forward, reduce-scatter the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    """SP's g: reduce-scatter the partial sums forward, all-gather the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    """Enter the sequence-parallel region: keep this rank's tokens; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherSeq.apply(x, group)


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceScatterSeq.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _ScatterSeq.apply(x, group)
