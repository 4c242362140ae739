"""The gradient-sync protocol that puts all-reduce and the parameter server behind one switch.

`tl.DataParallel` owns the buckets and the autograd hooks; a sync backend only moves bytes:

    bind(buckets, group)   once, after the buckets are laid out (same order on every rank)
    start(bucket)          as soon as a bucket's gradients are all written and packed into
                           bucket.comm (a flat tensor, already scaled by 1/dp); may return at once
    wait()                 at the end of backward: when it returns, every started bucket.comm holds
                           the SUM over the dp group of what the ranks started (= the dp average)
    on_forward(module)     called at the start of every DataParallel.forward; the async parameter
                           server pushes parameter deltas and pulls fresh weights here
    close()                release sockets, threads, servers

A backend with `reduces_in_backward = False` (async PS) leaves gradients local: the wrapper
then skips packing and start()/wait() and the backend works in on_forward instead.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch.nn as nn

    from ..data_parallel.buckets import Bucket


@runtime_checkable
class GradSync(Protocol):
    reduces_in_backward: bool

    def bind(self, buckets: "list[Bucket]", group) -> None: ...

    def start(self, bucket: "Bucket") -> None: ...

    def wait(self) -> None: ...

    def on_forward(self, module: "nn.Module") -> None: ...

    def close(self) -> None: ...
