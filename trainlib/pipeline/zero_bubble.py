"""The backward split of zero-bubble pipelining (Qi et al. 2023): I (input gradient) now, W later.

I must hand the stage's input gradient to the previous stage as soon as possible; W, the weight
gradients, can wait. Running W as a second backward from the stage output would walk the whole
graph again (every activation gradient recomputed). Instead, as torch.distributed.pipelining
does, the gradients that flow through the outputs of parameter-owning modules are captured while
I runs, and W runs only each module's local backward from its captured output gradient:

    I:  dL/dx = autograd.grad(y, x, dL/dy)             hooks keep dL/d(out_m) for each module m
    W:  dL/dθ_m = autograd.grad(out_m, θ_m, dL/d(out_m))      (for a Linear: one matmul)

Modules whose output is not on the path from y to x (stage 0's embeddings, whose input is token
ids) receive no gradient during I; their parameters get one backward from y in W.

Under activation checkpointing every backward call recomputes the checkpointed blocks it enters, so
one local backward per module would recompute a block once per module in it (W ran 3x slower than
a whole backward). There W is one backward from every recorded output at once, each output's
gradient pinned to the captured one by a hook (so a downstream module's gradient is not counted
twice through an upstream output): one recompute per block, at the price of walking the activation
gradients between the modules again.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.nn as nn

from trainlib.activation_checkpointing import checkpoint_mode


class SplitBackward:
    """Records the outputs of one stage's parameter-owning modules and splits its backward into I and W."""

    def __init__(self, stage: nn.Module):
        self.params = [p for p in stage.parameters() if p.requires_grad]
        self.checkpointed = any(checkpoint_mode(m) for m in stage.modules())
        self._recording: list | None = None
        for m in stage.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                m.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, _inp, out) -> None:
        if self._recording is not None and isinstance(out, torch.Tensor) and out.requires_grad:
            self._recording.append((module, out))

    @contextlib.contextmanager
    def record(self):
        """Run the stage's forward inside this; yields the list of (module, output) it produced."""
        self._recording = rec = []
        try:
            yield rec
        finally:
            self._recording = None

    @staticmethod
    def input_grad(x: torch.Tensor, y: torch.Tensor, grad_y: torch.Tensor | None,
                   records: list) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """I: the input gradient (None if x needs none); captures dL/d(out) of every recorded module."""
        captured: dict[int, torch.Tensor] = {}

        def keep(i):
            def hook(g):
                captured[i] = g
            return hook

        handles = [out.register_hook(keep(i)) for i, (_m, out) in enumerate(records)]
        try:
            gx = torch.autograd.grad(y, x, grad_y, retain_graph=True)[0] if x.requires_grad else None
        finally:
            for h in handles:
                h.remove()
        return gx, captured

    def weight_grad(self, y: torch.Tensor, grad_y: torch.Tensor | None, records: list,
                    captured: dict[int, torch.Tensor]) -> None:
        """W: accumulate every parameter's gradient into .grad."""
        by_module: dict[nn.Module, list[int]] = defaultdict(list)
        for i, (m, _out) in enumerate(records):
            by_module[m].append(i)
        local: set[int] = set()
        joint: list[tuple[int, list[torch.Tensor]]] = []
        for m, idx in by_module.items():
            if not all(i in captured for i in idx):
                continue  # some call of m was off the input path: its parameters go to the fallback
            ps = [p for p in m.parameters(recurse=False) if p.requires_grad]
            local.update(id(p) for p in ps)
            if self.checkpointed:
                joint += [(i, ps) for i in idx]
                continue
            for i in idx:
                _accumulate_all(ps, torch.autograd.grad(records[i][1], ps, captured[i], retain_graph=True,
                                                         allow_unused=True))
        if joint:
            self._joint_weight_grad(records, captured, joint)
        rest = [p for p in self.params if id(p) not in local]
        if rest:
            torch.autograd.backward(y, grad_y, inputs=rest)


    @staticmethod
    def _joint_weight_grad(records: list, captured: dict[int, torch.Tensor],
                           joint: list[tuple[int, list[torch.Tensor]]]) -> None:
        """One backward from every recorded output; each output's gradient is replaced by the captured one."""
        def pin(i):
            return lambda _g: captured[i]

        handles = [records[i][1].register_hook(pin(i)) for i, _ps in joint]
        params = list({id(p): p for _i, ps in joint for p in ps}.values())
        try:
            grads = torch.autograd.grad([records[i][1] for i, _ in joint], params, [captured[i] for i, _ in joint],
                                        retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        _accumulate_all(params, grads)


def _accumulate_all(params: list[torch.Tensor], grads) -> None:
    for p, g in zip(params, grads):
        if g is not None:
            _accumulate(p, g)


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = g.detach().clone()
    else:
        p.grad.add_(g)  # in place: p.grad may be a view into a data-parallel bucket
