"""`apply_plan(model, mesh, plan)`: convert chosen nn.Linear / nn.Embedding modules to tensor-parallel ones.

    plan = {"blocks.*.attn.qkv": "colwise", "blocks.*.attn.proj": "rowwise",
            "blocks.*.mlp.fc": "colwise",   "blocks.*.mlp.proj": "rowwise",
            "embed.tok_emb": "vocab",       "final.head": "colwise"}

Keys are fnmatch patterns over `model.named_modules()` names; values are styles:
    colwise         nn.Linear -> ColumnParallelLinear, output stays split (feed a rowwise layer,
                    or vocab_parallel_cross_entropy for an LM head)
    colwise_gather  nn.Linear -> ColumnParallelLinear(gather_output=True): full output on every rank
    rowwise         nn.Linear -> RowParallelLinear (input split, output replicated)
    vocab           nn.Embedding -> VocabParallelEmbedding
With sequence_parallel=True (Korthikanti et al. 2022) colwise layers all-gather their input along
the sequence (dim 1) and rowwise layers reduce-scatter their output along it, and two more styles
mark the region in between:
    sequence_scatter   any module: its output is split along the sequence (enter the region)
    sequence_parallel  any module (LayerNorm): its parameters see T/tp tokens, so their gradients
                       are summed over tp after backward (sync_sequence_parallel_grads)
The new modules are built from the existing full weights, so on identical full weights on every
tp rank (same seed), the converted model computes what the original did. Works on any model
whose Linear/Embedding modules are reachable by name, not only trainlib's GPT.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch
import torch.nn as nn

from .. import comm
from .functional import scatter_to_sequence
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def _enter_sequence_region(m: nn.Module, group, sp: bool) -> nn.Module:
    if sp:
        m.register_forward_hook(lambda _mod, _inp, out: scatter_to_sequence(out, group))
    return m


def _mark_sequence_parallel(m: nn.Module, group, sp: bool) -> nn.Module:
    if sp:
        for p in m.parameters(recurse=False):
            p.sequence_parallel = True
    return m


# style -> (module type it applies to, or None for any; factory(module, tp group, sequence_parallel))
STYLES: dict[str, tuple[type | None, Callable]] = {
    "colwise": (nn.Linear, lambda m, g, sp: ColumnParallelLinear.from_linear(m, g, sequence_parallel=sp)),
    "colwise_gather": (nn.Linear, lambda m, g, sp: ColumnParallelLinear.from_linear(m, g, gather_output=True,
                                                                                   sequence_parallel=sp)),
    "rowwise": (nn.Linear, lambda m, g, sp: RowParallelLinear.from_linear(m, g, sequence_parallel=sp)),
    "vocab": (nn.Embedding, lambda m, g, sp: VocabParallelEmbedding.from_embedding(m, g)),
    "sequence_scatter": (None, _enter_sequence_region),
    "sequence_parallel": (None, _mark_sequence_parallel),
}

# The default plan for trainlib.models.gpt.GPT (pair every colwise with the rowwise that consumes it).
GPT_PLAN = {
    "embed.tok_emb": "vocab",
    "blocks.*.attn.qkv": "colwise",
    "blocks.*.attn.proj": "rowwise",
    "blocks.*.mlp.fc": "colwise",
    "blocks.*.mlp.proj": "rowwise",
    "final.head": "colwise",
}
# ... and with sequence parallelism: the region starts after the embedding and covers the norms
GPT_SP_PLAN = {
    **GPT_PLAN,
    "embed": "sequence_scatter",
    "blocks.*.ln1": "sequence_parallel",
    "blocks.*.ln2": "sequence_parallel",
    "final.ln_f": "sequence_parallel",
}


class PlanError(ValueError):
    """A tensor-parallel plan that does not fit the model; the message has the names and the fix."""


def resolve_plan(model: nn.Module, plan: dict[str, str], *, strict: bool = True) -> dict[str, str]:
    """Module name -> style, checking styles, module types and ambiguous patterns.

    strict=False lets patterns match nothing (a pipeline stage holds only some of the blocks)."""
    for pattern, style in plan.items():
        if style not in STYLES:
            raise PlanError(f"plan[{pattern!r}] = {style!r} is not a style; use one of {', '.join(STYLES)}")
    chosen: dict[str, str] = {}
    used = set()
    for name, module in model.named_modules():
        hits = [p for p in plan if fnmatch.fnmatchcase(name, p)]
        if not hits:
            continue
        styles = {plan[p] for p in hits}
        if len(styles) > 1:
            raise PlanError(f"module {name!r} matches patterns {hits} with different styles {sorted(styles)}; "
                            "make the patterns disjoint")
        style = styles.pop()
        want = STYLES[style][0]
        if want is not None and type(module) is not want:
            raise PlanError(f"module {name!r} is {type(module).__name__} but style {style!r} needs {want.__name__}; "
                            "narrow the pattern so it matches only those modules")
        chosen[name] = style
        used.update(hits)
    unused = [p for p in plan if p not in used]
    if strict and unused:
        sample = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))][:8]
        raise PlanError(f"plan patterns {unused} match no module; Linear/Embedding names here look like {sample}")
    return chosen


def apply_plan(model: nn.Module, mesh, plan: dict[str, str] | None = None, *, strict: bool = True,
               sequence_parallel: bool = False) -> nn.Module:
    """Replace the planned modules of `model` in place by tensor-parallel ones over mesh.group("tp").

    `mesh` is a trainlib Mesh (or None/anything with .group("tp")); plan defaults to GPT_PLAN
    (GPT_SP_PLAN with sequence_parallel). Returns the model (same object). With sequence
    parallelism, call sync_sequence_parallel_grads(model, mesh) after each backward."""
    if plan is None:
        plan = GPT_SP_PLAN if sequence_parallel else GPT_PLAN
    convert_modules(model, mesh.group("tp") if mesh is not None else None, resolve_plan(model, plan, strict=strict),
                    sequence_parallel)
    return model


def convert_modules(root: nn.Module, group, chosen: dict[str, str], sequence_parallel: bool = False) -> None:
    """Convert `chosen` (module name -> style, from resolve_plan) in place."""
    for name, style in chosen.items():
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        module = getattr(parent, attr) if attr else root
        new = STYLES[style][1](module, group, sequence_parallel)
        if attr and new is not module:
            setattr(parent, attr, new)


def sync_sequence_parallel_grads(model: nn.Module, mesh) -> None:
    """Sum over tp the gradients of parameters that saw only this rank's tokens (one flat all-reduce)."""
    if mesh is None or mesh.size("tp") == 1:
        return
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, group=mesh.group("tp"))
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
