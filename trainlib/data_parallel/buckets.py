"""Gradient buckets: parameters -> flat buffers, each `param.grad` a view into its bucket.

Buckets fill in reverse registration order (the order backward produces gradients), so the first
bucket to fill can be communicated while the rest of backward still runs. The first bucket is
small (DDP uses 1 MB too): the head of the model finishes its backward quickly, and a small bucket
gets the first collective on the wire early. One dtype (and device) per bucket.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

MB = 1024 * 1024
FIRST_BUCKET_MB = 1.0


@dataclass
class Bucket:
    index: int
    dtype: torch.dtype
    device: torch.device
    params: list[nn.Parameter]   # in fill (reverse registration) order
    names: list[str]
    offsets: list[int]           # element offset of each param in the flat buffer
    numel: int
    grads: torch.Tensor          # flat gradient buffer; param.grad are views of it
    comm: torch.Tensor           # what goes on the wire: `grads` itself, or a compressed copy
    pending: int = 0             # parameters whose gradient has not arrived this backward
    started: bool = False
    extra: dict = field(default_factory=dict)  # per-backend state (e.g. the PS partitions)
    part: int = -1               # the pipeline stage (DataParallel(parts=...)) it belongs to; -1: none/shared

    @property
    def nbytes(self) -> int:
        return self.comm.numel() * self.comm.element_size()

    def view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.grads[self.offsets[i]: self.offsets[i] + p.numel()].view_as(p)

    def attach_views(self) -> None:
        """Make every param.grad a view of this bucket (again, after zero_grad(set_to_none=True))."""
        for i, p in enumerate(self.params):
            if p.grad is None or p.grad.data_ptr() != self.view(i).data_ptr():
                p.grad = self.view(i)


def plan_buckets(named_params: list[tuple[str, nn.Parameter]], bucket_mb: float,
                 first_bucket_mb: float = FIRST_BUCKET_MB,
                 part_of: dict[int, int] | None = None) -> list[list[tuple[str, nn.Parameter]]]:
    """Group trainable parameters into buckets: reverse order, one dtype/device each, size caps.

    part_of: id(param) -> part (a pipeline stage); a bucket never spans two parts, so each stage's
    buckets can be reduced as soon as that stage's backward is done. Parts are planned last part
    first (backward order), parameters of no part (-1, e.g. tied across stages) at the end.
    Pure (no allocation); the same on every rank given the same model."""
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb={bucket_mb} must be positive (MB of gradients per bucket; default 25)")
    if part_of is not None:
        parts = sorted({part_of.get(id(p), -1) for _, p in named_params}, key=lambda k: (k < 0, -k))
        return [b for k in parts for b in plan_buckets(
            [(n, p) for n, p in named_params if part_of.get(id(p), -1) == k], bucket_mb, first_bucket_mb)]
    open_: dict[tuple, list] = {}
    sizes: dict[tuple, int] = {}
    done: list[list[tuple[str, nn.Parameter]]] = []
    for name, p in reversed(named_params):
        key = (p.dtype, p.device)
        cap = (min(first_bucket_mb, bucket_mb) if not done else bucket_mb) * MB
        cur = open_.setdefault(key, [])
        nbytes = p.numel() * p.element_size()
        if cur and sizes[key] + nbytes > cap:
            done.append(cur)
            cur = open_[key] = []
        if not cur:
            sizes[key] = 0
        cur.append((name, p))
        sizes[key] += nbytes
    done += [b for b in open_.values() if b]
    return done


def wire_bytes(named_params: list[tuple[str, nn.Parameter]], bucket_mb: float,
               comm_dtype: torch.dtype | None = None, part_of: dict[int, int] | None = None) -> tuple[int, int]:
    """(bytes, count) of the wire buffers build_buckets will ask the sync backend for."""
    total, groups = 0, plan_buckets(named_params, bucket_mb, part_of=part_of)
    for group in groups:
        dtype = comm_dtype or group[0][1].dtype
        total += sum(p.numel() for _, p in group) * torch.empty((), dtype=dtype).element_size()
    return total, len(groups)


Alloc = Callable[[int, torch.dtype, torch.device], torch.Tensor]


def _zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype, device=device)


def build_buckets(named_params: list[tuple[str, nn.Parameter]], bucket_mb: float,
                  comm_dtype: torch.dtype | None = None, alloc: Alloc | None = None,
                  part_of: dict[int, int] | None = None) -> list[Bucket]:
    """Allocate the flat buffers and point every param.grad at its view (existing grads are kept).

    alloc(numel, dtype, device): where the wire buffers come from -- the sync backend's memory (shared
    memory on its shm transports), so it never has to swap a bucket's tensors afterwards."""
    alloc = alloc or _zeros
    buckets = []
    for i, group in enumerate(plan_buckets(named_params, bucket_mb, part_of=part_of)):
        p0 = group[0][1]
        offsets, n = [], 0
        for _, p in group:
            offsets.append(n)
            n += p.numel()
        if comm_dtype in (None, p0.dtype):
            grads = comm = alloc(n, p0.dtype, p0.device)
        else:  # compressed: the full-precision gradients stay private, the wire copy is the backend's
            grads, comm = torch.zeros(n, dtype=p0.dtype, device=p0.device), alloc(n, comm_dtype, p0.device)
        b = Bucket(i, p0.dtype, p0.device, [p for _, p in group], [nm for nm, _ in group], offsets, n, grads, comm,
                   part=part_of.get(id(p0), -1) if part_of is not None else -1)
        for j, p in enumerate(b.params):
            if p.grad is not None:
                b.view(j).copy_(p.grad)
        b.attach_views()
        buckets.append(b)
    return buckets
