"""Fused gradient-bucket kernels: pack, unpack, scale_cast, epilogue — dispatched by device.

    pack(tensors, out, scale)    out[off_i : off_i + n_i] = cast(t_i.flatten() * scale), one pass
    unpack(flat, outs, scale)    outs[i] = cast(flat[off_i : off_i + n_i] * scale), the inverse
    scale_cast(src, dst, scale)  dst = cast(src * scale); dst may be src (in-place scale)
    epilogue(flat)               (any inf/nan, sum(x.float()**2)) in one pass: the inputs of AMP's
                                 step skipping and of clip_grad_norm_ (||g||_2 = sqrt(sq_norm))
    unscale_epilogue(src, dst, scale)  dst = cast(src * scale), then epilogue(dst), in one pass: a
                                 reduced bf16/fp16/fp32 gradient -> the fp32 master gradient, unscaled
                                 by 1/loss_scale, with the skip test and the norm of what was written

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
from typing import NamedTuple, Sequence

import torch

from . import cpu, reference

log = logging.getLogger("trainlib")

BACKENDS = ("reference", "cpu", "triton")
FUSED_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})

__all__ = ["pack", "unpack", "scale_cast", "epilogue", "unscale_epilogue", "backend_for", "BACKENDS"]


_triton_module: object = None  # triton_kernels once imported; False if it cannot be


def _triton():
    """The Triton module, or None if triton is not importable (tried once per process)."""
    global _triton_module
    if _triton_module is None:
        try:
            from . import triton_kernels
            _triton_module = triton_kernels
        except Exception as e:  # ImportError, or a triton build that fails at import
            if not isinstance(e, ImportError):
                log.warning("trainlib.kernels: triton failed to import (%s); CUDA tensors use the reference", e)
            _triton_module = False
    return _triton_module or None


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
                                 f"in the environment before triton is first imported")
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
    if backend == "reference" or not dtypes <= FUSED_DTYPES:
        return reference
    return cpu if backend == "cpu" else _triton()


def _check_flat(name: str, flat: torch.Tensor) -> None:
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"{name}: the flat buffer must be 1-D and contiguous, got shape {tuple(flat.shape)} "
                         f"stride {flat.stride()}; pass buf.view(-1) of a contiguous buffer")
    if not flat.is_floating_point():
        raise ValueError(f"{name}: the flat buffer has dtype {flat.dtype}; use a floating dtype")


class Segments(NamedTuple):
    """The tensors of one pack/unpack call and their metadata, read once (per-tensor attribute
    reads are ~0.1 us each, and a bucket can hold thousands of tensors)."""
    tensors: list[torch.Tensor]
    ptrs: list[int]
    numels: list[int]
    dtypes: list[torch.dtype]


def _segments(name: str, tensors: Sequence[torch.Tensor], flat: torch.Tensor, what: str) -> Segments:
    """Validate devices, dtypes, sizes and aliasing against the flat buffer."""
    _check_flat(name, flat)
    tensors = list(tensors)
    dtypes = [t.dtype for t in tensors]
    if not all(d.is_floating_point for d in set(dtypes)):
        i = next(i for i, d in enumerate(dtypes) if not d.is_floating_point)
        raise ValueError(f"{name}: tensor {i} has dtype {dtypes[i]}; only floating dtypes are supported")
    if not (all(t.is_cpu for t in tensors) if flat.is_cpu else all(t.device == flat.device for t in tensors)):
        i = next(i for i, t in enumerate(tensors) if t.device != flat.device)
        raise ValueError(f"{name}: tensor {i} is on {tensors[i].device} but the flat buffer is on {flat.device}; "
                         f"move them to one device")
    numels = [t.numel() for t in tensors]
    total = sum(numels)
    if total != flat.numel():
        sizes, more = numels[:8], ", ..." if len(numels) > 8 else ""
        raise ValueError(f"{name}: {what} has {flat.numel()} elements but the {len(tensors)} tensors hold {total} "
                         f"(numels {sizes}{more}); allocate it with torch.empty({total}, dtype=..., device=...)")
    ptrs = [t.data_ptr() for t in tensors]
    if tensors:
        _check_aliasing(name, tensors, ptrs, numels, dtypes, flat)
    return Segments(tensors, ptrs, numels, dtypes)


def _check_aliasing(name: str, tensors: list[torch.Tensor], ptrs: list[int], numels: list[int],
                    dtypes: list[torch.dtype], flat: torch.Tensor) -> None:
    """A tensor may overlap the flat buffer only at exactly its own slot (in place); vectorised,
    because this runs on every call."""
    fb = flat.data_ptr()
    fe = fb + flat.numel() * flat.element_size()
    p = torch.tensor(ptrs, dtype=torch.int64)
    n = torch.tensor(numels, dtype=torch.int64)
    one_dtype = dtypes.count(dtypes[0]) == len(dtypes)
    size = dtypes[0].itemsize if one_dtype else torch.tensor([d.itemsize for d in dtypes], dtype=torch.int64)
    hit = (p < fe) & (p + n * size > fb) & (n > 0)
    if not bool(hit.any()):
        return
    offsets = torch.cumsum(n, 0) - n
    for i in hit.nonzero().flatten().tolist():
        own_slot = ptrs[i] == fb + int(offsets[i]) * flat.element_size()
        if not (own_slot and dtypes[i] == flat.dtype and tensors[i].is_contiguous()):
            o = int(offsets[i])
            raise ValueError(f"{name}: tensor {i} overlaps the flat buffer outside its own slot "
                             f"(elements {o}..{o + numels[i]}); use separate memory")


def pack(tensors: Sequence[torch.Tensor], out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """out[off_i : off_i + n_i] = cast(t_i.flatten() * scale), in one pass; returns out."""
    if len(tensors) == 1 and _pack_one_fast(tensors[0], out, scale):
        return out
    seg = _segments("pack", tensors, out, "out")
    impl = _impl(backend_for(out), {out.dtype, *seg.dtypes})
    if impl is reference:
        reference.pack(seg.tensors, out, float(scale))
        return out
    if not all(t.is_contiguous() for t in seg.tensors):  # a contiguous copy of those tensors only
        ts = [t if t.is_contiguous() else t.contiguous() for t in seg.tensors]
        seg = Segments(ts, [t.data_ptr() for t in ts], seg.numels, seg.dtypes)
    impl.pack(seg, out, float(scale))
    return out


def _pack_one_fast(t: torch.Tensor, out: torch.Tensor, scale: float) -> bool:
    """One fp32 CPU tensor into an fp32 flat buffer of its size with no partial overlap: torch's own
    vectorised multiply, bit-identical (fp32 x fp32 scale). The fused kernel's per-call set-up (checks,
    ctypes) costs ~40 us, and sharded data parallel packs each gradient alone as it arrives. Returns
    False (the caller takes the general path, with its errors) for anything else, and whenever
    TRAINLIB_KERNELS forces an implementation."""
    if os.environ.get("TRAINLIB_KERNELS"):
        return False
    if not (t.dtype == out.dtype == torch.float32 and t.is_cpu and out.is_cpu and t.numel() == out.numel()
            and t.is_contiguous() and out.dim() == 1 and out.is_contiguous()):
        return False
    a, b, n = t.data_ptr(), out.data_ptr(), 4 * t.numel()
    if a != b and a < b + n and b < a + n:
        return False
    if scale == 1.0:
        if a != b:
            out.copy_(t.view(-1))
    else:
        torch.mul(t.view(-1), scale, out=out)
    return True


def unpack(flat: torch.Tensor, outs: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    """outs[i].copy_(cast(flat[off_i : off_i + n_i] * scale).view_as(outs[i])), in one pass."""
    seg = _segments("unpack", outs, flat, "flat")
    impl = _impl(backend_for(flat), {flat.dtype, *seg.dtypes})
    if impl is reference:
        reference.unpack(flat, seg.tensors, float(scale))
        return
    if all(o.is_contiguous() for o in seg.tensors):
        impl.unpack(flat, seg, float(scale))
        return
    # a non-contiguous output gets a contiguous temporary, copied into it afterwards
    targets = [o if o.is_contiguous() else torch.empty(o.shape, dtype=o.dtype, device=o.device) for o in seg.tensors]
    impl.unpack(flat, Segments(targets, [t.data_ptr() for t in targets], seg.numels, seg.dtypes), float(scale))
    for o, tgt in zip(seg.tensors, targets):
        if tgt is not o:
            o.copy_(tgt)


def _check_pair(name: str, src: torch.Tensor, dst: torch.Tensor) -> None:
    """src -> dst element by element: same size and device, floating, and either the same memory
    read and written in the same element order (in place) or no overlap at all."""
    if src.numel() != dst.numel():
        raise ValueError(f"{name}: src has {src.numel()} elements but dst has {dst.numel()}; they must match")
    if src.device != dst.device:
        raise ValueError(f"{name}: src is on {src.device} but dst on {dst.device}; move them to one device")
    if not (src.is_floating_point() and dst.is_floating_point()):
        raise ValueError(f"{name}: dtypes {src.dtype} -> {dst.dtype}; only floating dtypes are supported")
    same = src.data_ptr() == dst.data_ptr() and src.dtype == dst.dtype and (
        src.stride() == dst.stride() or (src.is_contiguous() and dst.is_contiguous()))
    sb, se = src.data_ptr(), src.data_ptr() + src.numel() * src.element_size()
    db, de = dst.data_ptr(), dst.data_ptr() + dst.numel() * dst.element_size()
    if not same and src.numel() and sb < de and se > db:
        raise ValueError(f"{name}: src and dst overlap without being the same tensor; use separate memory")


def scale_cast(src: torch.Tensor, dst: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """dst = cast(src * scale), element by element (flat order); dst may be src. Returns dst."""
    _check_pair("scale_cast", src, dst)
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


def unscale_epilogue(src: torch.Tensor, dst: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """dst = cast(src * scale) and (nonfinite, sq_norm) of dst, in one pass; dst may be src.

    nonfinite: a 0-d bool, any inf/nan in dst (an fp16 overflow of the cast counts); sq_norm: a 0-d
    float32 sum(dst.float()**2). Equal to scale_cast(src, dst, scale) then epilogue(dst)."""
    _check_pair("unscale_epilogue", src, dst)
    impl = _impl(backend_for(dst), {src.dtype, dst.dtype})
    if impl is reference or not dst.is_contiguous():
        return reference.unscale_epilogue(src, dst, float(scale))
    src = src.reshape(-1) if src.is_contiguous() else src.contiguous().view(-1)
    return impl.unscale_epilogue(src, dst.view(-1), float(scale))
