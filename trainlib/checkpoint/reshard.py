"""Resume under another layout: read, on each rank, the slices its new layout needs.

A checkpoint's manifest records every saving rank's layout (layout.py): each tensor's full-model
name, global shape, tp slice and ZeRO dp element range. A new rank knows its own layout, so for
each of its parameters it reads the pieces that cover them from the old ranks' files (verified
against the manifest), puts the parameter's global tensor together (one parameter at a time: no
rank materialises the whole model) and cuts out its own tp slice and dp range. Optimizer state
follows the same way: every per-element tensor of a parameter's state (AdamW's exp_avg and
exp_avg_sq, the fp32 master) is resharded like the parameter; scalars (the step count) are copied.

What moves: world size (dp), tp, pp (stage boundaries included), shard stage (none / optimizer /
gradients / parameters), and sync kind. The sampler's position is global, so the data order stays
exact; per-rank RNG states are restored only when the world size is unchanged.
A different model (a parameter missing or of another global shape) is refused naming both.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from .layout import layout_of
from .store import CheckpointError, _Damaged, _read_shard, latest_step, list_steps, step_dir

log = logging.getLogger("trainlib")


def describe(lay: dict) -> str:
    m = lay["mesh"]
    return f"(pp={m['pp']}, dp={m['dp']}, tp={m['tp']}, shard={lay['shard']})"


def _candidates(root) -> list[int]:
    steps = sorted(list_steps(root), reverse=True)
    first = latest_step(root)
    return ([first] if first in steps else []) + [s for s in steps if s != first]


def needs_resharding(root, model, world_size: int, rank: int) -> tuple[int, dict] | None:
    """(step, manifest body) when the newest checkpoint was saved under another layout than this
    rank's; None when it matches (the ordinary load path), there is none, or it records no layouts.
    Every rank reaches the same answer: the layouts are the manifest's, the comparison is global."""
    for step in _candidates(root):
        try:
            body = _read_manifest_body(step_dir(root, step))
        except _Damaged:
            continue
        layouts = body.get("layouts")
        if not layouts:
            return None
        if body["world_size"] != world_size:
            return step, body
        mine = layout_of(model)
        import torch.distributed as dist

        differs = torch.tensor([0.0 if layouts.get(str(rank)) == _comparable(mine) else 1.0])
        if dist.is_available() and dist.is_initialized() and world_size > 1:
            from .. import comm

            comm.all_reduce(differs, op="max")
        return (step, body) if differs.item() else None
    return None


def _comparable(lay: dict) -> dict:
    import json

    return json.loads(json.dumps(lay))   # the manifest's JSON form (tuples -> lists)


def _pieces(layouts: dict) -> dict[str, list[tuple[int, dict]]]:
    """name -> the (old rank, entry) pieces that cover the global tensor once each: dp-replicated
    copies from dp coordinate 0 only, tp-replicated ones from tp coordinate 0 only."""
    out: dict[str, list[tuple[int, dict]]] = {}
    for r, lay in layouts.items():
        for name, e in lay["params"].items():
            sliced = "dp" in e
            if sliced and e["dp"] is None:
                continue
            if not sliced and lay["coords"]["dp"] != 0:
                continue
            if e["tp"] is None and lay["coords"]["tp"] != 0:
                continue
            out.setdefault(name, []).append((int(r), e))
    return out


def _region(whole: torch.Tensor, e: dict) -> torch.Tensor:
    if e["tp"] is None:
        return whole
    dim, n = e["tp"]["dim"], e["local_shape"][e["tp"]["dim"]]
    return whole.narrow(dim, e["tp"]["index"] * n, n)


def _place(whole: torch.Tensor, e: dict, t: torch.Tensor) -> None:
    """Write an old piece (a whole local tensor, or its dp range) into the global tensor."""
    region = _region(whole, e)
    if "dp" in e:
        local = region.contiguous().view(-1)
        local[e["dp"][0]:e["dp"][1]] = t.reshape(-1).to(local.dtype)
        region.copy_(local.view(region.shape))
    else:
        region.copy_(t.reshape(region.shape))


def _cut(whole: torch.Tensor, e: dict) -> torch.Tensor:
    """This new rank's part of a global tensor: its tp slice, then its dp range (flat)."""
    region = _region(whole, e).contiguous()
    if "dp" in e:
        return region.view(-1)[e["dp"][0]:e["dp"][1]]
    return region


class _OldFiles:
    """The old ranks' checkpoint trees, read (and verified) on first use; one kept in memory at a time."""

    def __init__(self, path, world: int):
        self.path, self.world = path, world
        self.cache: dict[int, dict] = {}

    def tree(self, r: int) -> dict:
        if r not in self.cache:
            self.cache = {r: _read_shard(self.path, r, self.world)}
        return self.cache[r]


def _read_manifest_body(path) -> dict:
    """The manifest's body after its own checksum (any world size: that is the point here)."""
    from .store import _read_manifest

    return _read_manifest(path, None)


def _old_sources(state: dict, key: str, index: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An old rank's per-element tensors for parameter `key` ("master": the fp32 weights; "opt:K":
    optimizer state K) and its scalar optimizer state."""
    m = state["model"]
    param = m["slices"][key] if "slices" in m and key in m["slices"] else (m["rest"] if "rest" in m else m)[key]
    o = state["optimizer"]
    masters = o.get("master") or {}
    tensors = {"master": masters.get(key, param)}
    inner = o["optimizer"]["state"] if "optimizer" in o else o.get("state", {})
    scalars = {}
    for k, v in inner.get(index[key], {}).items() if key in index else ():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            tensors[f"opt:{k}"] = v
        else:
            scalars[k] = v
    return tensors, scalars


def _opt_index(state: dict) -> dict[str, int]:
    """Old optimizer: parameter key -> its index in the inner optimizer's state dict."""
    o = state["optimizer"]
    names = o.get("names")
    if names is None and "slices" in o:
        names = [s["name"] for s in o["slices"]]
    return {n: i for i, n in enumerate(names or [])}


def restore(root, step: int, body: dict, model, opt, sampler, counters: dict[str, Any]) -> tuple[int, dict]:
    """Load checkpoint `step` (saved under another layout) into this rank's model/opt/sampler."""
    import torch.distributed as dist

    path = step_dir(root, step)
    layouts = body["layouts"]
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    new = layout_of(model)
    pieces = _pieces(layouts)
    saved_shapes = {n: ps[0][1]["shape"] for n, ps in pieces.items()}
    for name, e in new["params"].items():
        if name not in saved_shapes:
            raise CheckpointError(f"{path} has no parameter {name!r} (shape {e['shape']}): it was saved from another "
                                  f"model ({len(saved_shapes)} parameters, e.g. {sorted(saved_shapes)[:3]}); resume "
                                  "with the model it was saved with, or use a new --checkpoint.dir")
        if saved_shapes[name] != e["shape"]:
            raise CheckpointError(f"{path} holds {name} with shape {saved_shapes[name]}, this model has {e['shape']}; "
                                  "resume with the model it was saved with, or use a new --checkpoint.dir")
    if rank == 0:
        log.info("resuming step %d saved as %s as %s", step, describe(layouts["0"]), describe(new))
    files = _OldFiles(path, body["world_size"])
    wanted = [n for n, e in new["params"].items() if not ("dp" in e and e["dp"] is None)]
    by_old_rank: dict[int, list[tuple[str, dict]]] = {}
    for name in wanted:
        for r, e in pieces[name]:
            by_old_rank.setdefault(r, []).append((name, e))
    # each needed parameter's global tensors, filled old file by old file (each file read once)
    wholes: dict[tuple[str, str], torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    kept: dict[int, dict] = {}   # the small parts read once, while their file is in memory anyway

    def keep(r: int, tree: dict) -> None:
        if r == 0:
            kept[0] = {"sampler": tree["state"]["sampler"], "trainer": tree["state"]["trainer"]}
        if r == rank:
            kept.setdefault("rng", tree.get("rng"))

    for r in sorted(by_old_rank):
        keep(r, files.tree(r))
        state = files.tree(r)["state"]
        index = _opt_index(state)
        for name, e in by_old_rank[r]:
            tensors, sc = _old_sources(state, e["key"], index)
            scalars.setdefault(name, {}).update(sc)
            for what, t in tensors.items():
                whole = wholes.setdefault((name, what), torch.zeros(e["shape"], dtype=torch.float32))
                _place(whole, e, t.float())
    params, opt_slots = _targets(model, opt, new)
    for name in wanted:
        e = new["params"][name]
        for setter in params.get(name, ()):
            setter(_cut(wholes[(name, "master")], e))
        slot = opt_slots.get(name)
        if slot is not None:
            for (n, what), whole in wholes.items():
                if n == name and what.startswith("opt:"):
                    slot[what[4:]] = _cut(whole, e).clone()
            if any(what.startswith("opt:") for n, what in wholes if n == name):
                slot.update({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in scalars[name].items()})
    _finish(model, opt, opt_slots)
    same_world = body["world_size"] == world
    for r in {0, rank} if same_world else {0}:
        if (r == 0 and 0 not in kept) or (r == rank and "rng" not in kept):
            keep(r, files.tree(r))
    first = kept[0]
    sampler.load_state_dict(first["sampler"])
    if same_world and kept.get("rng") is not None:
        from . import rng

        rng.restore(kept["rng"])
    return step, {**counters, **first["trainer"], "resumed_from": step}


def _targets(model, opt, new: dict) -> tuple[dict[str, list[Callable]], dict[str, dict]]:
    """(name -> setters of this rank's weights from the fp32 global tensor's cut, name -> the
    optimizer state slot of its (slice) tensor, filled by restore and installed by _finish)."""
    dp = getattr(model, "dp_model", model)
    sharded = dp if getattr(dp, "sharded", False) else None
    local = getattr(model, "module", model)
    by_key = {e["key"]: name for name, e in new["params"].items()}
    inner = getattr(opt, "inner", opt)
    setters: dict[str, list[Callable]] = {}
    slots: dict[str, dict] = {}
    if sharded is not None:
        sharded.release_shards()   # its setters write the parameter chunks peers may still read
        positions = {sl["name"]: j for j, sl in enumerate(opt.slices)}   # DistributedOptimizer's inner order
        masters = sharded.param_slices("master")
        for key, t in sharded.param_slices().items():
            name = by_key[key]
            setters[name] = [lambda v, t=t: t.copy_(v.to(t.dtype))]
            if masters[key].data_ptr() != t.data_ptr():
                setters[name].append(lambda v, m=masters[key]: m.copy_(v))
            slots[name] = {"__index__": positions.get(key)}
        bucketed = {id(p) for b in sharded.buckets for p in b.params}
        for key, p in local.named_parameters():
            if id(p) not in bucketed and key in by_key:   # frozen: whole on every rank
                setters[by_key[key]] = [lambda v, p=p: p.data.copy_(v.to(p.dtype))]
    else:
        for key, p in local.named_parameters():
            if key not in by_key:
                continue
            name = by_key[key]
            setters[name] = [lambda v, p=p: p.data.copy_(v.to(p.dtype))]
            idx = _inner_index(inner, p)
            if idx is not None:
                slots[name] = {"__index__": idx}
    return setters, {n: s for n, s in slots.items() if s["__index__"] is not None}


def _inner_index(inner, t: torch.Tensor) -> int | None:
    i = 0
    for g in inner.param_groups:
        for q in g["params"]:
            if q is t:
                return i
            i += 1
    return None


def _finish(model, opt, slots: dict[str, dict]) -> None:
    """Install the resharded optimizer state; stages 1/2 all-gather the loaded parameter chunks."""
    inner = getattr(opt, "inner", opt)
    sd = inner.state_dict()
    sd["state"] = {s.pop("__index__"): s for s in slots.values() if len(s) > 1}
    inner.load_state_dict(sd)
    dp = getattr(model, "dp_model", model)
    if getattr(dp, "sharded", False):
        dp.after_load()
