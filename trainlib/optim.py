"""`tl.DistributedOptimizer`: any torch.optim optimizer, stepping only this rank's slices.

    model = tl.DataParallel(model, mesh, shard="optimizer", mixed_precision=tl.MixedPrecision())
    opt = tl.DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1), model)
    opt.scale_loss(loss).backward()      # = loss unless fp16's loss scaling is on
    opt.step(); opt.zero_grad()

The wrapped optimizer's param groups are rewritten in place: each parameter is replaced by the
part of it that lies in this rank's chunk of its bucket, an fp32 slice of the bucket's master
buffer whose `.grad` is the matching slice of the reduced gradient. Hyperparameters, per-group
settings and the optimizer's own update code are untouched, so an elementwise optimizer (SGD,
Adam, AdamW, Adagrad, RMSprop, ...) computes exactly what it computes unsharded. One that needs a
whole tensor at once (LBFGS; LAMB's per-tensor trust ratio) would see slices: not supported.

For a model that is neither sharded nor mixed-precision this is a pass-through, so a training
loop can always wrap its optimizer.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from . import comm

log = logging.getLogger("trainlib")


def _sharded_model(model):
    """The sharded DataParallel inside `model` (itself, or tl.parallelize's dp_model), or None."""
    dp = getattr(model, "dp_model", model)
    return dp if getattr(dp, "sharded", False) else None


class DistributedOptimizer:
    """See the module docstring."""

    def __init__(self, optimizer: torch.optim.Optimizer, model) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.inner = optimizer
        self.model = _sharded_model(model)
        self.slices: list[dict[str, Any]] = []   # per inner parameter: where its slice sits (checkpoint layout)
        if self.model is None:
            # the inner parameters' names, so a checkpoint's optimizer state can follow a layout change
            local = getattr(model, "module", model)
            named = {id(p): n for n, p in local.named_parameters()} if isinstance(local, torch.nn.Module) else {}
            self.names = [named.get(id(p)) for g in self.inner.param_groups for p in g["params"]]
            return
        if any(self.inner.state.values()):
            raise ValueError("DistributedOptimizer: wrap the optimizer before its first step (it already holds "
                             "state for whole parameters)")
        where = {}
        for b in self.model.buckets:
            for i, (p, name) in enumerate(zip(b.params, b.names)):
                where[id(p)] = (b, i, name)
        for group in self.inner.param_groups:
            new = []
            for p in group["params"]:
                if id(p) not in where:
                    if p.requires_grad:
                        raise ValueError(f"DistributedOptimizer: a parameter of shape {list(p.shape)} is not one of "
                                         "the wrapped model's; build the optimizer from model.parameters()")
                    continue  # frozen: no gradient, nothing to step
                b, i, name = where[id(p)]
                part = b.chunk_of(i)
                if part is None:
                    continue  # entirely in other ranks' chunks
                s, e = part[0] - b.lo, part[1] - b.lo
                t = b.master[s:e]
                t.grad = b.grad[s:e]
                new.append(t)
                self.slices.append({"name": name, "shape": list(p.shape), "start": part[0] - b.offsets[i],
                                    "end": part[1] - b.offsets[i]})
            group["params"] = new

    # ---- the torch.optim surface --------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    @property
    def defaults(self) -> dict:
        return self.inner.defaults

    @property
    def dynamic_loss_scale(self) -> bool:
        return self.model is not None and self.model.scaler.dynamic

    @property
    def loss_scale(self) -> float:
        return self.model.scaler.scale if self.model is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward() on: multiplied by the current loss scale (fp16), else itself."""
        return loss * self.loss_scale if self.loss_scale != 1.0 else loss

    def step(self, closure=None) -> bool:
        """One optimizer step on this rank's slices; returns False when fp16's dynamic loss scaling
        found an inf/nan gradient on any rank and skipped the step (the scale then halves)."""
        if closure is not None:
            raise ValueError("DistributedOptimizer.step(closure) is not supported; call backward before step()")
        m = self.model
        if m is None:
            self.inner.step()
            return True
        if not m.grads_ready:   # torch.optim skips parameters whose .grad is None; here all of them are
            log.warning("DistributedOptimizer.step(): no synced backward since zero_grad(); nothing to step")
            return False
        if m.scaler.dynamic:
            # on the gradients' device: NCCL reduces device tensors only
            found = torch.tensor([1.0 if m.sharded_grad_stats()[0] else 0.0], device=m.buckets[0].grad.device)
            comm.all_reduce(found, op="max")   # the whole world: every stage and tp rank skips together
            m.scaler.update(bool(found.item()))
            if found.item():
                log.info("fp16: inf/nan gradient, step skipped; loss scale now %g", m.scaler.scale)
                return False
        # re-attach the gradient slices (a user's zero_grad on the inner optimizer may have dropped them)
        for group in self.inner.param_groups:
            for t in group["params"]:
                if t.grad is None:
                    raise RuntimeError("DistributedOptimizer: a slice lost its gradient; call zero_grad() on the "
                                       "DistributedOptimizer, not on the optimizer it wraps")
        m.release_shards()   # stage 3 reads peers' parameter chunks directly: they must be done first
        self.inner.step()
        m.publish_params()
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.model is None:
            self.inner.zero_grad(set_to_none=set_to_none)
            return
        self.model.zero_sharded_grads()

    def state_dict(self) -> dict:
        state = {"optimizer": self.inner.state_dict()}
        if self.model is None and all(n is not None for n in self.names):
            state["names"] = self.names
        if self.model is not None:
            state["slices"] = self.slices
            if self.model.precision is not None:   # fp32 masters apart from the (bf16/fp16) parameters
                state["master"] = {n: t.detach().clone() for n, t in self.model.param_slices("master").items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" not in state and "state" in state:   # saved before the wrapper: the optimizer's own
            state = {"optimizer": state}
        if self.model is not None and state.get("slices") != self.slices:
            from .checkpoint.store import CheckpointError

            raise CheckpointError("the checkpoint's optimizer slices do not match this rank's (another dp size, "
                                  "shard stage or bucket size); resume with the layout it was saved with")
        if self.model is not None:
            self.model.release_shards()   # the masters may be the parameter chunks peers read
        self.inner.load_state_dict(state["optimizer"])   # keeps our slice tensors (and their .grad)
        if self.model is not None and self.model.precision is not None:
            with torch.no_grad():
                for name, t in self.model.param_slices("master").items():
                    t.copy_(state["master"][name])

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self.inner!r}, shard={getattr(self.model, 'shard', None)})"
