"""The peers of `trainlib bench zero`: torch FSDP2 and DeepSpeed ZeRO, built from the same GPT, optimizer and batch.

    fsdp2(inner, reshard, precision)  fully_shard on every block, then on the root (torch's recipe).
                                      reshard_after_forward=True is ZeRO-3; False keeps the gathered
                                      parameters from forward to backward, FSDP2's ZeRO-2-like mode
                                      (FSDP2 has no ZeRO-1: its gradients are always reduce-scattered)
    deepspeed(inner, stage, ...)      DeepSpeed's engine, CPU accelerator (DS_ACCELERATOR=cpu) over the gloo
                                      group run_ranks already made (dist_init_required=False), fp32, with
                                      the same torch AdamW (zero_allow_untested_optimizer), no
                                      gradient clipping (DeepSpeed's default clips at norm 1.0)

Each returns (what forward is called on, step(batch, probe) -> loss, the objects whose tensors are the
candidate's model states -- the roots zero_ranks.state_bytes walks).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn as nn

Step = Callable[..., torch.Tensor]


def fully_shard_fn() -> Callable[..., Any]:
    """torch >= 2.6 exports fully_shard from torch.distributed.fsdp; 2.4-2.5 only from _composable."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def fsdp2(inner: nn.Module, reshard: bool, precision: str, make_opt: Callable, loss_fn: Callable
          ) -> tuple[nn.Module, Step, list[Any]]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = fully_shard_fn()
    kw: dict[str, Any] = {"mesh": init_device_mesh("cpu", (dist.get_world_size(),)),
                          "reshard_after_forward": reshard}
    if precision == "bf16":
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy
        except ImportError:
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in inner.blocks:
        fully_shard(block, **kw)
    fully_shard(inner, **kw)
    opt = make_opt(inner.parameters())

    def step(batch, probe=None) -> torch.Tensor:
        x, y = batch
        out = inner(x)
        if probe is not None:
            probe("forward")
        loss = loss_fn(out, y)
        loss.backward()
        if probe is not None:
            probe("backward")
        opt.step()
        if probe is not None:
            probe("step")
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return inner, step, [inner, opt]


def deepspeed(inner: nn.Module, stage: int, local_batch: int, bucket_elems: int, make_opt: Callable,
              loss_fn: Callable) -> tuple[nn.Module, Step, list[Any]]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import deepspeed as ds
    import torch.distributed as dist

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    cfg = {"train_micro_batch_size_per_gpu": local_batch, "gradient_accumulation_steps": 1,
           "train_batch_size": local_batch * dist.get_world_size(),
           "zero_optimization": ds_zero_config(stage, bucket_elems), "zero_allow_untested_optimizer": True,
           # DeepSpeed (0.19) clips the gradient norm at 1.0 unless told otherwise; the others do not clip
           "gradient_clipping": 0.0,
           "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    opt = make_opt(inner.parameters())
    engine, *_ = ds.initialize(model=inner, optimizer=opt, config=cfg, dist_init_required=False)
    torch.set_num_threads(threads)  # DeepSpeed's CPU accelerator resets it; every candidate gets the same

    def step(batch, probe=None) -> torch.Tensor:
        x, y = batch
        out = engine(x)
        if probe is not None:
            probe("forward")
        loss = loss_fn(out, y)
        engine.backward(loss)
        if probe is not None:
            probe("backward")
        engine.step()
        if probe is not None:
            probe("step")
        return loss.detach()

    return engine, step, [engine]


def ds_zero_config(stage: int, bucket_elems: int) -> dict[str, Any]:
    """DeepSpeed's buckets sized to one transformer block (FSDP2's unit here). Its defaults (5e8 elements) make
    ZeRO-3 allocate a 2 GB flat reduce buffer up front -- untouched pages, but storage all the same."""
    return {"stage": stage, "reduce_bucket_size": bucket_elems, "allgather_bucket_size": bucket_elems,
            **({"stage3_prefetch_bucket_size": bucket_elems} if stage == 3 else {})}


def gathered_params(kind: str, model: nn.Module) -> torch.Tensor:
    """The full fp32 parameters of a peer, flattened in module order (a collective for sharded peers)."""
    if kind == "fsdp2":
        out = []
        for p in model.parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out.append(full.detach().reshape(-1).float())
        return torch.cat(out)
    if kind == "ds":
        import deepspeed as ds

        params = list(model.module.parameters())
        if hasattr(params[0], "ds_id"):  # ZeRO-3: parameters are partitioned, gather them for the read
            with ds.zero.GatheredParameters(params):
                return torch.cat([p.detach().reshape(-1).float().clone() for p in params])
        return torch.cat([p.detach().reshape(-1).float() for p in params])
    raise ValueError(f"unknown peer kind {kind!r}")
