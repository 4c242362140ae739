"""Tensor parallelism, Megatron style: f/g operators, parallel layers, name-pattern plans."""
from .clip import clip_grad_norm_, grad_norm
from .functional import (copy_to_tp, gather_from_tp, gather_sequence, reduce_from_tp, reduce_scatter_sequence,
                         scatter_to_sequence, scatter_to_tp)
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy
from .plan import GPT_PLAN, GPT_SP_PLAN, PlanError, parallelize, resolve_plan, sync_sequence_parallel_grads

__all__ = ["parallelize", "resolve_plan", "GPT_PLAN", "PlanError", "ColumnParallelLinear", "RowParallelLinear",
           "VocabParallelEmbedding", "vocab_parallel_cross_entropy", "copy_to_tp", "reduce_from_tp",
           "gather_from_tp", "scatter_to_tp", "gather_sequence", "reduce_scatter_sequence", "scatter_to_sequence",
           "GPT_SP_PLAN", "sync_sequence_parallel_grads", "clip_grad_norm_", "grad_norm"]
