"""Megatron tensor-parallel layers (Shoeybi et al. 2019) and the vocab-parallel cross-entropy.

Shapes with tp ranks, rank r:
    ColumnParallelLinear  W: (out/tp, in)   rows  r*out/tp : (r+1)*out/tp of the full weight
                          x (.., in) replicated  ->  y (.., out/tp)   [f before, no comm forward]
    RowParallelLinear     W: (out, in/tp)   columns r*in/tp : (r+1)*in/tp
                          x (.., in/tp) split    ->  y (.., out) replicated  [g: one all-reduce]
    VocabParallelEmbedding  table rows r*V/tp : (r+1)*V/tp; ids outside the shard look up zeros,
                          and one all-reduce sums the shards.
Biases: a column-parallel bias is split with its rows; a row-parallel bias is replicated and
added after the all-reduce (so it is added once, and its gradient is the same on every rank).

Parameters split across tp carry `param.tp_sharded = True`; gradient-norm clipping sums those
over tp and counts replicated ones once (see clip.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import comm
from .functional import (check_divisible, copy_to_tp, gather_from_tp, gather_sequence, reduce_from_tp,
                         reduce_scatter_sequence, tp_rank, tp_size)


def _shard_param(p: nn.Parameter, dim: int) -> nn.Parameter:
    """Mark `p` as this tp rank's slice along `dim` (checkpoint layouts record it; clipping sums it over tp)."""
    p.tp_sharded = True
    p.tp_dim = dim
    return p


def _check_layer(module: str, what: str, n: int, tp: int) -> None:
    check_divisible(f"{module}: {what}", n, tp, f"pick a tp that divides {n} or leave this module out of the plan")


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by output rows; output stays split unless gather_output."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group=None,
                 gather_output: bool = False, sequence_parallel: bool = False, dtype: torch.dtype | None = None,
                 device=None):
        super().__init__()
        self.group, self.tp, self.rank = group, tp_size(group), tp_rank(group)
        self.sequence_parallel = sequence_parallel
        _check_layer("ColumnParallelLinear", "out_features", out_features, self.tp)
        self.in_features, self.out_features = in_features, out_features
        self.out_local = out_features // self.tp
        self.gather_output = gather_output
        self.weight = _shard_param(nn.Parameter(torch.empty(self.out_local, in_features, dtype=dtype, device=device)), 0)
        self.bias = _shard_param(nn.Parameter(torch.zeros(self.out_local, dtype=dtype, device=device)), 0) if bias \
            else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, group, gather_output: bool = False,
                    sequence_parallel: bool = False) -> "ColumnParallelLinear":
        """Shard an existing full nn.Linear: this rank keeps its block of output rows."""
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group=group, gather_output=gather_output,
                sequence_parallel=sequence_parallel, dtype=lin.weight.dtype, device=lin.weight.device)
        sl = slice(m.rank * m.out_local, (m.rank + 1) * m.out_local)
        with torch.no_grad():
            m.weight.copy_(lin.weight[sl])
            if m.bias is not None:
                m.bias.copy_(lin.bias[sl])
        m.weight.requires_grad_(lin.weight.requires_grad)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # input replicated (f) or, with sequence parallelism, (B, T/tp, in) gathered to (B, T, in)
        x = gather_sequence(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        y = F.linear(x, self.weight, self.bias)  # (.., out/tp)
        return gather_from_tp(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {self.out_local}, tp={self.tp}), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, sp={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by input columns; x arrives split (from a column-parallel layer)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group=None,
                 sequence_parallel: bool = False, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.group, self.tp, self.rank = group, tp_size(group), tp_rank(group)
        self.sequence_parallel = sequence_parallel
        _check_layer("RowParallelLinear", "in_features", in_features, self.tp)
        self.in_features, self.out_features = in_features, out_features
        self.in_local = in_features // self.tp
        self.weight = _shard_param(nn.Parameter(torch.empty(out_features, self.in_local, dtype=dtype, device=device)), 1)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        if self.bias is not None and sequence_parallel:
            self.bias.sequence_parallel = True  # added to T/tp tokens: its gradient is partial over tp

    @classmethod
    def from_linear(cls, lin: nn.Linear, group, sequence_parallel: bool = False) -> "RowParallelLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group=group,
                sequence_parallel=sequence_parallel, dtype=lin.weight.dtype, device=lin.weight.device)
        with torch.no_grad():
            m.weight.copy_(lin.weight[:, m.rank * m.in_local:(m.rank + 1) * m.in_local])
            if m.bias is not None:
                m.bias.copy_(lin.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_local:
            raise ValueError(f"RowParallelLinear expects its input split over tp: last dim {self.in_local} "
                             f"(= {self.in_features}/{self.tp}), got shape {list(x.shape)}; put a colwise layer before it")
        y = F.linear(x, self.weight)  # partial sums over tp
        # g: all-reduce -> (.., out) replicated; with sequence parallelism reduce-scatter -> (B, T/tp, out)
        y = reduce_scatter_sequence(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.in_local}, tp={self.tp}), out={self.out_features}, "
                f"bias={self.bias is not None}, sp={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by rows (vocabulary) over tp; output is replicated."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group=None, dtype: torch.dtype | None = None,
                 device=None):
        super().__init__()
        self.group, self.tp, self.rank = group, tp_size(group), tp_rank(group)
        _check_layer("VocabParallelEmbedding", "num_embeddings (vocabulary)", num_embeddings, self.tp)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_local = num_embeddings // self.tp
        self.vocab_start = self.rank * self.vocab_local
        self.weight = _shard_param(nn.Parameter(torch.empty(self.vocab_local, embedding_dim, dtype=dtype,
                                                            device=device)), 0)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group) -> "VocabParallelEmbedding":
        if emb.padding_idx is not None or emb.max_norm is not None:
            raise ValueError("VocabParallelEmbedding does not support padding_idx or max_norm; "
                             "leave this embedding out of the tensor-parallel plan")
        m = cls(emb.num_embeddings, emb.embedding_dim, group=group, dtype=emb.weight.dtype, device=emb.weight.device)
        with torch.no_grad():
            m.weight.copy_(emb.weight[m.vocab_start:m.vocab_start + m.vocab_local])
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim} (local rows {self.vocab_local}, tp={self.tp})"


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from vocab-split logits, as in Megatron-LM's cross_entropy.py:

        loss = log(sum_v exp(z_v - m)) - (z_target - m),   m = max_v z_v
    computed from all-reduces of (max) and of (target logit, sum of exp), so the full
    (tokens x vocab) logits never exist on one rank. Gradient: softmax - onehot(target)."""

    @staticmethod
    def forward(ctx, logits, target, group):
        n, rank = tp_size(group), tp_rank(group)
        v_local = logits.shape[-1]
        start = rank * v_local
        ctx.dtype = logits.dtype
        logits = logits.float()
        zmax = logits.max(dim=-1).values
        if n > 1:
            comm.all_reduce(zmax, op="max", group=group)
        shifted = logits - zmax.unsqueeze(-1)
        local = target - start
        outside = (local < 0) | (local >= v_local)
        local = local.masked_fill(outside, 0)
        z_target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp_()
        both = torch.stack([z_target, exp.sum(dim=-1)])  # one all-reduce for both sums
        if n > 1:
            comm.all_reduce(both, group=group)
        z_target, sum_exp = both[0], both[1]
        loss = sum_exp.log() - z_target
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()
        rows = grad.view(-1, grad.shape[-1])
        flat = torch.arange(rows.shape[0], device=grad.device)
        rows[flat, local.reshape(-1)] -= (~outside).reshape(-1).to(grad.dtype)
        return (grad * grad_loss.unsqueeze(-1)).to(ctx.dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None,
                                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits split over tp along the vocabulary (last) dim; `target` holds global ids.

    logits (.., V/tp) on each rank, target (..) -> scalar mean (or per-token with reduction="none"),
    identical on every tp rank. Equals F.cross_entropy on the gathered logits."""
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {list(logits.shape)} and target {list(target.shape)} disagree: "
                         "target must have the logits' shape without the vocabulary dim")
    per_token = _VocabParallelCrossEntropy.apply(logits, target, group)
    if reduction == "none":
        return per_token
    if reduction == "mean":
        return per_token.mean()
    if reduction == "sum":
        return per_token.sum()
    raise ValueError(f"reduction {reduction!r} is not one of mean, sum, none")
