"""Triton kernels for CUDA tensors: multi-tensor pack/unpack, scale+cast, the epilogue, and
unscale+cast fused with the epilogue.

pack/unpack launch ONE kernel per dtype group, whatever the number of tensors, in the style of
apex's multi_tensor_apply: the host cuts the tensors into chunks of CHUNK elements and writes a
table (chunk's address in its tensor, its offset in the flat buffer, its length); program `pid`
converts chunk `pid`. The table is cached by (addresses, sizes, flat address), so a training loop
that packs the same gradients every step pays for it once.

Values: y = cast(float32(x) * float32(scale)), bit-identical to the reference. Runs on CPU
tensors too when TRITON_INTERPRET=1 was set before this module was imported (how the tests check
it without a GPU).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Sequence

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
BLOCK = 1024
ITERS = 4
CHUNK = BLOCK * ITERS
FLT_MAX = 3.4028234663852886e38
TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_TABLE_CACHE_SIZE = 64
_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()


@triton.jit
def _cast(x, DT: tl.constexpr):
    # float32 -> DT, round to nearest even. bf16 is rounded by hand on the bits (c10's formula,
    # NaN -> 0x7FC0) because the interpreter truncates; on a GPU it costs a few ALU ops per element
    # in a memory-bound loop, and keeps every backend bit-identical to torch.
    if DT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def _to_f32(x):
    # bf16 -> float32 is a 16-bit shift (exact, as on the hardware); done on the bits because the
    # interpreter's conversion mishandles bf16 subnormals
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _nonfinite(v, FLT_MAX: tl.constexpr):
    # |v| <= FLT_MAX is false exactly for inf and nan
    return tl.where(tl.abs(v) <= FLT_MAX, 0, 1)


@triton.jit
def _scale_cast_kernel(src, dst, n, scale, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    for it in tl.static_range(ITERS):
        o = base + it * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        x = _to_f32(tl.load(src + o, mask=m))
        tl.store(dst + o, _cast(x * scale, dst.dtype.element_ty), mask=m)


@triton.jit
def _segments_kernel(table, n_chunks, flat, scale, TENSOR_DT: tl.constexpr, TO_FLAT: tl.constexpr,
                     BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # table: int64 [3, n_chunks] = (address of the chunk in its tensor, flat offset, length)
    pid = tl.program_id(0)
    addr = tl.load(table + pid)
    start = tl.load(table + n_chunks + pid)
    n = tl.load(table + 2 * n_chunks + pid)
    tensor = addr.to(tl.pointer_type(TENSOR_DT))
    for it in tl.static_range(ITERS):
        o = it * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        if TO_FLAT:
            x = _to_f32(tl.load(tensor + o, mask=m))
            tl.store(flat + start + o, _cast(x * scale, flat.dtype.element_ty), mask=m)
        else:
            x = _to_f32(tl.load(flat + start + o, mask=m))
            tl.store(tensor + o, _cast(x * scale, TENSOR_DT), mask=m)


@triton.jit
def _epilogue_kernel(x, n, partial_sq, partial_bad, FLT_MAX: tl.constexpr, BLOCK: tl.constexpr,
                     ITERS: tl.constexpr):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for it in tl.static_range(ITERS):
        o = base + it * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        v = _to_f32(tl.load(x + o, mask=m, other=0.0))
        acc += v * v
        bad = tl.maximum(bad, _nonfinite(v, FLT_MAX))
    tl.store(partial_sq + pid, tl.sum(acc, axis=0))
    tl.store(partial_bad + pid, tl.max(bad, axis=0))


@triton.jit
def _unscale_epilogue_kernel(src, dst, n, scale, partial_sq, partial_bad, FLT_MAX: tl.constexpr,
                             BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # dst = cast(src * scale), then the epilogue's sums on the values as stored (read back from
    # the cast in registers, not from memory): the same partials _epilogue_kernel(dst) would give
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for it in tl.static_range(ITERS):
        o = base + it * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        y = _cast(_to_f32(tl.load(src + o, mask=m, other=0.0)) * scale, dst.dtype.element_ty)
        tl.store(dst + o, y, mask=m)
        v = _to_f32(y)  # masked lanes loaded 0: they add 0 and are finite
        acc += v * v
        bad = tl.maximum(bad, _nonfinite(v, FLT_MAX))
    tl.store(partial_sq + pid, tl.sum(acc, axis=0))
    tl.store(partial_bad + pid, tl.max(bad, axis=0))


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, CHUNK),)


def _table(ptrs: list[int], numels: list[int], offsets: list[int], elem_size: int, flat: torch.Tensor) -> torch.Tensor:
    """The chunk table for one dtype group, on flat's device (cached)."""
    key = (flat.device, flat.data_ptr(), elem_size, tuple(ptrs), tuple(numels), tuple(offsets))
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    p, n, o = (torch.tensor(v, dtype=torch.int64) for v in (ptrs, numels, offsets))
    chunks = (n + CHUNK - 1) // CHUNK
    idx = torch.repeat_interleave(torch.arange(len(ptrs)), chunks)
    k = torch.arange(idx.numel()) - torch.repeat_interleave(torch.cumsum(chunks, 0) - chunks, chunks)
    table = torch.stack([p[idx] + k * CHUNK * elem_size, o[idx] + k * CHUNK,
                         torch.clamp(n[idx] - k * CHUNK, max=CHUNK)]).contiguous().to(flat.device)
    _tables[key] = table
    if len(_tables) > _TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return table


def _segments(seg, flat: torch.Tensor, scale: float, to_flat: bool) -> None:
    """seg: the dispatcher's validated Segments (contiguous tensors on flat's device)."""
    groups: dict[torch.dtype, tuple[list[int], list[int], list[int]]] = {}
    off = 0
    for ptr, n, dtype in zip(seg.ptrs, seg.numels, seg.dtypes):
        if n:
            ps, ns, offs = groups.setdefault(dtype, ([], [], []))
            ps.append(ptr)
            ns.append(n)
            offs.append(off)
        off += n
    for dtype, (ps, ns, offs) in groups.items():
        table = _table(ps, ns, offs, dtype.itemsize, flat)
        n_chunks = table.shape[1]
        _segments_kernel[(n_chunks,)](table, n_chunks, flat, float(scale), TENSOR_DT=TL_DTYPE[dtype],
                                      TO_FLAT=to_flat, BLOCK=BLOCK, ITERS=ITERS)


def pack(seg, out: torch.Tensor, scale: float) -> None:
    _segments(seg, out, scale, to_flat=True)


def unpack(flat: torch.Tensor, seg, scale: float) -> None:
    _segments(seg, flat, scale, to_flat=False)


def scale_cast(src: torch.Tensor, dst: torch.Tensor, scale: float) -> None:
    if src.numel():
        _scale_cast_kernel[_grid(src.numel())](src, dst, src.numel(), float(scale), BLOCK=BLOCK, ITERS=ITERS)


def _partials(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    grid = _grid(n)
    return (torch.empty(grid[0], dtype=torch.float32, device=device),
            torch.empty(grid[0], dtype=torch.int32, device=device))


def _finish(sq: torch.Tensor, bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # partial sums added in float64: a second tiny pass that keeps the total at fp32 rounding
    return bad.any(), sq.double().sum().float()


def _empty_result(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros((), dtype=torch.bool, device=device), torch.zeros((), device=device)


def epilogue(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    if n == 0:
        return _empty_result(flat.device)
    sq, bad = _partials(n, flat.device)
    _epilogue_kernel[_grid(n)](flat, n, sq, bad, FLT_MAX=FLT_MAX, BLOCK=BLOCK, ITERS=ITERS)
    return _finish(sq, bad)


def unscale_epilogue(src: torch.Tensor, dst: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = dst.numel()
    if n == 0:
        return _empty_result(dst.device)
    sq, bad = _partials(n, dst.device)
    _unscale_epilogue_kernel[_grid(n)](src, dst, n, float(scale), sq, bad, FLT_MAX=FLT_MAX, BLOCK=BLOCK,
                                       ITERS=ITERS)
    return _finish(sq, bad)
