"""The trainer's side of checkpointing: what a step's state is, when to save it, how to resume.

Bit-identical resume (the run killed at any step and restarted ends with the same weights as an
uninterrupted one) needs everything a step reads: weights, optimizer moments and step counts,
the sampler's position, every RNG on every rank, and the trainer's own counters. The learning
rate is a pure function of the step, so it needs nothing.

    start, counters = resume.restore(cfg.checkpoint, model, opt, sampler, counters)
    for step in range(start, cfg.train.steps):
        ...; opt.step()
        resume.after_step(cfg.checkpoint, step + 1, cfg.train.steps, model, opt, sampler, counters)

restore() reads a checkpoint saved under another layout (dp, tp, pp or shard stage) through
reshard.py, from the layout after_step() records in the manifest.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from . import hooks
from .store import CheckpointError, load, save

__all__ = ["CheckpointError", "restore", "after_step", "state_of"]

log = logging.getLogger("trainlib")


def _module(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _sharded(model):
    """The sharded DataParallel inside `model` (itself or tl.parallelize's dp_model), or None."""
    dp = getattr(model, "dp_model", model)
    return dp if getattr(dp, "sharded", False) else None


def state_of(model: torch.nn.Module, opt: torch.optim.Optimizer, sampler, counters: dict[str, Any]) -> dict:
    """A sharded model saves this rank's slices and their layout (global shapes, element ranges)."""
    sharded = _sharded(model)
    weights = sharded.shard_state_dict() if sharded is not None else _module(model).state_dict()
    return {"model": weights, "optimizer": opt.state_dict(), "sampler": sampler.state_dict(),
            "trainer": dict(counters)}


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's whole weights (a sharded model gathers them over dp: collective)."""
    sharded = _sharded(model)
    return sharded.full_state_dict() if sharded is not None else _module(model).state_dict()


def restore(ck_cfg, model: torch.nn.Module, opt: torch.optim.Optimizer, sampler,
            counters: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Load the newest intact checkpoint under ck_cfg.dir into model/opt/sampler (and the RNGs).

    Returns (first step to run, counters); (0, counters unchanged) when there is none."""
    if not ck_cfg.dir:
        return 0, counters
    from . import reshard

    plan = reshard.needs_resharding(ck_cfg.dir, model, _world(), _rank())
    if plan is not None:  # saved under another layout: read the slices this rank's layout needs
        return reshard.restore(ck_cfg.dir, *plan, model, opt, sampler, counters)
    ck = load(ck_cfg.dir)
    if ck is None:
        log.info("no checkpoint under %s: starting at step 0", ck_cfg.dir)
        return 0, counters
    sharded = _sharded(model)
    saved_sharded = "slices" in ck.state["model"]
    if (sharded is not None) != saved_sharded:
        raise CheckpointError(f"{ck.path} was saved {'with' if saved_sharded else 'without'} dp.shard / "
                              f"train.precision and this run is {'with' if sharded is not None else 'without'}; "
                              "resume with the settings it was saved with (changing them is the resharding issue)")
    if sharded is not None:
        sharded.load_shard_state_dict(ck.state["model"])
    else:
        _module(model).load_state_dict(ck.state["model"])
    opt.load_state_dict(ck.state["optimizer"])
    sampler.load_state_dict(ck.state["sampler"])
    log.info("resumed from %s (step %d)", ck.path, ck.step)
    return ck.step, {**counters, **ck.state["trainer"], "resumed_from": ck.step}


def after_step(ck_cfg, steps_done: int, total_steps: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
               sampler, counters: dict[str, Any]) -> bool:
    """The "step" phase hooks, then a checkpoint every ck_cfg.every steps and at the end of the run.

    Returns whether this step wrote (or, async, handed off) a checkpoint."""
    rank = _rank()
    hooks.fire("step", rank=rank, step=steps_done)
    if ck_cfg.dir and (steps_done % ck_cfg.every == 0 or steps_done == total_steps):
        from .layout import layout_of

        state = state_of(model, opt, sampler, counters)
        if getattr(ck_cfg, "async_", False):
            from .async_save import writer_for

            writer = writer_for(ck_cfg.dir, ck_cfg.keep)
            # the optimizer's tensors are copied during the next forward/backward unless an async
            # parameter server changes the weights in place before the next step
            sync = getattr(getattr(model, "dp_model", model), "sync", None)
            writer.save(steps_done, state, layout=layout_of(model),
                        until=opt if getattr(sync, "reduces_in_backward", True) else None)
            if steps_done == total_steps:
                writer.close()  # the run's last checkpoint is durable before training returns
        else:
            save(ck_cfg.dir, steps_done, state, keep=ck_cfg.keep, layout=layout_of(model))
        return True
    return False
