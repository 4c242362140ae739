"""`tl.MixedPrecision`: the precision policy of a DataParallel model, and fp16's dynamic loss scaling.

    mp = tl.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = tl.DataParallel(model, mesh, shard="optimizer", mixed_precision=mp)
    opt = tl.DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4), model)

param_dtype   what the module's parameters are stored and computed in (forward and backward)
reduce_dtype  what gradients are reduced in across dp (the bucket and wire dtype)
loss_scale    None, a fixed float, or "dynamic" (the default for fp16: bf16 has fp32's exponent
              range and needs none). The optimizer keeps fp32 master weights for its slices either way.

Dynamic scaling is torch.amp.GradScaler's rule: multiply the loss by S; a step whose unscaled
gradients hold an inf/nan is skipped and S halves; after `growth_interval` clean steps S doubles.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class MixedPrecision:
    param_dtype: torch.dtype = torch.bfloat16
    reduce_dtype: torch.dtype = torch.float32
    loss_scale: float | str | None = "auto"   # "auto": dynamic for fp16, none otherwise
    init_scale: float = 2.0 ** 16
    growth_interval: int = 2000

    def __post_init__(self):
        for field, value in (("param_dtype", self.param_dtype), ("reduce_dtype", self.reduce_dtype)):
            if value not in FLOAT_DTYPES:
                raise ValueError(f"MixedPrecision({field}={value}): use one of torch.float32, torch.bfloat16, "
                                 "torch.float16")
        ls = self.loss_scale
        if not (ls is None or ls in ("auto", "dynamic") or (isinstance(ls, (int, float)) and ls > 0)):
            raise ValueError(f"MixedPrecision(loss_scale={ls!r}): use None, 'dynamic', 'auto' or a positive number")
        if self.growth_interval < 1 or self.init_scale <= 0:
            raise ValueError(f"MixedPrecision(init_scale={self.init_scale}, growth_interval={self.growth_interval}): "
                             "both must be positive")

    @property
    def dynamic(self) -> bool:
        return self.loss_scale == "dynamic" or (self.loss_scale == "auto" and self.param_dtype == torch.float16)

    @property
    def fixed_scale(self) -> float | None:
        return float(self.loss_scale) if isinstance(self.loss_scale, (int, float)) else None

    @classmethod
    def named(cls, precision: str) -> "MixedPrecision | None":
        """The policy behind `--train.precision`: fp32 (none), bf16, fp16 (dynamic loss scaling)."""
        if precision == "fp32":
            return None
        if precision == "bf16":
            return cls(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "fp16":
            return cls(param_dtype=torch.float16, reduce_dtype=torch.float32)
        raise ValueError(f"precision={precision!r} is not one of fp32, bf16, fp16")


class LossScaler:
    """The current loss scale and its update rule (see the module docstring)."""

    def __init__(self, policy: MixedPrecision | None):
        self.dynamic = policy is not None and policy.dynamic
        fixed = policy.fixed_scale if policy is not None else None
        self.scale = policy.init_scale if self.dynamic else (fixed or 1.0)
        self.growth_interval = policy.growth_interval if policy is not None else 0
        self.good_steps = 0
        self.skipped = 0

    @property
    def active(self) -> bool:
        return self.scale != 1.0 or self.dynamic

    def update(self, found_inf: bool) -> None:
        if not self.dynamic:
            return
        if found_inf:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps, self.skipped = float(state["scale"]), int(state["good_steps"]), \
            int(state["skipped"])
