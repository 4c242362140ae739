"""`Pipeline`: run a schedule's actions on this rank's stages, exchanging activations point to point.

    pipe = Pipeline(layers, mesh, schedule="1f1b", microbatches=8, loss_fn=loss_fn)
    loss = pipe.step(inputs, targets)      # forward + backward of one batch; grads accumulated

The batch is cut into m equal microbatches along dim 0. The last stage computes
loss_fn(output, target) per microbatch and back-propagates loss/m, so the gradients (and the
returned mean loss) equal those of the full-batch mean loss. Every rank returns the loss.

Point to point: on the first microbatch of each step, a stage sends a small header (dtype, shape)
before the activation, so users never declare shapes; later microbatches must match it (else a
clear error). Gradients travel back with the shape of the activation they belong to. Sends are
asynchronous (waited at the end of the step); receives block with a timeout, and a timeout
raises PipelineTimeout naming the stage, microbatch and action, with the schedule table marked.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .. import comm
from ..comm import CollectiveTimeout
from .partition import balance, check_boundaries, layer_costs
from .schedules import Action, Schedule, build_schedule
from .zero_bubble import SplitBackward

log = logging.getLogger("trainlib")

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
           torch.uint8, torch.int8, torch.int16]
_HEADER = 10  # dtype code, ndim, up to 8 dims
_KIND_TAG = {"hdr": 0, "act": 1, "grad": 2}
PREFETCH = 2  # receives are posted this many actions ahead


class PipelineTimeout(CollectiveTimeout):
    """A pipeline wait failed or timed out; names rank, stage, microbatch and action."""


class PipelineError(ValueError):
    """Bad input to the pipeline (batch size, shapes between stages); the message has the fix."""


def _tag(kind: str, stage: int, mb: int) -> int:
    return (_KIND_TAG[kind] << 28) | (stage << 18) | mb


class Pipeline:
    """Pipeline-parallel execution of `layers` over mesh axis "pp" (see module docstring).

    layers: the full model as a list of modules, identical on every pp rank; this rank keeps its
    stages' layers. boundaries: layer indices cutting the p*v stages (default: balanced by
    parameter count). schedule: gpipe | 1f1b | interleaved | zb-h1. timeout_s: per wait (default:
    tl.init's). broadcast_loss: return the loss on every rank (one small broadcast per step)."""

    def __init__(self, layers: Sequence[nn.Module], mesh, schedule: str = "1f1b", microbatches: int = 8,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, *,
                 boundaries: Sequence[int] | None = None, virtual_stages: int | None = None,
                 timeout_s: float | None = None, broadcast_loss: bool = True):
        if loss_fn is None:
            raise PipelineError("Pipeline needs loss_fn(output, target) -> scalar mean loss (the last stage calls it)")
        self.mesh = mesh
        self.p = mesh.size("pp") if mesh is not None else 1
        self.rank = mesh.rank("pp") if mesh is not None else 0
        self.peers = mesh.group_ranks("pp") if mesh is not None else [0]  # global rank of each pp index
        self.schedule: Schedule = build_schedule(schedule, self.p, microbatches, virtual_stages)
        self.m, self.v = microbatches, self.schedule.v
        self.n_stages = self.p * self.v
        bounds = (check_boundaries(boundaries, len(layers), self.n_stages) if boundaries is not None
                  else balance(layer_costs(layers), self.n_stages))
        self.boundaries = bounds
        self.stages: dict[int, nn.Module] = {
            s: nn.Sequential(*layers[bounds[s]:bounds[s + 1]]) for s in range(self.rank, self.n_stages, self.p)}
        self.loss_fn = loss_fn
        uses_split = any(a.kind == "W" for acts in self.schedule.actions for a in acts)
        self._splitter = {s: SplitBackward(mod) for s, mod in self.stages.items()} if uses_split else {}
        self.timeout_s = timeout_s
        self.broadcast_loss = broadcast_loss
        self.last_stage = self.n_stages - 1
        self.peak_inflight: dict[int, int] = {s: 0 for s in self.stages}
        self.action_times: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=4096))  # recent only
        self._meta: dict[int, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._mailbox: dict[int, torch.Tensor] = {}

    # ---- public ---------------------------------------------------------------------------
    def parameters(self):
        for s in sorted(self.stages):
            yield from self.stages[s].parameters()

    def named_parameters(self):
        for s in sorted(self.stages):
            for n, p in self.stages[s].named_parameters():
                yield f"stage{s}.{n}", p

    def holds_stage(self, stage: int) -> bool:
        return stage in self.stages

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor:
        """Forward and backward of one batch; returns the mean microbatch loss on every rank
        (with broadcast_loss=False: on the last stage's rank only, zero elsewhere, one collective less)."""
        needs_in, needs_tgt = 0 in self.stages, self.last_stage in self.stages
        mb_in = self._split(inputs, "inputs") if needs_in else None
        mb_tgt = self._split(targets, "targets") if needs_tgt else None
        st = self._st = _StepState()
        acts = self.schedule.actions[self.rank]
        for k, a in enumerate(acts):
            t0 = time.perf_counter()
            try:
                for nxt in acts[k:k + PREFETCH]:
                    self._prefetch(nxt, st)
                getattr(self, f"_run_{a.kind}")(a, st, mb_in, mb_tgt)
            except CollectiveTimeout as e:
                raise self._timeout(a, k, str(e)) from e
            self.action_times[a.kind].append(time.perf_counter() - t0)
        for a, h in st.sends:
            try:
                h.wait(self.timeout_s)
            except CollectiveTimeout as e:
                raise self._timeout(a, None, f"send not delivered: {e}") from e
        loss = torch.stack(st.losses).mean() if needs_tgt else torch.zeros(())
        if self.p > 1 and self.broadcast_loss:
            loss = loss.detach().clone().float()
            comm.broadcast(loss, src=self.peers[self.schedule.rank_of(self.last_stage)], group=self.mesh.group("pp"))
        return loss

    # ---- actions ----------------------------------------------------------------------------
    def _run_F(self, a: Action, st: "_StepState", mb_in, mb_tgt) -> None:
        s, i = a.stage, a.mb
        x = mb_in[i] if s == 0 else self._recv_activation(a, st)
        if s > 0 and x.is_floating_point():
            x.requires_grad_(True)
        if s in self._splitter:
            with self._splitter[s].record() as rec:
                y = self.stages[s](x)
            st.records[(s, i)] = rec
        else:
            y = self.stages[s](x)
        if s == self.last_stage:
            loss = self.loss_fn(y, mb_tgt[i])
            if loss.dim() != 0:
                raise PipelineError(f"loss_fn returned shape {list(loss.shape)}; it must return a scalar mean loss")
            st.losses.append(loss.detach())
            y = loss / self.m  # d(mean over microbatches)/d(loss_i) = 1/m
        else:
            self._send_activation(a, y, st)
        st.saved[(s, i)] = (x, y)
        st.inflight[s] += 1
        self.peak_inflight[s] = max(self.peak_inflight[s], st.inflight[s])

    def _grad_out(self, a: Action, y: torch.Tensor) -> torch.Tensor | None:
        if a.stage == self.last_stage:
            return None
        return self._take(a, ("grad", a.stage, a.mb), f"gradient from stage {a.stage + 1}")

    def _run_B(self, a: Action, st, mb_in, mb_tgt) -> None:
        x, y = st.saved.pop((a.stage, a.mb))
        torch.autograd.backward(y, self._grad_out(a, y))
        self._send_grad(a, x, x.grad if a.stage > 0 and x.requires_grad else None, st)
        st.inflight[a.stage] -= 1

    def _run_I(self, a: Action, st, mb_in, mb_tgt) -> None:
        """Input gradient only, sent at once; module-output gradients are kept for W (zero_bubble.py)."""
        key = (a.stage, a.mb)
        x, y = st.saved[key]
        g = self._grad_out(a, y)
        gx, captured = SplitBackward.input_grad(x, y, g, st.records[key])
        st.grad_out[key] = (g, captured)
        self._send_grad(a, x, gx, st)

    def _run_W(self, a: Action, st, mb_in, mb_tgt) -> None:
        """Weight gradients from the gradients I captured: each module's local backward only."""
        key = (a.stage, a.mb)
        x, y = st.saved.pop(key)
        g, captured = st.grad_out.pop(key)
        self._splitter[a.stage].weight_grad(y, g, st.records.pop(key), captured)
        st.inflight[a.stage] -= 1

    # ---- point to point -----------------------------------------------------------------------
    def _peer(self, stage: int) -> int:
        return self.peers[self.schedule.rank_of(stage)]

    def _isend(self, t: torch.Tensor, dst: int, tag: int):
        if dst == self.peers[self.rank]:  # next virtual stage on this same rank (pp=1, interleaved)
            self._mailbox[tag] = t.clone()
            return _Done()
        return comm.isend(t, dst, tag=tag)

    def _irecv(self, t: torch.Tensor, src: int, tag: int):
        if src == self.peers[self.rank]:  # the local "send" may not have run yet (prefetch): copy on wait
            return _Done(lambda: t.copy_(self._mailbox.pop(tag)))
        return comm.irecv(t, src, tag=tag)

    def _wait(self, h: comm.Handle, a: Action, what: str) -> None:
        try:
            h.wait(self.timeout_s)
        except CollectiveTimeout as e:
            raise CollectiveTimeout(f"waiting for {what}: {e}") from e

    def _send_activation(self, a: Action, y: torch.Tensor, st) -> None:
        y = y.detach().contiguous()
        meta = (y.dtype, tuple(y.shape))
        dst = self._peer(a.stage + 1)
        if a.mb == 0:
            if y.dtype not in _DTYPES or y.dim() > _HEADER - 2:
                raise PipelineError(f"stage {a.stage} output {y.dtype} with {y.dim()} dims cannot be sent; "
                                    f"use one of {_DTYPES} with at most {_HEADER - 2} dims")
            self._meta[a.stage] = meta
            hdr = torch.zeros(_HEADER, dtype=torch.int64)
            hdr[0], hdr[1] = _DTYPES.index(y.dtype), y.dim()
            hdr[2:2 + y.dim()] = torch.tensor(y.shape, dtype=torch.int64)
            st.sends.append((a, self._isend(hdr, dst, tag=_tag("hdr", a.stage, 0))))
            st.keep.append(hdr)
        elif self._meta.get(a.stage) != meta:
            want = self._meta.get(a.stage)
            raise PipelineError(f"stage {a.stage} microbatch {a.mb} (action {a}): output is {meta[0]} {list(meta[1])} but "
                                f"microbatch 0 sent {want[0]} {list(want[1])}; every microbatch must produce the same "
                                "shape and dtype (split the batch evenly, keep dtypes fixed)")
        st.sends.append((a, self._isend(y, dst, tag=_tag("act", a.stage, a.mb))))
        st.keep.append(y)  # the buffer must outlive the asynchronous send

    def _recv_activation(self, a: Action, st) -> torch.Tensor:
        if a.mb == 0:
            hdr = self._take(a, ("hdr", a.stage - 1, 0), f"header from stage {a.stage - 1}", st)
            ndim = int(hdr[1])
            self._meta[-a.stage - 1] = (_DTYPES[int(hdr[0])], tuple(int(d) for d in hdr[2:2 + ndim]))
            st.headers.add(a.stage)
        return self._take(a, ("act", a.stage - 1, a.mb), f"activation from stage {a.stage - 1}", st)

    def _recv_spec(self, kind: str, stage: int, mb: int, st) -> tuple[int, torch.Tensor] | None:
        """(source rank, empty buffer) for an incoming message, or None while its shape is unknown."""
        if kind == "hdr":
            return self._peer(stage), torch.empty(_HEADER, dtype=torch.int64)
        if kind == "act":
            if stage + 1 not in st.headers:  # this step's header not in yet: the shape may have changed
                return None
            dtype, shape = self._meta[-stage - 2]
            return self._peer(stage), torch.empty(shape, dtype=dtype)
        saved = st.saved.get((stage, mb))
        if saved is None:
            return None
        y = saved[1]
        return self._peer(stage + 1), torch.empty(y.shape, dtype=y.dtype)

    def _post(self, key: tuple[str, int, int], st) -> bool:
        if key in st.posted:
            return True
        spec = self._recv_spec(*key, st)
        if spec is None:
            return False
        src, buf = spec
        st.posted[key] = (buf, self._irecv(buf, src, tag=_tag(*key)))
        return True

    def _prefetch(self, a: Action, st) -> None:
        """Post the receive an upcoming action needs, so the bytes land while this rank computes."""
        if a.kind == "F" and a.stage > 0:
            self._post(("hdr", a.stage - 1, 0) if a.mb == 0 and a.stage not in st.headers
                       else ("act", a.stage - 1, a.mb), st)
        elif a.kind in ("B", "I") and a.stage < self.last_stage:
            self._post(("grad", a.stage, a.mb), st)

    def _take(self, a: Action, key: tuple[str, int, int], what: str, st=None) -> torch.Tensor:
        st = st if st is not None else self._st
        if not self._post(key, st):
            raise AssertionError(f"cannot size the receive {key} for {a}")  # internal: schedule order broken
        buf, h = st.posted.pop(key)
        self._wait(h, a, what)
        return buf

    def _send_grad(self, a: Action, x: torch.Tensor, gx: torch.Tensor | None, st) -> None:
        if a.stage == 0:
            return
        if gx is None:  # the stage did not use its input: the gradient is zero
            gx = torch.zeros_like(x)
        gx = gx.contiguous()
        st.sends.append((a, self._isend(gx, self._peer(a.stage - 1), tag=_tag("grad", a.stage - 1, a.mb))))
        st.keep.append(gx)

    # ---- helpers ---------------------------------------------------------------------------------
    def _split(self, t: torch.Tensor | None, what: str) -> list[torch.Tensor]:
        if t is None:
            raise PipelineError(f"pp rank {self.rank} runs stage {'0' if what == 'inputs' else self.last_stage} and "
                                f"needs {what}; pass them on every rank (other ranks may pass None)")
        if t.shape[0] % self.m:
            raise PipelineError(f"{what} batch {t.shape[0]} is not divisible by microbatches={self.m}; "
                                f"use a batch size that is a multiple of {self.m}")
        return list(t.chunk(self.m, dim=0))

    def _timeout(self, a: Action, index: int | None, detail: str) -> PipelineTimeout:
        table = self.schedule.table(mark=(self.rank, index) if index is not None else None)
        return PipelineTimeout(f"pipeline rank {self.rank} (global {self.peers[self.rank]}), stage {a.stage}, microbatch "
                               f"{a.mb}, action {a} ({self.schedule.name}): {detail}\n{table}")

    def stats(self) -> dict:
        """Peak in-flight activations per stage and median seconds per action kind."""
        med = {k: sorted(v)[len(v) // 2] for k, v in self.action_times.items() if v}
        return {"peak_inflight": dict(self.peak_inflight), "median_action_s": med}


class _Done:
    """A handle for a message between two virtual stages of this rank (no communication)."""

    def __init__(self, on_wait=None):
        self._on_wait = on_wait

    def wait(self, timeout_s: float | None = None) -> None:
        if self._on_wait is not None:
            self._on_wait()
            self._on_wait = None


class _StepState:
    def __init__(self):
        self.saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.grad_out: dict[tuple[int, int], tuple] = {}
        self.records: dict[tuple[int, int], list] = {}
        self.sends: list[tuple[Action, comm.Handle]] = []
        self.keep: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.posted: dict[tuple[str, int, int], tuple[torch.Tensor, object]] = {}
        self.headers: set[int] = set()
        self.inflight: dict[int, int] = defaultdict(int)
