"""The pure-torch reference: the oracle the compiled and Triton kernels are tested against.

Obviously correct rather than fast: one torch op chain per tensor. Every value is computed as
    y = cast_out(float32(x) * float32(scale))
(float64 when either side is float64), which is what torch itself does for `x.float() * s`.
Works on any device torch does (CPU, CUDA, XLA); the dispatcher uses it wherever no fused
kernel is available.
"""
from __future__ import annotations

from typing import Sequence

import torch


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _scaled(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (x.to(compute_dtype(x.dtype, dtype)) * scale).to(dtype)


def pack(tensors: Sequence[torch.Tensor], out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """out[off_i : off_i + n_i] = cast(t_i.flatten() * scale), tensors back to back."""
    off = 0
    for t in tensors:
        n = t.numel()
        out[off: off + n].copy_(_scaled(t.reshape(-1), scale, out.dtype))
        off += n
    return out


def unpack(flat: torch.Tensor, outs: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    """outs[i] = cast(flat[off_i : off_i + n_i] * scale), viewed as outs[i]: the inverse of pack."""
    off = 0
    for o in outs:
        n = o.numel()
        o.copy_(_scaled(flat[off: off + n], scale, o.dtype).reshape(o.shape))
        off += n


def scale_cast(src: torch.Tensor, dst: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """dst = cast(src * scale); dst may be src (in-place scale)."""
    dst.copy_(_scaled(src, scale, dst.dtype).reshape(dst.shape))
    return dst


def epilogue(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(any element inf/nan, sum(x.float()**2)) — the inputs of gradient clipping and AMP's skip test."""
    x = flat.float()
    return ~torch.isfinite(flat).all(), (x * x).sum()


def unscale_epilogue(src: torch.Tensor, dst: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """dst = cast(src * scale), then epilogue(dst): the mixed-precision step's unscale of the reduced
    gradients (scale = 1/loss_scale) into the master gradients, with the skip test and the norm of
    what the optimizer will see (inf/nan after the cast count, e.g. an fp16 overflow)."""
    scale_cast(src, dst, scale)
    return epilogue(dst)
