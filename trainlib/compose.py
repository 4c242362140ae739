"""`tl.parallelize`: compose pipeline, tensor and data parallelism on a (pp, dp, tp) mesh.

    pm = tl.parallelize(model, mesh, tp_plan=GPT_PLAN, schedule="1f1b", microbatches=8, loss_fn=loss_fn)
    loss = pm.step(inputs, targets)      # forward + backward; grads are the dp-average on return
    pm.clip_grad_norm_(1.0); opt.step()  # opt over pm.parameters()

The order is fixed (torchtitan's, and the only one that keeps each step simple):
  1. PP split   `model.as_layers()` (or the model itself if it is a list / nn.Sequential) is cut
                into pp * v stages balanced by parameter count; this rank keeps its stages' layers.
  2. TP         the plan's patterns are matched against the FULL model's module names, and only the
                modules this rank kept are converted (so "blocks.*.attn.qkv" means the same thing
                on every stage); parameters shard over mesh.group("tp").
  3. DP         the kept modules are wrapped in tl.DataParallel over mesh.group("dp"), sharded over
                dp when `shard` is set (ZeRO-1/2/3: tp slices stay tp slices, each pipeline stage
                shards its own parameters), in the `mixed_precision` policy. With pp > 1 the
                schedule runs its backward passes under no_sync(); each stage's buckets (planned
                per stage) start their average (or reduce-scatter) right after that stage's last
                backward of the step, and are waited for once, after the pipeline flush.
Activation checkpointing (`activation_checkpointing="full" | "selective"`) wraps this rank's
blocks after TP and before DP.
Every rank must build the same full model (same seed) before calling this.

Loss: with a column-parallel LM head the logits stay split over tp; pass
`loss_fn=lm_loss_fn(mesh)` (vocab-parallel cross-entropy) instead of F.cross_entropy.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn

from .observe import step_stats
from .pipeline import Pipeline
from .pipeline.partition import balance, check_boundaries, layer_costs
from .tensor_parallel.layers import vocab_parallel_cross_entropy
from .tensor_parallel.plan import convert_modules, resolve_plan, sync_sequence_parallel_grads

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lm_loss_fn(mesh) -> LossFn:
    """Mean next-token cross-entropy for logits (B, T, V/tp) split over tp (plain CE when tp = 1)."""
    group = mesh.group("tp") if mesh is not None and mesh.size("tp") > 1 else None

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if group is None:
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return vocab_parallel_cross_entropy(logits, targets, group)

    return loss_fn


def _layers_of(model: nn.Module | list) -> list[nn.Module]:
    if isinstance(model, (list, tuple, nn.ModuleList, nn.Sequential)):
        return list(model)
    if hasattr(model, "as_layers"):
        return list(model.as_layers())
    raise TypeError(f"{type(model).__name__} cannot be split into pipeline stages: give it an as_layers() method "
                    "returning its layers in order, or pass a list / nn.Sequential of layers")


def _apply_tp(model: nn.Module, mesh, plan: dict[str, str], keep: set[int], sequence_parallel: bool) -> None:
    """Convert the planned modules whose owning layer this rank kept (names from the full model)."""
    root = model if isinstance(model, nn.Module) else nn.ModuleList(model)
    owner: dict[str, bool] = {}
    for name, module in root.named_modules():
        parent = name.rpartition(".")[0]
        owner[name] = id(module) in keep or owner.get(parent, False)
    chosen = {n: style for n, style in resolve_plan(root, plan).items() if owner[n]}
    convert_modules(root, mesh.group("tp"), chosen, sequence_parallel)


class ParallelModel:
    """The result of tl.parallelize: this rank's share of the model and how to run a step on it."""

    def __init__(self, local: nn.Module, mesh, dp_model: nn.Module | None, pipe: Pipeline | None, loss_fn: LossFn,
                 sequence_parallel: bool = False):
        self.local, self.mesh, self.dp_model, self.pipe, self.loss_fn = local, mesh, dp_model, pipe, loss_fn
        self.sequence_parallel = sequence_parallel
        # the step breakdown (observe/step_stats.py): on by default, it costs a few stamps a step
        self.observe = True
        self._axes = step_stats.axes_of(mesh)
        self._last_stats: step_stats.StepStats | None = None
        if hasattr(dp_model, "observe"):
            dp_model.observe = False   # tl.DataParallel measures a step of its own only when used alone
        if pipe is not None:
            pipe.loss_fn = self._scaled_loss   # fp16: every microbatch's loss carries the loss scale
            self._part_index = {s: k for k, s in enumerate(sorted(pipe.stages))}   # DataParallel(parts=...)

    def _reduce_stage(self, stage: int) -> None:
        self.dp_model.reduce_part(self._part_index[stage])

    def loss_scale(self) -> float:
        scaler = getattr(self.dp_model, "scaler", None)
        return scaler.scale if scaler is not None else 1.0

    def _scaled_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.is_floating_point() and output.dtype in (torch.bfloat16, torch.float16):
            output = output.float()   # mixed precision: the loss (softmax over the vocabulary) in fp32
        loss = self.loss_fn(output, target)
        scale = self.loss_scale()
        return loss * scale if scale != 1.0 else loss

    @property
    def module(self) -> nn.Module:
        """This rank's modules (what checkpointing and state_dict see)."""
        return self.local

    def last_step_stats(self) -> step_stats.StepStats | None:
        """Where this rank's last step went: forward, backward, exposed sync wait, pipeline bubble,
        bytes sent per mesh axis, overlap, peak memory (trainlib/observe/step_stats.py). A step is
        one step() call, or what the caller measured around it (the trainer adds data and optimizer).
        None before the first step or with `observe = False`."""
        return self._last_stats

    def open_step(self) -> step_stats.StepRecorder | None:
        """Start measuring a step that will include more than step() (the trainer's data fetch and
        optimizer); pass the result to close_step(). None when observe is off."""
        return step_stats.open_step(self._axes) if self.observe else None

    def close_step(self, rec: step_stats.StepRecorder) -> step_stats.StepStats:
        self._last_stats = step_stats.close_step(rec)
        return self._last_stats

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one batch; returns the loss (same on every rank of the pp/tp group)."""
        own = self.open_step() if step_stats._active is None else None
        try:
            loss = self._step(inputs, targets)
        except BaseException:
            if own is not None:
                step_stats.abandon_step()
            raise
        if own is not None:
            self.close_step(own)
        return loss

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scale = self.loss_scale()
        phase = step_stats.phase
        if self.pipe is None:
            model = self.dp_model if self.dp_model is not None else self.local
            with phase("forward"):
                loss = self._scaled_loss(model(inputs), targets)
            with phase("backward"):
                loss.backward()   # DataParallel's end-of-backward wait inside is the sync_wait phase
            loss = loss.detach()
        elif self.dp_model is None:
            loss = self.pipe.step(inputs, targets)
        else:
            with self.dp_model.no_sync():
                loss = self.pipe.step(inputs, targets, stage_done=self._reduce_stage)
            self.dp_model.sync_gradients()
        if scale != 1.0:
            loss = loss / scale
        if self.sequence_parallel:  # LayerNorm / row-bias grads saw T/tp tokens: sum over tp
            with phase("backward"):
                sync_sequence_parallel_grads(self.local, self.mesh)
        return loss

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.local.parameters()

    def named_parameters(self):
        return self.local.named_parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's shard: its stages' parameters, tp-sharded ones holding this rank's slice."""
        return self.local.state_dict()

    def _grads(self):
        """What the gradient norm reads: tl.DataParallel (fused bucket norms, and the only holder of
        sharded gradients), else the parameters (torch DDP, or no data parallelism)."""
        from .data_parallel import DataParallel

        return self.dp_model if isinstance(self.dp_model, DataParallel) else [p for p in self.parameters()
                                                                               if p.requires_grad]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global-norm clipping over all three axes (see trainlib/data_parallel/clip.py)."""
        from .data_parallel import clip_grad_norm_

        return clip_grad_norm_(self._grads(), max_norm, self.mesh)

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm over all three axes, without clipping (NaN if any is non-finite)."""
        from .data_parallel import grad_norm

        return grad_norm(self._grads(), self.mesh)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's weights whole over dp (a sharded model gathers them: collective), its own pp
        stages and tp slices as they are."""
        if getattr(self.dp_model, "sharded", False):
            return self.dp_model.full_state_dict()
        return self.local.state_dict()

    def close(self) -> None:
        if self.dp_model is not None and hasattr(self.dp_model, "close"):
            self.dp_model.close()


def parallelize(model: nn.Module | list, mesh, *, tp_plan: dict[str, str] | None = None, loss_fn: LossFn | None = None,
                schedule: str = "1f1b", microbatches: int | None = None, virtual_stages: int | None = None,
                boundaries: list[int] | None = None, sync=None, bucket_mb: float | None = None,
                sequence_parallel: bool = False, shard: str | None = None, mixed_precision=None,
                activation_checkpointing: str | None = None,
                dp_wrapper: Callable[[nn.Module], nn.Module] | None = None) -> ParallelModel:
    """Apply PP split -> TP -> DP to `model` on `mesh` (see the module docstring).

    tp_plan: name-pattern plan (required when tp > 1). loss_fn(output, target) -> scalar mean
    (default: lm_loss_fn(mesh)). microbatches: default 2 * pp. sync: a GradSync for the dp axis
    (default AllReduce()). sequence_parallel: Megatron-SP in the plan's region (a plan with
    sequence_scatter / sequence_parallel entries, e.g. GPT_SP_PLAN). shard, mixed_precision,
    activation_checkpointing: see the module docstring. dp_wrapper(module) -> module: wraps this
    rank's modules instead of tl.DataParallel (pp = 1 only; e.g. torch DDP, the reference)."""
    pp, tp, dp = mesh.size("pp"), mesh.size("tp"), mesh.size("dp")
    if tp > 1 and not tp_plan:
        raise ValueError(f"{mesh}: tp={tp} needs a tensor-parallel plan, e.g. "
                         "tp_plan=trainlib.tensor_parallel.GPT_PLAN for the default GPT")
    loss_fn = loss_fn if loss_fn is not None else lm_loss_fn(mesh)
    if pp > 1 and sync is not None and not sync.reduces_in_backward:
        raise ValueError(f"{type(sync).__name__}(mode='async') cannot drive pipeline stages (pp={pp}): it exchanges "
                         "parameters in DataParallel.forward, which a pipeline schedule does not call; use "
                         "mode='sync' or tl.AllReduce() with pp > 1")
    if shard is not None and sequence_parallel and tp > 1 and shard != "optimizer":
        raise ValueError(f"sequence_parallel with shard={shard!r} is not supported yet (its LayerNorm gradients are "
                         "summed over tp after the dp reduction, which stages 2/3 no longer keep whole); use "
                         "shard='optimizer' or sequence_parallel=False")
    pipe = None
    if pp > 1:
        # 1. PP split: decide this rank's layers on the full (unsharded) costs
        layers = _layers_of(model)
        m = microbatches if microbatches is not None else 2 * pp
        from .pipeline.schedules import build_schedule

        n_stages = pp * build_schedule(schedule, pp, m, virtual_stages).v
        bounds = (check_boundaries(boundaries, len(layers), n_stages) if boundaries is not None
                  else balance(layer_costs(layers), n_stages))
        mine = [i for s in range(mesh.rank("pp"), n_stages, pp) for i in range(bounds[s], bounds[s + 1])]
        keep = {id(layers[i]) for i in mine}
        # 2. TP on the kept layers, by full-model names
        if tp > 1:
            _apply_tp(model, mesh, tp_plan, keep, sequence_parallel)
            layers = _layers_of(model)  # a planned module may itself be a layer: re-read the list
        if activation_checkpointing:
            from .activation_checkpointing import apply_activation_checkpointing

            # the whole list: a stage's few layers may hold one block, too few to tell blocks apart;
            # wrapping blocks this rank never runs costs nothing
            apply_activation_checkpointing(layers, activation_checkpointing)
        pipe = Pipeline(layers, mesh, schedule=schedule, microbatches=m, loss_fn=loss_fn, boundaries=bounds,
                        virtual_stages=virtual_stages)
        local: nn.Module = nn.ModuleList(pipe.stages[s] for s in sorted(pipe.stages))
    else:
        if not isinstance(model, nn.Module):
            model = nn.Sequential(*model)
        if tp > 1:
            _apply_tp(model, mesh, tp_plan, {id(model)}, sequence_parallel)
        if activation_checkpointing:
            from .activation_checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(model, activation_checkpointing)
        local = model
    # 3. DP over the kept (and sharded) modules
    dp_model = None
    if dp_wrapper is not None:
        if pipe is not None or shard is not None or mixed_precision is not None:
            raise ValueError("dp_wrapper wraps whole models only: no pipeline stages, and its own shard and "
                             "mixed_precision; pass those to tl.DataParallel inside it")
        dp_model = dp_wrapper(local)
    elif dp > 1 or shard is not None or mixed_precision is not None:
        from .data_parallel import DataParallel
        from .sync import AllReduce

        # under pp, buckets are planned per stage (parts) so each stage reduces as soon as it is done
        dp_model = DataParallel(local, mesh=mesh, sync=sync if sync is not None else AllReduce(), bucket_mb=bucket_mb,
                                shard=shard, mixed_precision=mixed_precision,
                                parts=list(local) if pipe is not None else None)
        dp_model._pipelined = pipe is not None
    pm = ParallelModel(local, mesh, dp_model, pipe, loss_fn, sequence_parallel and tp > 1)
    from .checkpoint.layout import full_model_names

    pm.full_names = full_model_names(model)   # checkpoint layouts name tensors as in the whole model
    return pm
