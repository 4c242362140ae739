"""Does the checkpoint under checkpoint.dir fit this run's model and mesh? Answered before launch.

Each rank saves and loads only its own shard (trainlib/checkpoint/store.py); loading under another
layout (resharding) does not exist yet, so a checkpoint from another world size, mesh or model
shape used to fail inside every rank with a tensor-size traceback. Rank 0's tensor names and
shapes are a fingerprint of (model, layout): they are predicted here from the config alone (a
meta-device GPT, the pipeline partitioner, the tensor-parallel plan; no process group) and
compared with the safetensors header of rank 0's file on disk.
"""
from __future__ import annotations

import fnmatch
import json
import struct
from pathlib import Path

from .config import Config, ConfigError
from .mesh import MeshLayout

Shapes = dict[str, tuple[int, ...]]
_MODEL_PREFIX = "state/model/"


def check_checkpoint(cfg: Config, layout: MeshLayout) -> None:
    """Raise ConfigError when the newest checkpoint under checkpoint.dir was saved by another
    world size, mesh or model shape (naming both); a damaged or unreadable one is left to load(),
    which falls back to an older checkpoint."""
    from .checkpoint.store import latest_step, list_steps, step_dir

    root = cfg.checkpoint.dir
    steps = list_steps(root) if root else []
    if not steps:
        return
    step = latest_step(root) if latest_step(root) in steps else steps[-1]
    path = step_dir(root, step)
    saved_world, saved = _manifest_world_size(path), _rank0_model_shapes(path)
    if saved_world is None or saved is None:
        return
    layouts = _manifest_layouts(path)
    if layouts:   # a layout-recording checkpoint resumes under any layout of the same model
        _check_global_shapes(cfg, root, step, layouts)
        return
    model = _meta_model(cfg)
    want = expected_rank0_shapes(model, layout, _virtual(cfg))
    if saved_world == layout.world_size and saved == want:
        return
    here = f"{layout.world_size} ranks as pp={layout.pp} dp={layout.dp} tp={layout.tp}"
    saved_as = _describe(model, saved_world, saved, want)
    raise ConfigError(f"checkpoint.dir={root!r} holds step {step}, saved by {saved_as}; "
                      f"this run is {here} with model n_layer={cfg.model.n_layer} n_head={cfg.model.n_head} "
                      f"d_model={cfg.model.d_model} seq_len={cfg.model.seq_len} vocab_size={cfg.model.vocab_size}. "
                      "Checkpoints do not reshard between layouts: resume with the layout and model it was saved "
                      "with, or point --checkpoint.dir at a new directory")


def _virtual(cfg: Config) -> int:
    return cfg.mesh.virtual_stages


def _describe(model, world: int, saved: Shapes, want: Shapes) -> str:
    """Name the saved layout when this run's model shape explains rank 0's shard, else say the model differs."""
    for pp in _divisors(world):
        for tp in _divisors(world // pp):
            layout = MeshLayout(pp=pp, dp=world // pp // tp, tp=tp)
            for v in ((1, 2) if pp > 1 else (1,)):
                try:
                    if expected_rank0_shapes(model, layout, v) == saved:
                        return f"{world} ranks as pp={pp} dp={layout.dp} tp={tp}" + (" (interleaved)" if v > 1 else "")
                except ValueError:  # more stages than layers: not the saved layout
                    continue
    return f"{world} ranks with another model shape ({_first_difference(saved, want)})"


def _first_difference(saved: Shapes, want: Shapes) -> str:
    """The first tensor of rank 0's shard that this run would not load."""
    for name in sorted(set(saved) | set(want)):
        if name not in want:
            return f"rank 0 has {name} {list(saved[name])}, which this run does not"
        if name not in saved:
            return f"rank 0 lacks {name}, which this run has"
        if saved[name] != want[name]:
            return f"rank 0 has {name} {list(saved[name])}, this run expects {list(want[name])}"
    return "the same tensors"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _meta_model(cfg: Config):
    import torch

    from .models.gpt import GPT

    with torch.device("meta"):  # shapes only: no memory, no init cost for a large model
        return GPT(cfg.model, seed=0)


def expected_rank0_shapes(model, layout: MeshLayout, virtual_stages: int = 1) -> Shapes:
    """What rank 0 saves under state/model for the default GPT on `layout` (trainer.train's wrapping):
    pp == 1: the full model's names; pp > 1: '<local stage>.<layer in stage>.<name>' over the
    stages balance() gives rank 0. tp > 1 slices the planned tensors by GPT_PLAN."""
    from .pipeline.partition import balance, layer_costs
    from .tensor_parallel import GPT_PLAN

    def sliced(full_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        module, _, leaf = full_name.rpartition(".")
        style = next((s for pat, s in GPT_PLAN.items() if fnmatch.fnmatchcase(module, pat)), None)
        if layout.tp == 1 or style is None:
            return shape
        dim = 1 if style == "rowwise" and leaf == "weight" else 0
        if style == "rowwise" and leaf != "weight":
            return shape  # a row-parallel bias is added after the reduction: replicated
        return tuple(n // layout.tp if i == dim else n for i, n in enumerate(shape))

    if layout.pp == 1:
        return {k: sliced(k, tuple(t.shape)) for k, t in model.state_dict().items()}
    layers = model.as_layers()
    prefixes = ["embed", *[f"blocks.{i}" for i in range(len(layers) - 2)], "final"]
    n_stages = layout.pp * virtual_stages
    bounds = balance(layer_costs(layers), n_stages)
    out: Shapes = {}
    for i, stage in enumerate(range(0, n_stages, layout.pp)):
        for j, li in enumerate(range(bounds[stage], bounds[stage + 1])):
            for name, t in layers[li].state_dict().items():
                out[f"{i}.{j}.{name}"] = sliced(f"{prefixes[li]}.{name}", tuple(t.shape))
    return out


def _manifest_world_size(path: Path) -> int | None:
    try:
        return int(json.loads((path / "MANIFEST.json").read_bytes())["body"]["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _manifest_layouts(path: Path) -> dict | None:
    """Every saving rank's layout from the manifest (None: not recorded, or unreadable)."""
    try:
        return json.loads((path / "MANIFEST.json").read_bytes())["body"].get("layouts") or None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _check_global_shapes(cfg: Config, root: str, step: int, layouts: dict) -> None:
    """The saved model's parameters (full names, global shapes) must be this run's model's."""
    saved = {n: tuple(e["shape"]) for lay in layouts.values() for n, e in lay["params"].items()}
    want = {n: tuple(p.shape) for n, p in _meta_model(cfg).named_parameters()}
    if saved == want:
        return
    name = next((n for n in sorted(want) if saved.get(n) != want[n]), None) or sorted(set(saved) - set(want))[0]
    raise ConfigError(f"checkpoint.dir={root!r} holds step {step} of another model: {name} has shape "
                      f"{list(saved[name]) if name in saved else 'none (absent)'} there and "
                      f"{list(want[name]) if name in want else 'none (absent)'} in this run (model n_layer="
                      f"{cfg.model.n_layer} n_head={cfg.model.n_head} d_model={cfg.model.d_model} seq_len="
                      f"{cfg.model.seq_len} vocab_size={cfg.model.vocab_size}). A layout change resumes by itself, a "
                      "model change cannot: resume with the model it was saved with, or use a new --checkpoint.dir")


def _rank0_model_shapes(path: Path) -> Shapes | None:
    """Names and shapes of rank 0's model tensors: from the manifest's layout when it records one (a
    sharded run saves slices, whose shapes say nothing), else from rank 0's safetensors header
    (8-byte length, then JSON). No tensor is read."""
    try:
        layouts = json.loads((path / "MANIFEST.json").read_bytes())["body"].get("layouts")
    except (OSError, ValueError, KeyError, TypeError):
        layouts = None
    if layouts and "0" in layouts:
        return {e["key"]: tuple(e["local_shape"]) for e in layouts["0"]["params"].values()}
    try:
        with open(path / "rank0.safetensors", "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    return {k[len(_MODEL_PREFIX):]: tuple(v["shape"]) for k, v in header.items() if k.startswith(_MODEL_PREFIX)}
