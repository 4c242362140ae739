"""Nested training state <-> (flat tensors for safetensors, a JSON skeleton). No pickle.

A state is a tree of dicts, lists and tuples whose leaves are tensors or JSON scalars (int,
float incl. nan/inf, bool, str, None) — what `model.state_dict()`, `torch.optim` state dicts and
sampler/RNG states are made of. Tensors go to safetensors under their path ("optimizer/state/0/
exp_avg"); everything else stays in the skeleton. Two things JSON cannot say are tagged:

    {"__tensor__": "optimizer/state/0/exp_avg"}     a tensor leaf
    {"__tuple__": [...]}                              a tuple (optimizer betas)
    {"__dict__": [[key, value], ...]}                 a dict with non-str keys (optimizer state is keyed by int)

so `unflatten(*flatten(x)) == x`, keys and types included, floats bit-exact (JSON uses repr).
"""
from __future__ import annotations

from typing import Any

import torch

_TAGS = ("__tensor__", "__tuple__", "__dict__")


class StateError(TypeError):
    """A value in the state cannot be stored without pickle; the message names its path."""


def flatten(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Return (skeleton, tensors). Tensors are detached, on CPU, contiguous and own their memory."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            t = x.detach()
            if t.device.type != "cpu":
                t = t.cpu()  # a copy: owns its storage
            else:
                # safetensors refuses tensors that share memory (views of one flat buffer, tied
                # weights); those are cloned, the common case of one tensor per storage is not.
                key = t.untyped_storage().data_ptr()
                whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
                if key in storages or not whole:
                    t = t.clone(memory_format=torch.contiguous_format)
                else:
                    storages.add(key)
            name = path or "."
            if name in tensors:
                raise StateError(f"two tensors map to the checkpoint key {name!r}; rename a key containing '/'")
            tensors[name] = t
            return {"__tensor__": name}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not any(k in _TAGS for k in x):
                return {k: walk(v, f"{path}/{k}" if path else k) for k, v in x.items()}
            for k in x:
                if not isinstance(k, (str, int, bool)) and k is not None:
                    raise StateError(f"state key {k!r} at {path or '<root>'!r} is a {type(k).__name__}; "
                                     "use str or int keys")
            return {"__dict__": [[k, walk(v, f"{path}/{k}" if path else str(k))] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise StateError(f"state value at {path or '<root>'!r} is a {type(x).__name__}, which a checkpoint cannot "
                         "store without pickle; convert it to tensors, numbers, strings, lists or dicts")

    return walk(state, ""), tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten`."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        if "__dict__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    return skeleton
