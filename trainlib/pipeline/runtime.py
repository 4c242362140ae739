"""`Pipeline`: run a schedule's actions on this rank's stages, exchanging activations point to point.

    pipe = Pipeline(layers, mesh, schedule="1f1b", microbatches=8, loss_fn=loss_fn)
    loss = pipe.step(inputs, targets)      # forward + backward of one batch; grads accumulated

The batch is cut into m equal microbatches along dim 0. The last stage computes
loss_fn(output, target) per microbatch and back-propagates loss/m, so the gradients (and the
returned mean loss) equal those of the full-batch mean loss. Every rank returns the loss.

Point to point: on the first microbatch of each step, a stage sends a small header (dtype, shape)
with the activation, so users never declare shapes; later microbatches must match it (else a
clear error). On the first step the header is a message of its own; after that both ends know
the previous step's shape, so the header and microbatch 0's activation travel as ONE message of
header + that many bytes (one message per microbatch, as torch pipelining's static shapes), and
only when the shape changed does the activation follow in a second message. Gradients travel back with the shape of the activation they belong to. Sends are
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
from ..observe import step_stats
from .partition import balance, check_boundaries, layer_costs
from .schedules import Action, Schedule, build_schedule
from .zero_bubble import SplitBackward

log = logging.getLogger("trainlib")

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
           torch.uint8, torch.int8, torch.int16]
_HEADER = 10  # dtype code, ndim, up to 8 dims
_HEADER_BYTES = _HEADER * 8
_KIND_TAG = {"hdr": 0, "act": 1, "grad": 2}
# the step breakdown's phase and the trace's range name for each action kind (observe/step_stats.py)
_PHASE = {"F": "forward", "B": "backward", "I": "backward", "W": "backward"}
_LABEL = {kind: f"trainlib.pp.{kind}" for kind in _PHASE}
PREFETCH = 4  # receives are posted this many actions ahead (4 measured faster than 1 or 2 in bench pp)


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
        self.pp_size = mesh.size("pp") if mesh is not None else 1
        self.rank = mesh.rank("pp") if mesh is not None else 0
        self.peers = mesh.group_ranks("pp") if mesh is not None else [0]  # global rank of each pp index
        self.schedule: Schedule = build_schedule(schedule, self.pp_size, microbatches, virtual_stages)
        self.microbatches, self.virtual_stages = microbatches, self.schedule.v
        self.n_stages = self.pp_size * self.virtual_stages
        bounds = (check_boundaries(boundaries, len(layers), self.n_stages) if boundaries is not None
                  else balance(layer_costs(layers), self.n_stages))
        self.boundaries = bounds
        self.stages: dict[int, nn.Module] = {
            stage: nn.Sequential(*layers[bounds[stage]:bounds[stage + 1]])
            for stage in range(self.rank, self.n_stages, self.pp_size)}
        self.loss_fn = loss_fn
        uses_split = any(action.kind == "W" for actions in self.schedule.actions for action in actions)
        self._splitter = {stage: SplitBackward(module) for stage, module in self.stages.items()} if uses_split else {}
        self.timeout_s = timeout_s
        self.broadcast_loss = broadcast_loss
        self.last_stage = self.n_stages - 1
        self.peak_inflight: dict[int, int] = {stage: 0 for stage in self.stages}
        self.action_times: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=4096))  # recent only
        # (dtype, shape) of a stage's output on microbatch 0, keyed by the stage that produced it:
        # what this rank sent (later microbatches must match), and what a header announced to it.
        self._sent_meta: dict[int, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._received_meta: dict[int, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._mailbox: dict[int, torch.Tensor] = {}
        # action kind -> what runs it (see schedules.py for the kinds); bound here so a subclass's
        # override of a handler is the one that runs
        self._handlers: dict[str, Callable[[Action, _StepState, list | None, list | None], None]] = {
            "F": self._forward, "B": self._backward, "I": self._input_grad, "W": self._weight_grad}
        # static per schedule, so the hot loop does no key building: the receive each action needs
        # (prefetched PREFETCH actions ahead), and the stage whose last backward of the step it is
        actions = self.schedule.actions[self.rank]
        self._recv_keys = [self._recv_key(a) for a in actions]
        last_bwd = {a.stage: i for i, a in enumerate(actions) if a.kind in ("B", "W")}
        self._stage_done_at = {i: stage for stage, i in last_bwd.items()}
        self._peer_of = {s: self.peers[self.schedule.rank_of(s)] for s in range(self.n_stages)}

    # ---- public ---------------------------------------------------------------------------
    def parameters(self):
        for stage in sorted(self.stages):
            yield from self.stages[stage].parameters()

    def named_parameters(self):
        for stage in sorted(self.stages):
            for name, param in self.stages[stage].named_parameters():
                yield f"stage{stage}.{name}", param

    def holds_stage(self, stage: int) -> bool:
        return stage in self.stages

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None,
             stage_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """Forward and backward of one batch; returns the mean microbatch loss on every rank
        (with broadcast_loss=False: on the last stage's rank only, zero elsewhere, one collective less).

        stage_done(stage) runs right after a stage's last backward action of the step (B, or W for
        zero-bubble): its parameters' gradients are final, so data parallel can start reducing
        them while later actions (other stages, the flush) still run."""
        needs_inputs, needs_targets = 0 in self.stages, self.last_stage in self.stages
        mb_inputs = self._split(inputs, "inputs") if needs_inputs else None
        mb_targets = self._split(targets, "targets") if needs_targets else None
        state = self._state = _StepState()
        actions, keys, handlers = self.schedule.actions[self.rank], self._recv_keys, self._handlers
        done_at = self._stage_done_at if stage_done is not None else {}
        posted, clock, times = state.posted, time.perf_counter, self.action_times
        phase = step_stats.phase
        for index, action in enumerate(actions):
            t0 = clock()
            with phase(_PHASE[action.kind], _LABEL[action.kind], action.stage):
                try:
                    for key in keys[index:index + PREFETCH]:
                        if key is not None and key not in posted:
                            self._post(key, state)
                    handlers[action.kind](action, state, mb_inputs, mb_targets)
                except CollectiveTimeout as e:
                    raise self._timeout(action, index, str(e)) from e
                times[action.kind].append(clock() - t0)
                if index in done_at:
                    stage_done(done_at[index])
        # the flush: waiting for the last sends and for the loss is pipeline bubble, not compute
        for action, handle in state.sends:
            try:
                with phase("bubble", "trainlib.pp.send_wait", action.stage):
                    handle.wait(self.timeout_s)
            except CollectiveTimeout as e:
                raise self._timeout(action, None, f"send not delivered: {e}") from e
        loss = torch.stack(state.losses).mean() if needs_targets else torch.zeros(())
        if self.pp_size > 1 and self.broadcast_loss:
            loss = loss.detach().clone().float()
            with phase("bubble", "trainlib.pp.loss_broadcast", max(self.stages)):
                comm.broadcast(loss, src=self._peer(self.last_stage), group=self.mesh.group("pp"))
        return loss

    # ---- actions: one handler per kind (F, B, I, W) ------------------------------------------
    def _forward(self, action: Action, state: "_StepState", mb_inputs, mb_targets) -> None:
        stage, mb = action.stage, action.mb
        x = mb_inputs[mb] if stage == 0 else self._recv_activation(action, state)
        if stage > 0 and x.is_floating_point():
            x.requires_grad_(True)
        if stage in self._splitter:
            with self._splitter[stage].record() as record:
                y = self.stages[stage](x)
            state.records[(stage, mb)] = record
        else:
            y = self.stages[stage](x)
        if stage == self.last_stage:
            loss = self.loss_fn(y, mb_targets[mb])
            if loss.dim() != 0:
                raise PipelineError(f"loss_fn returned shape {list(loss.shape)}; it must return a scalar mean loss")
            state.losses.append(loss.detach())
            y = loss / self.microbatches  # d(mean over microbatches)/d(loss_i) = 1/m
        else:
            self._send_activation(action, y, state)
        state.saved[(stage, mb)] = (x, y)  # the stage's input and what its backward starts from
        state.inflight[stage] += 1
        self.peak_inflight[stage] = max(self.peak_inflight[stage], state.inflight[stage])

    def _grad_of_output(self, action: Action) -> torch.Tensor | None:
        if action.stage == self.last_stage:
            return None  # the loss: backward starts from it
        return self._take(action, ("grad", action.stage, action.mb), f"gradient from stage {action.stage + 1}")

    def _backward(self, action: Action, state: "_StepState", mb_inputs, mb_targets) -> None:
        x, y = state.saved.pop((action.stage, action.mb))
        torch.autograd.backward(y, self._grad_of_output(action))
        self._send_grad(action, x, x.grad if action.stage > 0 and x.requires_grad else None, state)
        state.inflight[action.stage] -= 1

    def _input_grad(self, action: Action, state: "_StepState", mb_inputs, mb_targets) -> None:
        """Input gradient only, sent at once; module-output gradients are kept for W (zero_bubble.py)."""
        key = (action.stage, action.mb)
        x, y = state.saved[key]
        grad_y = self._grad_of_output(action)
        grad_x, captured = SplitBackward.input_grad(x, y, grad_y, state.records[key])
        state.grad_out[key] = (grad_y, captured)
        self._send_grad(action, x, grad_x, state)

    def _weight_grad(self, action: Action, state: "_StepState", mb_inputs, mb_targets) -> None:
        """Weight gradients from the gradients I captured: each module's local backward only."""
        key = (action.stage, action.mb)
        x, y = state.saved.pop(key)
        grad_y, captured = state.grad_out.pop(key)
        self._splitter[action.stage].weight_grad(y, grad_y, state.records.pop(key), captured)
        state.inflight[action.stage] -= 1

    # ---- point to point -----------------------------------------------------------------------
    def _peer(self, stage: int) -> int:
        return self._peer_of[stage]

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int):
        if dst == self.peers[self.rank]:  # next virtual stage on this same rank (pp=1, interleaved)
            self._mailbox[tag] = tensor.clone()
            return _Done()
        obs = step_stats._active
        if obs is not None:
            obs.add_bytes("pp", tensor.numel() * tensor.element_size())
        return comm.isend(tensor, dst, tag=tag)

    def _irecv(self, tensor: torch.Tensor, src: int, tag: int):
        if src == self.peers[self.rank]:  # the local "send" may not have run yet (prefetch): copy on wait
            return _Done(lambda: tensor.copy_(self._mailbox.pop(tag)))
        return comm.irecv(tensor, src, tag=tag)

    def _wait(self, handle: comm.Handle, what: str) -> None:
        try:
            handle.wait(self.timeout_s)
        except CollectiveTimeout as e:
            raise CollectiveTimeout(f"waiting for {what}: {e}") from e

    def _send_activation(self, action: Action, y: torch.Tensor, state: "_StepState") -> None:
        stage, mb = action.stage, action.mb
        y = y.detach().contiguous()
        meta = (y.dtype, tuple(y.shape))
        dst = self._peer(stage + 1)
        if mb == 0:
            if y.dtype not in _DTYPES or y.dim() > _HEADER - 2:
                raise PipelineError(f"stage {stage} output {y.dtype} with {y.dim()} dims cannot be sent; "
                                    f"use one of {_DTYPES} with at most {_HEADER - 2} dims")
            prev, self._sent_meta[stage] = self._sent_meta.get(stage), meta
            header = torch.zeros(_HEADER, dtype=torch.int64)
            header[0], header[1] = _DTYPES.index(y.dtype), y.dim()
            header[2:2 + y.dim()] = torch.tensor(y.shape, dtype=torch.int64)
            if prev is not None:   # the receiver sized this step's header as header + last step's bytes
                msg = torch.empty(_HEADER_BYTES + _nbytes(prev), dtype=torch.uint8)
                msg[:_HEADER_BYTES].copy_(header.view(torch.uint8))
                if meta == prev:
                    msg[_HEADER_BYTES:].copy_(y.reshape(-1).view(torch.uint8))
                state.sends.append((action, self._isend(msg, dst, tag=_tag("hdr", stage, 0))))
                state.keep.append(msg)
                if meta == prev:
                    return   # the activation went with the header
            else:
                state.sends.append((action, self._isend(header, dst, tag=_tag("hdr", stage, 0))))
                state.keep.append(header)
        elif self._sent_meta.get(stage) != meta:
            want = self._sent_meta.get(stage)
            raise PipelineError(f"stage {stage} microbatch {mb} (action {action}): output is {meta[0]} "
                                f"{list(meta[1])} but microbatch 0 sent {want[0]} {list(want[1])}; every microbatch "
                                "must produce the same shape and dtype (split the batch evenly, keep dtypes fixed)")
        state.sends.append((action, self._isend(y, dst, tag=_tag("act", stage, mb))))
        state.keep.append(y)  # the buffer must outlive the asynchronous send

    def _recv_activation(self, action: Action, state: "_StepState") -> torch.Tensor:
        sender = action.stage - 1
        if action.mb == 0:
            msg = self._take(action, ("hdr", sender, 0), f"header from stage {sender}", state)
            header = msg if msg.dtype == torch.int64 else msg[:_HEADER_BYTES].view(torch.int64)
            ndim = int(header[1])
            meta = (_DTYPES[int(header[0])], tuple(int(d) for d in header[2:2 + ndim]))
            same = msg.dtype == torch.uint8 and meta == self._received_meta.get(sender)
            self._received_meta[sender] = meta
            state.headers.add(action.stage)
            if same:   # header + activation in one message (module docstring)
                return msg[_HEADER_BYTES:].view(meta[0]).view(meta[1])
        return self._take(action, ("act", sender, action.mb), f"activation from stage {sender}", state)

    def _recv_spec(self, kind: str, stage: int, mb: int, state: "_StepState") -> tuple[int, torch.Tensor] | None:
        """(source rank, empty buffer) for an incoming message, or None while its shape is unknown.

        `stage` is the stage whose output the message is about: the sender of "hdr" and "act", the
        receiver of "grad" (the gradient of its output)."""
        if kind == "hdr":
            prev = self._received_meta.get(stage)
            if prev is None:   # first step: the header alone
                return self._peer(stage), torch.empty(_HEADER, dtype=torch.int64)
            return self._peer(stage), torch.empty(_HEADER_BYTES + _nbytes(prev), dtype=torch.uint8)
        if kind == "act":
            if stage + 1 not in state.headers:  # this step's header not in yet: the shape may have changed
                return None
            dtype, shape = self._received_meta[stage]
            return self._peer(stage), torch.empty(shape, dtype=dtype)
        saved = state.saved.get((stage, mb))
        if saved is None:
            return None
        y = saved[1]  # the gradient has the shape of the output it belongs to
        return self._peer(stage + 1), torch.empty(y.shape, dtype=y.dtype)

    def _post(self, key: tuple[str, int, int], state: "_StepState") -> bool:
        if key in state.posted:
            return True
        spec = self._recv_spec(*key, state)
        if spec is None:
            return False
        src, buf = spec
        state.posted[key] = (buf, self._irecv(buf, src, tag=_tag(*key)))
        return True

    def _recv_key(self, action: Action) -> tuple[str, int, int] | None:
        """The receive `action` needs (posted ahead, so the bytes land while this rank computes)."""
        if action.kind == "F" and action.stage > 0:
            return ("hdr", action.stage - 1, 0) if action.mb == 0 else ("act", action.stage - 1, action.mb)
        if action.kind in ("B", "I") and action.stage < self.last_stage:
            return ("grad", action.stage, action.mb)
        return None

    def _take(self, action: Action, key: tuple[str, int, int], what: str,
              state: "_StepState | None" = None) -> torch.Tensor:
        state = state if state is not None else self._state
        if not self._post(key, state):
            raise AssertionError(f"cannot size the receive {key} for {action}")  # internal: schedule order broken
        buf, handle = state.posted.pop(key)
        with step_stats.phase("bubble", "trainlib.pp.recv_wait", action.stage):   # idle until the peer sends
            self._wait(handle, what)
        return buf

    def _send_grad(self, action: Action, x: torch.Tensor, grad_x: torch.Tensor | None,
                   state: "_StepState") -> None:
        if action.stage == 0:
            return
        if grad_x is None:  # the stage did not use its input: the gradient is zero
            grad_x = torch.zeros_like(x)
        grad_x = grad_x.contiguous()
        state.sends.append((action, self._isend(grad_x, self._peer(action.stage - 1),
                                                tag=_tag("grad", action.stage - 1, action.mb))))
        state.keep.append(grad_x)

    # ---- helpers ---------------------------------------------------------------------------------
    def _split(self, batch: torch.Tensor | None, what: str) -> list[torch.Tensor]:
        if batch is None:
            raise PipelineError(f"pp rank {self.rank} runs stage {'0' if what == 'inputs' else self.last_stage} and "
                                f"needs {what}; pass them on every rank (other ranks may pass None)")
        if batch.shape[0] % self.microbatches:
            raise PipelineError(f"{what} batch {batch.shape[0]} is not divisible by microbatches={self.microbatches}; "
                                f"use a batch size that is a multiple of {self.microbatches}")
        return list(batch.chunk(self.microbatches, dim=0))

    def _timeout(self, action: Action, index: int | None, detail: str) -> PipelineTimeout:
        table = self.schedule.table(mark=(self.rank, index) if index is not None else None)
        return PipelineTimeout(f"pipeline rank {self.rank} (global {self.peers[self.rank]}), stage {action.stage}, "
                               f"microbatch {action.mb}, action {action} ({self.schedule.name}): {detail}\n{table}")

    def stats(self) -> dict:
        """Peak in-flight activations per stage and median seconds per action kind."""
        median = {kind: sorted(times)[len(times) // 2] for kind, times in self.action_times.items() if times}
        return {"peak_inflight": dict(self.peak_inflight), "median_action_s": median}


def _nbytes(meta: tuple[torch.dtype, tuple[int, ...]]) -> int:
    numel = 1
    for d in meta[1]:
        numel *= d
    return numel * torch.empty((), dtype=meta[0]).element_size()


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
