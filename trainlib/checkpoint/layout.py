"""Where each saved tensor sits in the whole model: the layout a checkpoint's manifest records.

For every parameter a rank saves, by its name in the FULL model (a pipeline stage's modules are
renamed back to the model they were cut from):

    {"key": name in this rank's file, "shape": [global shape], "local_shape": [this rank's tensor],
     "tp": {"dim": d, "index": i, "size": n} | None,      # a tensor-parallel slice along dim d
     "dp": [start, end] | None}                            # a ZeRO slice: flat elements of the local tensor

plus the rank's mesh coordinates and the shard stage. Enough to reassemble every tensor from the
ranks' files, or to read only the slices another layout needs (resharding builds on this).
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn


def layout_of(model) -> dict[str, Any]:
    """This rank's layout (pure: no collective). `model`: a ParallelModel, a DataParallel or a module."""
    mesh = getattr(model, "mesh", None)
    dp_model = getattr(model, "dp_model", model)
    sharded = dp_model if getattr(dp_model, "sharded", False) else None
    local = getattr(model, "module", model)
    names = getattr(model, "full_names", None) or {}
    tp = mesh.size("tp") if mesh is not None else 1
    slices: dict[int, tuple[int, int] | None] = {}
    if sharded is not None:
        for b in sharded.buckets:
            for i, p in enumerate(b.params):
                part = b.chunk_of(i)
                slices[id(p)] = (part[0] - b.offsets[i], part[1] - b.offsets[i]) if part else None
    params: dict[str, dict] = {}
    for local_name, p in local.named_parameters():
        shape = list(p.shape)
        tp_entry = None
        if getattr(p, "tp_sharded", False) and tp > 1:
            dim = getattr(p, "tp_dim", 0)
            tp_entry = {"dim": dim, "index": mesh.rank("tp"), "size": tp}
            shape[dim] *= tp
        entry = {"key": local_name, "shape": shape, "local_shape": list(p.shape), "tp": tp_entry}
        if id(p) in slices:
            entry["dp"] = list(slices[id(p)]) if slices[id(p)] is not None else None
        params[names.get(id(p), local_name)] = entry
    coords = {a: mesh.rank(a) for a in ("pp", "dp", "tp")} if mesh is not None else {"pp": 0, "dp": 0, "tp": 0}
    sizes = {a: mesh.size(a) for a in ("pp", "dp", "tp")} if mesh is not None else {"pp": 1, "dp": 1, "tp": 1}
    return {"mesh": sizes, "coords": coords, "shard": getattr(sharded, "shard", None) or "none", "params": params}


def full_model_names(model: nn.Module | list) -> dict[int, str]:
    """id(parameter) -> its name in the full model (what a layout records under pipeline splits)."""
    root = model if isinstance(model, nn.Module) else nn.ModuleList(model)
    named = list(root.named_parameters(remove_duplicate=False))
    return {id(p): n for n, p in reversed(named)}   # a tied parameter keeps its first name


def assemble(step_path, what: str = "params") -> dict[str, "torch.Tensor"]:
    """The whole model's parameters from a checkpoint directory (one process, no job): every
    rank's file verified against the manifest, each tensor put together from its tp and dp slices
    as the manifest's layouts say. what="params" (what the model computed with) or "master" (the
    optimizer's fp32 copies, under a mixed-precision policy)."""
    import json
    from pathlib import Path

    import torch

    from .store import MANIFEST, CheckpointError, _read_shard

    path = Path(step_path)
    body = json.loads((path / MANIFEST).read_bytes())["body"]
    layouts = body.get("layouts")
    if not layouts:
        raise CheckpointError(f"{path}: the manifest has no layouts (saved before trainlib recorded them); "
                              "load it with the layout it was saved with")
    full: dict[str, torch.Tensor] = {}
    for rank, lay in layouts.items():
        state = _read_shard(path, int(rank), body["world_size"])["state"]
        model_state = state["model"]
        if what == "master" and "master" in state["optimizer"]:
            source = state["optimizer"]["master"]
        else:
            source = model_state["slices"] if "slices" in model_state else model_state
        for name, entry in lay["params"].items():
            sliced = "dp" in entry
            if sliced and (entry["dp"] is None or (entry["tp"] is None and lay["coords"]["tp"] != 0)):
                continue  # no part of it here, or a tp-replicated copy another tp rank already gave
            whole = full.setdefault(name, torch.zeros(entry["shape"], dtype=torch.float32))
            region = whole
            if entry["tp"] is not None:
                dim, n = entry["tp"]["dim"], entry["local_shape"][entry["tp"]["dim"]]
                region = whole.narrow(dim, entry["tp"]["index"] * n, n)
            t = source[entry["key"]].float()
            if sliced:   # this dp rank's flat elements of the (tp slice of the) tensor
                local = region.contiguous().view(-1)
                local[entry["dp"][0]:entry["dp"][1]] = t
                region.copy_(local.view(region.shape))
            else:
                region.copy_(t.view(region.shape))
    return full
