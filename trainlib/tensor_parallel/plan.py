"""`parallelize(model, mesh, plan)`: convert chosen nn.Linear / nn.Embedding modules to tensor-parallel ones.

    plan = {"blocks.*.attn.qkv": "colwise", "blocks.*.attn.proj": "rowwise",
            "blocks.*.mlp.fc": "colwise",   "blocks.*.mlp.proj": "rowwise",
            "embed.tok_emb": "vocab",       "final.head": "colwise"}

Keys are fnmatch patterns over `model.named_modules()` names; values are styles:
    colwise         nn.Linear -> ColumnParallelLinear, output stays split (feed a rowwise layer,
                    or vocab_parallel_cross_entropy for an LM head)
    colwise_gather  nn.Linear -> ColumnParallelLinear(gather_output=True): full output on every rank
    rowwise         nn.Linear -> RowParallelLinear (input split, output replicated)
    vocab           nn.Embedding -> VocabParallelEmbedding
The new modules are built from the existing full weights, so on identical full weights on every
tp rank (same seed), the converted model computes what the original did. Works on any model
whose Linear/Embedding modules are reachable by name, not only trainlib's GPT.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch.nn as nn

from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

STYLES: dict[str, tuple[type, Callable]] = {
    "colwise": (nn.Linear, lambda m, g: ColumnParallelLinear.from_linear(m, g)),
    "colwise_gather": (nn.Linear, lambda m, g: ColumnParallelLinear.from_linear(m, g, gather_output=True)),
    "rowwise": (nn.Linear, lambda m, g: RowParallelLinear.from_linear(m, g)),
    "vocab": (nn.Embedding, lambda m, g: VocabParallelEmbedding.from_embedding(m, g)),
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
        if type(module) is not want:
            raise PlanError(f"module {name!r} is {type(module).__name__} but style {style!r} needs {want.__name__}; "
                            "narrow the pattern so it matches only those modules")
        chosen[name] = style
        used.update(hits)
    unused = [p for p in plan if p not in used]
    if strict and unused:
        sample = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))][:8]
        raise PlanError(f"plan patterns {unused} match no module; Linear/Embedding names here look like {sample}")
    return chosen


def parallelize(model: nn.Module, mesh, plan: dict[str, str] | None = None, *, strict: bool = True) -> nn.Module:
    """Replace the planned modules of `model` in place by tensor-parallel ones over mesh.group("tp").

    `mesh` is a trainlib Mesh (or None/anything with .group("tp")); plan defaults to GPT_PLAN.
    Returns the model (same object)."""
    group = mesh.group("tp") if mesh is not None else None
    for name, style in resolve_plan(model, GPT_PLAN if plan is None else plan, strict=strict).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, STYLES[style][1](getattr(parent, attr), group))
    return model
