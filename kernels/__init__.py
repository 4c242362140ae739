"""Fused gradient-bucket kernels: pack, unpack, scale_cast, epilogue — dispatched by device.

    pack(tensors, out, scale)    out[off_i : off_i + n_i] = cast(t_i.flatten() * scale), one pass
    unpack(flat, outs, scale)    outs[i] = cast(flat[off_i : off_i + n_i] * scale), the inverse
    scale_cast(src, dst, scale)  dst = cast(src * scale); dst may be src (in-place scale)
    epilogue(flat)               (any inf/nan, sum(x.float()**2)) in one pass: the inputs of AMP's
                                 step skipping and of clip_grad_norm_ (||g||_2 = sqrt(sq_norm))

Values are `cast_out(float32(x) * float32(scale))` (float64 if either side is), bit-identical to
`(x.float() * scale).to(dtype)`. Backends, chosen per call (`backend_for`):
    CUDA tensors -> "triton" (triton_kernels.py), "reference" if triton is not installed
    CPU tensors  -> "cpu"    (cpu.py, compiled on first use), "reference" if it cannot be built
    other (XLA)  -> "reference" (reference.py, pure torch)
`TRAINLIB_KERNELS=reference|cpu|triton` forces one (triton on CPU tensors needs TRITON_INTERPRET=1).
Only float32/float16/bfloat16 have fused kernels; other floating dtypes take the reference.

Non-contiguous tensors are handled (a contiguous copy in, or a temporary out, for those tensors
only). A tensor may alias the flat buffer only at exactly its own slot (the in-place case of
gradients that are views of their bucket); any other overlap is a ValueError.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from . import cpu, reference

log = logging.getLogger("trainlib")

BACKENDS = ("reference", "cpu", "triton")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["pack", "unpack", "scale_cast", "epilogue", "backend_for", "BACKENDS"]


def _triton():
    """The Triton module, or None if triton is not importable."""
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def backend_for(t: torch.Tensor) -> str:
    """Which implementation a call on tensors like `t` uses: "reference", "cpu" or "triton"."""
    forced = os.environ.get("TRAINLIB_KERNELS", "").strip().lower()
    dev = t.device.type
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"TRAINLIB_KERNELS={forced!r} is not one of {BACKENDS}; unset it to choose by device")
        if forced == "cpu" and dev != "cpu":
            raise ValueError(f"TRAINLIB_KERNELS=cpu but the tensors are on {t.device}; the CPU kernels take CPU "
                             f"tensors only (unset TRAINLIB_KERNELS, or use 'reference')")
        if forced == "triton":
            tk = _triton()
            if tk is None:
                raise ValueError("TRAINLIB_KERNELS=triton but triton is not installed; pip install triton")
            if dev != "cuda" and not tk.INTERPRET:
                raise ValueError(f"TRAINLIB_KERNELS=triton with tensors on {t.device} needs TRITON_INTERPRET=1 "
                                 f"set before trainlib.kernels.triton_kernels is imported")
            return "triton"
        if forced == "cpu":
            return "cpu" if cpu.available() else "reference"  # a failed build has logged its warning
        return forced
    if dev == "cuda":
        return "triton" if _triton() is not None else "reference"
    if dev == "cpu":
        return "cpu" if cpu.available() else "reference"
    return "reference"


def _impl(backend: str, dtypes: set[torch.dtype]):
    if backend == "reference" or not dtypes <= set(FUSED_DTYPES):
        return reference
    return cpu if backend == "cpu" else _triton()


def _check_flat(name: str, flat: torch.Tensor) -> None:
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"{name}: the flat buffer must be 1-D and contiguous, got shape {tuple(flat.shape)} "
                         f"stride {flat.stride()}; pass buf.view(-1) of a contiguous buffer")
    if not flat.is_floating_point():
        raise ValueError(f"{name}: the flat buffer has dtype {flat.dtype}; use a floating dtype")


def _check_tensors(name: str, tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> int:
    """Validate devices, dtypes and aliasing; return the total element count."""
    total = 0
    fb, fe, fsize = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size(), flat.element_size()
    for i, t in enumerate(tensors):
        if t.device != flat.device:
            raise ValueError(f"{name}: tensor {i} is on {t.device} but the flat buffer is on {flat.device}; "
                             f"move them to one device")
        if not t.is_floating_point():
            raise ValueError(f"{name}: tensor {i} has dtype {t.dtype}; only floating dtypes are supported")
        n = t.numel()
        tb = t.data_ptr()
        if n and tb < fe and tb + n * t.element_size() > fb:
            # overlapping the flat buffer is fine only at exactly this tensor's own slot
            if not (tb == fb + total * fsize and t.dtype == flat.dtype and t.is_contiguous()):
                raise ValueError(f"{name}: tensor {i} overlaps the flat buffer outside its own slot "
                                 f"(elements {total}..{total + n}); use separate memory")
        total += n
    return total


def _size_error(name: str, what: str, flat: torch.Tensor, total: int, tensors: Sequence[torch.Tensor]) -> ValueError:
    sizes = [t.numel() for t in tensors[:8]]
    more = ", ..." if len(tensors) > 8 else ""
    return ValueError(f"{name}: {what} has {flat.numel()} elements but the {len(tensors)} tensors hold {total} "
                      f"(numels {sizes}{more}); allocate it with torch.empty({total}, dtype=..., device=...)")


def pack(tensors: Sequence[torch.Tensor], out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """out[off_i : off_i + n_i] = cast(t_i.flatten() * scale), in one pass; returns out."""
    tensors = list(tensors)
    _check_flat("pack", out)
    total = _check_tensors("pack", tensors, out)
    if total != out.numel():
        raise _size_error("pack", "out", out, total, tensors)
    impl = _impl(backend_for(out), {out.dtype, *(t.dtype for t in tensors)})
    if impl is not reference:
        tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    impl.pack(tensors, out, float(scale))
    return out


def unpack(flat: torch.Tensor, outs: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    """outs[i].copy_(cast(flat[off_i : off_i + n_i] * scale).view_as(outs[i])), in one pass."""
    outs = list(outs)
    _check_flat("unpack", flat)
    total = _check_tensors("unpack", outs, flat)
    if total != flat.numel():
        raise _size_error("unpack", "flat", flat, total, outs)
    impl = _impl(backend_for(flat), {flat.dtype, *(o.dtype for o in outs)})
    if impl is reference:
        impl.unpack(flat, outs, float(scale))
        return
    # a non-contiguous output gets a contiguous temporary, copied into it afterwards
    targets = [o if o.is_contiguous() else torch.empty(o.shape, dtype=o.dtype, device=o.device) for o in outs]
    impl.unpack(flat, targets, float(scale))
    for o, tgt in zip(outs, targets):
        if tgt is not o:
            o.copy_(tgt)


def scale_cast(src: torch.Tensor, dst: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """dst = cast(src * scale), element by element (flat order); dst may be src. Returns dst."""
    if src.numel() != dst.numel():
        raise ValueError(f"scale_cast: src has {src.numel()} elements but dst has {dst.numel()}; they must match")
    if src.device != dst.device:
        raise ValueError(f"scale_cast: src is on {src.device} but dst on {dst.device}; move them to one device")
    if not (src.is_floating_point() and dst.is_floating_point()):
        raise ValueError(f"scale_cast: dtypes {src.dtype} -> {dst.dtype}; only floating dtypes are supported")
    same = src.data_ptr() == dst.data_ptr() and src.dtype == dst.dtype and src.stride() == dst.stride()
    sb, se = src.data_ptr(), src.data_ptr() + src.numel() * src.element_size()
    db, de = dst.data_ptr(), dst.data_ptr() + dst.numel() * dst.element_size()
    if not same and src.numel() and sb < de and se > db:
        raise ValueError("scale_cast: src and dst overlap without being the same tensor; use separate memory")
    impl = _impl(backend_for(dst), {src.dtype, dst.dtype})
    if impl is reference or not dst.is_contiguous():
        reference.scale_cast(src, dst, float(scale))
        return dst
    impl.scale_cast(src if src.is_contiguous() else src.contiguous(), dst, float(scale))
    return dst


def epilogue(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nonfinite, sq_norm) in one pass: a 0-d bool (any inf/nan) and a 0-d float32 sum(x.float()**2)."""
    if not flat.is_floating_point():
        raise ValueError(f"epilogue: dtype {flat.dtype}; only floating dtypes are supported")
    impl = _impl(backend_for(flat), {flat.dtype})
    if impl is not reference:
        flat = flat.reshape(-1) if flat.is_contiguous() else flat.contiguous().view(-1)
    return impl.epilogue(flat)
