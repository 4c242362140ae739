"""Activation checkpointing on the blocks of any model (Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost"; selective: Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", sec. 5).

    apply_activation_checkpointing(model, "full")        # keep each block's input, recompute the rest
    apply_activation_checkpointing(model, "selective")   # keep matmul/attention outputs, recompute the cheap ops

"full": a block keeps only its input; backward re-runs its whole forward. Activation memory per
block drops from ~34·s·b·h bytes (Korthikanti's count, fp16) to s·b·h·2, for one more forward.
"selective": what torchtitan's op-level SAC and Megatron's selective recompute do: the outputs of
matmuls and fused attention (the FLOPs) are saved, the elementwise/normalisation ops between them
(GELU, LayerNorm, softmax, dropout, adds: memory, few FLOPs) are recomputed, and so are no
tensor-parallel reductions: their outputs are kept too (kept_collective). It is torch's
selective checkpointing (create_selective_checkpoint_contexts) re-done in two small dispatch modes
so that a region can be backed up more than once, as zero-bubble pipelining's split backward does.
Needs checkpoint's context_fn (torch >= 2.1); without it every other block is fully checkpointed
instead, and that is logged once.

Which modules are "the blocks":
  1. a list / nn.ModuleList / nn.Sequential of layers, or `model.as_layers()` (trainlib's GPT gives
     [embed, *blocks, final]): the layers whose class occurs more than once (the repeated blocks);
     if no class repeats (a one-block model), the layers between the first and the last.
  2. otherwise (Hugging Face and other models) the children of nn.ModuleLists whose class the
     model names in `_no_split_modules` (HF's own list of its blocks: `transformer.h`'s GPT2Block,
     `model.layers`' LlamaDecoderLayer, both T5 stacks' T5Block);
  3. otherwise the children of the nn.ModuleList holding the most parameters (the first on ties).
Call it on the FULL model (or its full list of layers): a pipeline stage's nn.Sequential is not
a model. Wrapping is in place and per module, so it survives a later pipeline split (the pipeline
calls the same module objects) and composes with tensor parallelism applied before it.

How a block is wrapped: its class is swapped for a subclass whose forward runs the original one
under torch.utils.checkpoint (use_reentrant=False, preserve_rng_state=True, so dropout masks are
recomputed identically), as FSDP2's fully_shard does. No wrapper module is inserted, so parameter
names and state_dict keys are unchanged (a checkpoint saved without AC loads with it) and
isinstance(block, Block) still holds. The block's own forward hooks run once, around the
checkpointed call; its submodules' hooks run again during recomputation.

Applying it twice with the same mode is a no-op; with another mode it is a ValueError (build a
fresh model). mode=None (or "none", the config's spelling) does nothing.
"""
from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections import Counter
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils import checkpoint as ckpt
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

log = logging.getLogger("trainlib")

MODES = ("full", "selective")

# Ops whose outputs selective checkpointing keeps: the matmuls and fused attention, i.e. what costs
# FLOPs to recompute (torchtitan's _save_list, less its float8/collective entries). Resolved by name
# so an op missing from an older torch is skipped rather than an AttributeError.
_SAVE_OP_NAMES = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                  "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")

_CLASSES: dict[tuple[type, str, str], type] = {}  # (block class, mode, recompute) -> its checkpointed subclass
_warned_fallback = False


def selective_supported() -> bool:
    """Whether this torch can run op-level selective checkpointing (checkpoint's context_fn, torch >= 2.1);
    without it "selective" fully checkpoints every other block."""
    return "context_fn" in inspect.signature(ckpt.checkpoint).parameters


@functools.lru_cache(maxsize=1)
def _save_ops() -> frozenset:
    ops = []
    for name in _SAVE_OP_NAMES:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.extend(getattr(packet, o) for o in packet.overloads())
    return frozenset(ops)


def _detach(x: Any) -> Any:
    """A new tensor on the same storage and version counter, with no autograd history: returned from
    the replay mode, autograd gives it the recomputed graph's history without touching the original."""
    if not isinstance(x, torch.Tensor):
        return x
    guard = getattr(torch._C, "_SetExcludeDispatchKeyGuard", None)
    if guard is None:
        return x.detach()
    with guard(torch._C.DispatchKey.ADInplaceOrView, False):  # so the version counter is shared
        return x.detach()


_modes = threading.local()   # the keep / replay mode of the selectively checkpointed region running now


def _current_mode() -> Any:
    stack = getattr(_modes, "stack", None)
    return stack[-1] if stack else None


class _Tracked(TorchDispatchMode):
    """A dispatch mode that also says it is running (kept_collective asks), per thread."""

    def __enter__(self):
        if not hasattr(_modes, "stack"):
            _modes.stack = []
        _modes.stack.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _modes.stack.pop()
        return super().__exit__(*exc)


def kept_collective(run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The output of a forward collective that reduces (tensor parallelism's all-reduce, sequence
    parallelism's reduce-scatter): run() outside selective checkpointing; inside it the forward keeps
    the output and the recomputation replays it instead of communicating again -- Megatron's selective
    recompute and torchtitan's save list never redo the communication, only the cheap ops around it.
    (Full checkpointing recomputes everything, collectives included.)"""
    mode = _current_mode()
    return run() if mode is None else mode.collective(run)


def _versions(kept: Any) -> list[int]:
    return [t._version for t in tree_leaves(kept) if isinstance(t, torch.Tensor)]


class _KeepCostlyOutputs(_Tracked):
    """Forward half of selective checkpointing: keeps the outputs of the matmul/attention ops, by (op, call index).

    torch's own create_selective_checkpoint_contexts hands each kept output out once and then refuses
    ("Trying to backward an extra time"), but zero-bubble pipelining backs a region up twice (input
    gradient, then weight gradient), so this pair replays its outputs as often as asked. The kept
    tensors live as long as the checkpointed graph, as saved tensors do."""

    def __init__(self, cache: dict):
        super().__init__()
        self.cache, self.calls = cache, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _save_ops():
            kept = tree_map(_detach, out)
            self.cache[(func, self.calls[func])] = (kept, _versions(kept))
            self.calls[func] += 1
        return out

    def collective(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        out = run()
        kept = _detach(out)
        self.cache[("collective", self.calls["collective"])] = (kept, _versions(kept))
        self.calls["collective"] += 1
        return out


class _ReplayCostlyOutputs(_Tracked):
    """Recompute half: the kept ops return their forward outputs, every other op runs again."""

    def __init__(self, cache: dict):
        super().__init__()
        self.cache, self.calls = cache, Counter()

    def __enter__(self):
        self.calls.clear()  # each recomputation replays from the first call
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _save_ops():
            return func(*args, **(kwargs or {}))
        return self._replay(func)

    def collective(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self._replay("collective")

    def _replay(self, what: Any) -> Any:
        key = (what, self.calls[what])
        self.calls[what] += 1
        if key not in self.cache:
            raise RuntimeError(f"selective activation checkpointing: call {key[1]} of {what} in the recomputation "
                               "has no counterpart in the forward; the block's forward must run the same ops "
                               "each time (no data-dependent control flow), or use mode 'full'")
        kept, versions = self.cache[key]
        if _versions(kept) != versions:
            raise RuntimeError(f"selective activation checkpointing: the output of {what} was modified in place "
                               "after the forward kept it, so replaying it would be wrong; make that op "
                               "out-of-place or use mode 'full'")
        return tree_map(_detach, kept)


def _selective_context() -> tuple[TorchDispatchMode, TorchDispatchMode]:
    cache: dict = {}
    return _KeepCostlyOutputs(cache), _ReplayCostlyOutputs(cache)


def _checkpointed_class(cls: type, mode: str, recompute: str) -> type:
    """The subclass of `cls` whose forward runs cls.forward under checkpoint. recompute: "all" (the
    whole forward) or "cheap_ops" (selective: matmul/attention outputs saved). One class per key."""
    key = (cls, mode, recompute)
    if key in _CLASSES:
        return _CLASSES[key]
    extra: dict[str, Any] = {"context_fn": _selective_context} if recompute == "cheap_ops" else {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # inference: nothing to save, nothing to recompute
            return cls.forward(self, *args, **kwargs)
        return ckpt.checkpoint(cls.forward, self, *args, use_reentrant=False, preserve_rng_state=True,
                               **extra, **kwargs)

    sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "_trainlib_ac_mode": mode,
                                                        "__module__": cls.__module__})
    _CLASSES[key] = sub
    return sub


def checkpoint_mode(module: nn.Module) -> str | None:
    """"full" / "selective" if apply_activation_checkpointing wrapped this module, else None."""
    return getattr(type(module), "_trainlib_ac_mode", None)


def _base_class(module: nn.Module) -> type:
    """The module's class before wrapping (blocks are grouped by it)."""
    return type(module).__mro__[1] if checkpoint_mode(module) is not None else type(module)


def _repeated(layers: list[nn.Module]) -> list[nn.Module]:
    counts = Counter(_base_class(m) for m in layers)
    blocks = [m for m in layers if counts[_base_class(m)] > 1]
    if not blocks and len(layers) >= 3:
        blocks = layers[1:-1]  # [embed, block, head]: the single block
    return blocks


def _listed_blocks(model: nn.Module) -> list[nn.Module]:
    """Children of nn.ModuleLists whose class Hugging Face names in `_no_split_modules` (its own list of
    the blocks FSDP may wrap: GPT2Block, LlamaDecoderLayer, T5Block for both stacks); outermost only."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and id(m) not in inside:
            for child in m:
                if type(child).__name__ in names:
                    blocks.append(child)
                    inside.update(id(d) for d in child.modules())
    return blocks


def find_blocks(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    """The modules apply_activation_checkpointing wraps (see the module docstring for the rule)."""
    if isinstance(model, (list, tuple, nn.ModuleList, nn.Sequential)):
        layers, where = list(model), f"the {len(model)} layers given"
    elif callable(getattr(model, "as_layers", None)):
        layers, where = list(model.as_layers()), f"{type(model).__name__}.as_layers()"
    else:
        blocks = _listed_blocks(model)
        if blocks:
            return blocks
        lists = [(sum(p.numel() for p in m.parameters()), i, m)
                 for i, m in enumerate(model.modules()) if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise ValueError(f"{type(model).__name__} has no as_layers() method and no nn.ModuleList of blocks, so "
                             "activation checkpointing cannot tell its blocks; keep the repeated blocks in an "
                             "nn.ModuleList, give the model an as_layers() method, or pass the list of layers")
        return list(max(lists, key=lambda t: (t[0], -t[1]))[2])  # most parameters, first on ties
    blocks = _repeated(layers)
    if not blocks:
        raise ValueError(f"activation checkpointing found no blocks in {where} ({[type(m).__name__ for m in layers]}): "
                         "no layer class repeats and there is no layer between the first and the last; pass the "
                         "full model or its full list of layers (one pipeline stage's layers are not enough), or "
                         "call wrap_blocks() with the blocks themselves")
    return blocks


def _check_mode(mode: object) -> None:
    if mode is not None and mode != "none" and mode not in MODES:
        raise ValueError(f"activation_checkpointing={mode!r} is not one of 'full', 'selective', 'none' or None")


def _disable_kv_cache(model: object) -> None:
    """A Hugging Face model that builds a KV cache in forward would append to it again during
    recomputation; HF turns the cache off under its own gradient checkpointing, and so do we."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False
        log.info("activation checkpointing: set %s.config.use_cache = False (a KV cache is for generation, and "
                 "recomputing a block would append to it twice)", type(model).__name__)


def apply_activation_checkpointing(model: nn.Module | list[nn.Module], mode: str | None) -> None:
    """Checkpoint the blocks of `model` in place: mode "full", "selective", or None / "none" (nothing).

    Apply it after tensor-parallel conversion; before or after the pipeline split (the stages hold
    the same module objects). Calling it again with the same mode is a no-op; with another mode it
    raises ValueError."""
    _check_mode(mode)
    if mode is None or mode == "none":
        return
    blocks = find_blocks(model)
    done = {checkpoint_mode(b) for b in blocks} - {None}
    if done:
        if done == {mode}:
            log.debug("activation checkpointing: %s is already checkpointed (%s); nothing to do",
                      type(model).__name__, mode)
            return
        raise ValueError(f"{type(model).__name__} is already activation-checkpointed with mode "
                         f"{'/'.join(sorted(done))!r}; cannot switch to {mode!r} in place: build a fresh model "
                         "and apply the mode you want once")
    for b in blocks:
        if getattr(b, "gradient_checkpointing", False):
            raise ValueError(f"{type(b).__name__} is already checkpointed by Hugging Face's "
                             "gradient_checkpointing_enable(); use that or trainlib's activation_checkpointing, "
                             "not both (call model.gradient_checkpointing_disable())")
    _disable_kv_cache(model)
    wrap_blocks(blocks, mode, "ops" if selective_supported() else "every_other")


def wrap_blocks(blocks: list[nn.Module], mode: str, selective_strategy: str = "ops") -> None:
    """Swap each block's class for its checkpointed subclass. selective_strategy: "ops" (op-level
    selective checkpointing) or "every_other" (torch without it: blocks 0, 2, 4, ... fully
    checkpointed, the others untouched)."""
    global _warned_fallback
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of 'full' or 'selective'")
    if selective_strategy not in ("ops", "every_other"):
        raise ValueError(f"selective_strategy={selective_strategy!r} is not 'ops' or 'every_other'")
    recompute = "all"
    if mode == "selective" and selective_strategy == "ops":
        recompute = "cheap_ops"
    elif mode == "selective":
        if not _warned_fallback:
            log.warning("activation checkpointing: torch %s's checkpoint has no context_fn; "
                        "'selective' checkpoints every other block fully instead", torch.__version__)
            _warned_fallback = True
        blocks = blocks[::2]  # block 0 always: a second call still sees the model as checkpointed
    for b in blocks:
        b.__class__ = _checkpointed_class(type(b), mode, recompute)
