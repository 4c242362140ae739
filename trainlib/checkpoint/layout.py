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

from typing import Any, Callable

import torch
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


def assemble(step_path, what: str = "params",
             on_rank: "Callable[[int], None] | None" = None) -> dict[str, "torch.Tensor"]:
    """The whole model's parameters (fp32, full-model names) from a checkpoint directory, in one
    process with no job: each tensor put together from its tp and dp slices as the manifest's
    layouts say, every file read verified against the manifest. what="params" (what the model
    computed with) or "master" (the optimizer's fp32 copies, under a mixed-precision policy).

    Only the ranks that hold a part no other rank already gave are read (dp replicas of an
    unsharded run and tp copies of replicated tensors are the same bytes); on_rank(rank) is called
    after each rank, read or skipped (a progress bar). Raises CheckpointError when the manifest has
    no layouts or the ranks do not cover every element of a tensor."""
    import json
    import os
    from pathlib import Path

    import torch

    from .store import MANIFEST, CheckpointError, _read_shard

    if what not in ("params", "master"):
        raise ValueError(f"what={what!r}: use 'params' or 'master'")
    # a directory, or the path-like store.step_dir gives for an s3:// checkpoint
    path = Path(step_path) if isinstance(step_path, (str, os.PathLike)) else step_path
    body = json.loads((path / MANIFEST).read_bytes())["body"]  # _read_shard checks its sha256 below
    layouts = body.get("layouts")
    if not layouts:
        raise CheckpointError(f"{path}: the manifest has no layouts (saved before trainlib recorded them); "
                              "load it with the layout it was saved with")
    full: dict[str, torch.Tensor] = {}
    covered: dict[str, int] = {}
    for rank, lay in sorted(layouts.items(), key=lambda kv: int(kv[0])):
        wanted = {n: e for n, e in lay["params"].items() if _contributes(e, lay["coords"])}
        if wanted:
            state = _read_shard(path, int(rank), body["world_size"])["state"]
            _place(full, covered, wanted, _sources(state, what))
        if on_rank is not None:
            on_rank(int(rank))
    short = [f"{n} ({covered.get(n, 0)} of {t.numel()} elements)" for n, t in full.items() if covered[n] != t.numel()]
    if short:
        raise CheckpointError(f"{path}: the rank files do not cover every element of {', '.join(short[:3])}; "
                              "the manifest's layouts do not match the files (a checkpoint from another writer?)")
    return full


def _contributes(entry: dict, coords: dict) -> bool:
    """Whether this rank's copy of a tensor is a part no other rank gave first: tp-replicated
    tensors come from tp rank 0, unsharded tensors from dp rank 0, ZeRO slices from their owner."""
    if entry["tp"] is None and coords["tp"] != 0:
        return False
    if "dp" in entry:
        return entry["dp"] is not None
    return coords["dp"] == 0


def _sources(state: dict, what: str) -> list[dict]:
    """Where a rank's tensors are, by layout key, in lookup order: a sharded rank's slices (or fp32
    masters), then its unsharded rest (frozen parameters); an unsharded rank's model state."""
    model = state["model"]
    if "slices" not in model:
        return [model]
    master = state.get("optimizer", {}).get("master") if what == "master" else None
    return [master or model["slices"], model.get("rest", {})]


def _place(full: dict, covered: dict, entries: dict, sources: list[dict]) -> None:
    import torch

    for name, entry in entries.items():
        t = next((s[entry["key"]] for s in sources if entry["key"] in s), None)
        if t is None:
            from .store import CheckpointError

            raise CheckpointError(f"the layout names {entry['key']!r} ({name}) but the rank file has no such tensor")
        whole = full.setdefault(name, torch.zeros(entry["shape"], dtype=torch.float32))
        region = whole
        if entry["tp"] is not None:
            dim, n = entry["tp"]["dim"], entry["local_shape"][entry["tp"]["dim"]]
            region = whole.narrow(dim, entry["tp"]["index"] * n, n)
        if entry.get("dp") is not None:   # this dp rank's flat elements of the (tp slice of the) tensor
            local = region.contiguous().view(-1)
            local[entry["dp"][0]:entry["dp"][1]] = t.reshape(-1).float()
            region.copy_(local.view(region.shape))
            count = entry["dp"][1] - entry["dp"][0]
        else:
            region.copy_(t.float().view(region.shape))
            count = region.numel()
        covered[name] = covered.get(name, 0) + count
