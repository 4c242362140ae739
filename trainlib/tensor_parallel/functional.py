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
from ..activation_checkpointing import kept_collective


def tp_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def tp_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if tp_size(group) == 1:
        return t
    def run() -> torch.Tensor:
        # a fresh buffer: autograd may still hold `t` (and all-reduce works in place)
        out = t.contiguous().clone()
        comm.all_reduce(out, group=group)
        return out
    return kept_collective(run)


def check_divisible(what: str, n: int, tp: int, fix: str) -> None:
    """The one check before anything is split over tp: `what` names the size `n`, `fix` says what to change."""
    if n % tp:
        raise ValueError(f"{what} {n} is not divisible by tp={tp}; {fix}")


def _check_splits(t: torch.Tensor, n: int, dim: int, what: str) -> None:
    check_divisible(f"{what}dim {dim} of shape {list(t.shape)}: size", t.shape[dim], n, f"make it divisible by {n}")


def _split(t: torch.Tensor, group, dim: int, what: str = "") -> torch.Tensor:
    """This rank's chunk of `dim` (a copy: the caller may free `t`)."""
    n = tp_size(group)
    if n == 1:
        return t
    _check_splits(t, n, dim, what)
    return t.chunk(n, dim=dim)[tp_rank(group)].contiguous()


def _gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = tp_size(group)
    if n == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(n)]
    comm.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=dim)


def _conjugate(name: str, forward, backward, doc: str) -> type[torch.autograd.Function]:
    """An autograd Function whose forward is forward(x, group) and backward is backward(grad, group):
    every operator here is such a pair of communication patterns."""
    def fwd(ctx, x, group):
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, grad):
        return backward(grad, ctx.group), None

    return type(name, (torch.autograd.Function,), {"__doc__": doc, "forward": staticmethod(fwd),
                                                   "backward": staticmethod(bwd)})


def _identity(t: torch.Tensor, group) -> torch.Tensor:
    return t


def _split_last(t: torch.Tensor, group) -> torch.Tensor:
    return _split(t, group, -1)


def _gather_last(t: torch.Tensor, group) -> torch.Tensor:
    return _gather(t, group, -1)


_CopyToTP = _conjugate("_CopyToTP", _identity, _all_reduce, "f: identity forward, all-reduce backward.")
_ReduceFromTP = _conjugate("_ReduceFromTP", _all_reduce, _identity, "g: all-reduce forward, identity backward.")
_GatherFromTP = _conjugate("_GatherFromTP", _gather_last, _split_last,
                           "Forward: all-gather along the last dim. Backward: keep this rank's slice of the gradient.")
_ScatterToTP = _conjugate("_ScatterToTP", _split_last, _gather_last,
                          "Forward: keep this rank's slice of the last dim. Backward: all-gather the gradient.")


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
_SEQ_HINT = "sequence parallelism: "  # errors say which feature split the tensor; the fix is a divisible seq_len


def _gather_seq(t: torch.Tensor, group) -> torch.Tensor:
    return _gather(t, group, SEQ_DIM)


def _split_seq(t: torch.Tensor, group) -> torch.Tensor:
    return _split(t, group, SEQ_DIM, _SEQ_HINT)


def _reduce_scatter_seq(t: torch.Tensor, group) -> torch.Tensor:
    n = tp_size(group)
    if n == 1:
        return t
    _check_splits(t, n, SEQ_DIM, _SEQ_HINT)

    def run() -> torch.Tensor:
        parts = [p.contiguous() for p in t.chunk(n, dim=SEQ_DIM)]
        out = torch.empty_like(parts[0])
        comm.reduce_scatter(out, parts, group=group)
        return out
    return kept_collective(run)


_GatherSeq = _conjugate("_GatherSeq", _gather_seq, _reduce_scatter_seq,
                        "SP's f: all-gather the sequence forward, reduce-scatter the gradient backward.")
_ReduceScatterSeq = _conjugate("_ReduceScatterSeq", _reduce_scatter_seq, _gather_seq,
                               "SP's g: reduce-scatter the partial sums forward, all-gather the gradient backward.")
_ScatterSeq = _conjugate("_ScatterSeq", _split_seq, _gather_seq,
                         "Enter the sequence-parallel region: keep this rank's tokens; backward all-gathers.")


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherSeq.apply(x, group)


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceScatterSeq.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _ScatterSeq.apply(x, group)
