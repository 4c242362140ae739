"""Tensor parallelism, Megatron style: f/g operators, parallel layers, name-pattern plans."""
from __future__ import annotations

import warnings

from .functional import (copy_to_tp, gather_from_tp, gather_sequence, reduce_from_tp, reduce_scatter_sequence,
                         scatter_to_sequence, scatter_to_tp)
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy
from .plan import GPT_PLAN, GPT_SP_PLAN, PlanError, apply_plan, resolve_plan, sync_sequence_parallel_grads

__all__ = ["apply_plan", "resolve_plan", "GPT_PLAN", "PlanError", "ColumnParallelLinear", "RowParallelLinear",
           "VocabParallelEmbedding", "vocab_parallel_cross_entropy", "copy_to_tp", "reduce_from_tp",
           "gather_from_tp", "scatter_to_tp", "gather_sequence", "reduce_scatter_sequence", "scatter_to_sequence",
           "GPT_SP_PLAN", "sync_sequence_parallel_grads"]


def __getattr__(name: str):
    # The old name, kept for scripts written against it: `tl.parallelize` (the composition) and this
    # function used to share it, which is why it was renamed.
    if name == "parallelize":
        warnings.warn("trainlib.tensor_parallel.parallelize is deprecated; call tensor_parallel.apply_plan"
                      "(model, mesh, plan) (or tl.parallelize to compose PP -> TP -> DP)", DeprecationWarning,
                      stacklevel=2)
        return apply_plan
    raise AttributeError(f"module 'trainlib.tensor_parallel' has no attribute {name!r}")
