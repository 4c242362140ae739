"""Checkpoints: atomic, checksummed, sharded per rank, resumable bit for bit.

    ck = tl.checkpoint.load(D)                        # None on a fresh start; verifies sha256, falls back
    if ck is not None:
        model.load_state_dict(ck.state["model"]); opt.load_state_dict(ck.state["optimizer"]); step = ck.step
    ...
    tl.checkpoint.save(D, step, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "sampler": sampler.state_dict()}, keep=3)

Every rank calls both (they are collective); each writes and reads its own shard, so tensor and
pipeline parallel shards need nothing special. RNG states (torch CPU/CUDA, random, numpy) are
saved and restored per rank. See store.py for the on-disk layout and the crash-consistency recipe.
This example resumes under the layout it saved with; the trainer goes through resume.py, which
also saves sharded (ZeRO) models' slices and loads a checkpoint under another layout (reshard.py).
"""
from __future__ import annotations

from . import hooks, rng
from .store import Checkpoint, CheckpointError, latest_step, list_steps, load, save, step_dir
from .tree import StateError, flatten, unflatten

__all__ = ["save", "load", "Checkpoint", "CheckpointError", "StateError", "latest_step", "list_steps", "step_dir",
           "flatten", "unflatten", "rng", "hooks"]
