"""The gradient-sync protocol that puts all-reduce and the parameter server behind one switch.

`tl.DataParallel` owns the buckets and the autograd hooks; a sync backend only moves bytes:

    bind(buckets, group)   once, after the buckets are laid out (same order on every rank). A backend
                           that owns its memory (tl.AllReduce) is first asked bind_group(group, ...)
                           and then alloc(numel, dtype, device) for every wire buffer, so it never
                           swaps a bucket's tensors behind the wrapper
    start(bucket)          as soon as a bucket's gradients are all written and packed into
                           bucket.comm (a flat tensor, already scaled by 1/dp); may return at once
    wait()                 at the end of backward: when it returns, every started bucket.comm holds
                           the SUM over the dp group of what the ranks started (= the dp average)
    on_forward(module)     called at the start of every DataParallel.forward; the async parameter
                           server pushes parameter deltas and pulls fresh weights here
    close()                release sockets, threads, servers

A backend with `reduces_in_backward = False` (async PS) leaves gradients local: the wrapper
then skips packing and start()/wait() and the backend works in on_forward instead.

Sharded data parallel (ZeRO) needs more of a backend (ShardSync; tl.AllReduce has it). The wrapper
owns flat buffers of dp equal chunks, chunk r = flat.view(dp, -1)[r] belonging to dp rank r:

    bind_group(group)                  choose and set up the transport (collective over the dp group)
    alloc(numel, dtype, device)        memory for a flat buffer the backend moves without copies (shared
                                       memory on the shm transports; collective there, same order on
                                       every rank); the backend never re-points it later
    start_reduce_scatter(flat)         after wait(): chunk r = SUM over the dp group of chunk r; the
                                       other chunks unspecified
    start_all_gather(flat)             after wait(): every chunk k holds dp rank k's chunk k
    start_all_gather_into(out, chunk)  after wait(): out.view(dp, -1)[k] = dp rank k's `chunk`; out is
                                       any memory (ZeRO-3 gathers into private parameter buffers); the
                                       shm transport reads a chunk from alloc() out of the peers' memory
    wait()                             completes everything started, in start order
Both starts return at once, so they overlap backward (reduce-scatter) and forward (all-gather).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from ..data_parallel.buckets import Bucket


@runtime_checkable
class GradSync(Protocol):
    reduces_in_backward: bool
    bucket_mb: float                       # the default bucket size DataParallel lays out
    comm_dtype: "torch.dtype | None"       # what goes on the wire (None: the gradients' own dtype)

    def bind(self, buckets: "list[Bucket]", group) -> None: ...

    def start(self, bucket: "Bucket") -> None: ...

    def wait(self) -> None: ...

    def on_forward(self, module: "nn.Module") -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class ShardSync(Protocol):
    """What sharded data parallel needs of a sync backend (see the module docstring)."""

    bucket_mb: float
    comm_dtype: "torch.dtype | None"

    def bind_group(self, group) -> None: ...

    def alloc(self, numel: int, dtype: "torch.dtype", device: "torch.device | str | None" = None) -> "torch.Tensor": ...

    def start_reduce_scatter(self, flat: "torch.Tensor") -> None: ...

    def start_all_gather(self, flat: "torch.Tensor") -> None: ...

    def start_all_gather_into(self, out: "torch.Tensor", chunk: "torch.Tensor") -> None: ...

    def wait(self) -> None: ...

    def close(self) -> None: ...
