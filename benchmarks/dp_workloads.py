"""Workloads and candidates for `trainlib bench dp`: the models, their batches, and every data-parallel
wrapper the benchmark puts side by side (trainlib's transports, torch DDP's settings, DeepSpeed's engine).

Every candidate of one group is built from the same initial weights and stepped on the same batches,
so besides its step time each reports its last loss and final parameters: the benchmark checks that
trainlib and its peers trained the same model (a fast wrong answer is not a result).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

MB = 1024 * 1024
DDP_BUCKETS = (1, 25, 100)  # DDP's bucket_cap_mb grid (25 is its default)
# the mmap threshold the planner's memory measurements pin (bench plan's memory phase, the calibration's memory
# probe): at glibc's 128 KiB a pipeline's per-microbatch tensors under it came from the heap and its history
# showed in the peak (the 192-wide GPT's GPipe pp=2 read 41.2 / 41.2 / 46.6 MiB at m = 2 / 4 / 8, whose live
# activations are the same); pinned at 4 KiB 41.1 / 41.1 / 41.5 (2026-12-02 06:04)
MEASURE_PIN_BYTES = 4096


# ---- workloads ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    local_batch: int   # sequences / samples per rank
    optimizer: str     # "adamw" | "sgd"


def workloads(quick: bool) -> dict[str, Workload]:
    """The default GPT (trainer defaults: 4 layers, d_model 128, seq 128, global batch 32) and a wide MLP
    whose 3 x Linear(2048, 2048) carry 48 MiB of fp32 gradients for a batch of 8: communication-bound."""
    return {"gpt": Workload("gpt", 8 if quick else 16, "adamw"),
            "wide_mlp": Workload("wide_mlp", 8, "sgd")}


class WideMLP(nn.Module):
    """x (B, 2048) -> (B, 2048): `depth` Linear(width, width) layers with ReLU; (4 * width^2 + 4 * width) * depth B."""

    def __init__(self, width: int = 2048, depth: int = 3, seed: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / width ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def build_model(w: Workload, tiny: bool = False) -> nn.Module:
    """Same weights on every rank and for every candidate (seeded init, independent of the global RNG)."""
    if w.name == "gpt":
        from trainlib.models.gpt import GPT, GPTConfig

        cfg = GPTConfig(vocab_size=256, seq_len=32 if tiny else 128, n_layer=1 if tiny else 4, n_head=4,
                        d_model=64 if tiny else 128)
        return GPT(cfg, seed=0)
    return WideMLP(width=256 if tiny else 2048, depth=3, seed=0)


def make_batches(w: Workload, rank: int, world: int, n: int, tiny: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """`n` of this rank's batches, drawn once and replayed for every candidate."""
    if w.name == "gpt":
        from trainlib.data import DistributedSampler, default_tokens

        seq = 32 if tiny else 128
        s = DistributedSampler(default_tokens(1 << 18), seq, w.local_batch * world, rank, world, seed=0)
        return [s.next_batch() for _ in range(n)]
    g = torch.Generator().manual_seed(100 + rank)
    width = 256 if tiny else 2048
    return [(torch.randn(w.local_batch, width, generator=g), torch.randn(w.local_batch, width, generator=g))
            for _ in range(n)]


def loss_fn(w: Workload, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if w.name == "gpt":
        from trainlib.models.gpt import lm_loss

        return lm_loss(out, y)
    return F.mse_loss(out, y)


def make_optimizer(w: Workload, params) -> torch.optim.Optimizer:
    if w.optimizer == "adamw":  # as trainlib.trainer does
        return torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return torch.optim.SGD(params, lr=1e-2)


def grad_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def largest_grad_bytes(model: nn.Module) -> int:
    """Autograd materialises each parameter's gradient as a fresh tensor before any hook can move it into a
    bucket, so the largest one is a transient no bucketing scheme avoids (after zero_grad(set_to_none=True))."""
    return max(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# ---- candidates --------------------------------------------------------------------------------
def candidate_specs(with_shm: bool, with_ds: bool, ddp_grid: bool = True) -> dict[str, dict[str, Any]]:
    """name -> how to build it. DDP "default" is DistributedDataParallel(model) with nothing set."""
    specs: dict[str, dict[str, Any]] = {"trainlib": {"kind": "tl", "transport": "torch"},
                                        "trainlib-bf16": {"kind": "tl", "transport": "torch", "compress": "bf16"}}
    if with_shm:
        specs["trainlib-shm"] = {"kind": "tl", "transport": "shm"}
    specs["ddp-default"] = {"kind": "ddp"}
    specs["local-no-sync"] = {"kind": "local"}  # compute only: the floor any sync can approach
    if ddp_grid:
        for mb in DDP_BUCKETS:
            for view in (False, True):
                if (mb, view) != (25, False):  # that one is the default, already there
                    specs[ddp_name(mb, view)] = {"kind": "ddp", "bucket_cap_mb": mb, "view": view}
    if with_ds:
        specs["deepspeed-zero0"] = {"kind": "ds", "stage": 0}
        specs["deepspeed-zero1"] = {"kind": "ds", "stage": 1}
    return specs


def ddp_name(mb: int, view: bool) -> str:
    return f"ddp-bucket{mb}" + ("-view" if view else "")


def shm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trainlib.sync.shm") is not None


@dataclass
class Candidate:
    name: str
    model: nn.Module             # what forward is called on (the wrapper / engine)
    inner: nn.Module             # the wrapped nn.Module, for comparing final weights
    step: Callable[..., torch.Tensor]  # step(batch, probe=None): probe() runs between backward and the update
    close: Callable[[], None] = lambda: None


def build_candidate(name: str, spec: dict[str, Any], w: Workload, tiny: bool = False) -> Candidate:
    import trainlib as tl

    inner = build_model(w, tiny)
    kind = spec["kind"]
    if kind == "tl":
        model = tl.DataParallel(inner, sync=tl.AllReduce(compress=spec.get("compress"), transport=spec["transport"]))
        close = model.close
    elif kind == "ddp":
        kw = {}
        if "bucket_cap_mb" in spec:
            kw = {"bucket_cap_mb": spec["bucket_cap_mb"], "gradient_as_bucket_view": spec["view"]}
        model, close = nn.parallel.DistributedDataParallel(inner, **kw), (lambda: None)
    elif kind == "local":  # no communication at all; its weights drift from the others by design
        model, close = inner, (lambda: None)
    elif kind == "ds":
        return _deepspeed_candidate(name, spec, w, inner)
    else:
        raise ValueError(f"unknown candidate kind {kind!r}")
    opt = make_optimizer(w, [p for p in inner.parameters() if p.requires_grad])

    def step(batch, probe=None) -> torch.Tensor:
        x, y = batch
        loss = loss_fn(w, model(x), y)
        loss.backward()
        if probe is not None:
            probe()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return Candidate(name, model, inner, step, close)


def _deepspeed_candidate(name: str, spec: dict[str, Any], w: Workload, inner: nn.Module) -> Candidate:
    """DeepSpeed's engine on its CPU accelerator over the already-initialised gloo group, fp32, with the
    same torch optimizer as the others (ZeRO-1 shards that optimizer's state over dp)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    import torch.distributed as dist

    cfg = {"train_micro_batch_size_per_gpu": w.local_batch, "gradient_accumulation_steps": 1,
           "train_batch_size": w.local_batch * dist.get_world_size(),
           "zero_optimization": {"stage": spec["stage"]}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    opt = make_optimizer(w, [p for p in inner.parameters() if p.requires_grad])
    engine, *_ = deepspeed.initialize(model=inner, optimizer=opt, config=cfg, dist_init_required=False)
    torch.set_num_threads(1)

    def step(batch, probe=None) -> torch.Tensor:
        x, y = batch
        loss = loss_fn(w, engine(x), y)
        engine.backward(loss)
        if probe is not None:
            probe()
        engine.step()
        return loss.detach()

    return Candidate(name, engine, engine.module, step, lambda: None)


def flat_params(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in m.parameters()])


# ---- memory ------------------------------------------------------------------------------------
def fix_malloc_threshold(threshold_bytes: int = 128 * 1024) -> bool:
    """Pin glibc's mmap threshold (and the heap's trim threshold) at threshold_bytes (default: glibc's initial
    128 KiB). Left dynamic, glibc raises it to the size of the last freed block (up to 32 MiB), so 16 MiB
    gradients freed once are then served from the heap and stay resident after free: RSS would count
    allocator caching, not live tensors. Applied to every candidate. A lower pin (MEASURE_PIN_BYTES) makes
    the small tensors fresh mmaps too, so that a peak does not depend on the heap's history either."""
    import ctypes

    from trainlib.cpu_malloc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

    try:
        libc = ctypes.CDLL("libc.so.6")
        # and the heap's top trimmed past the same (trainlib.cpu_malloc raises both for training)
        return (libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1
                and libc.mallopt(M_TRIM_THRESHOLD, threshold_bytes) == 1)
    except OSError:
        return False


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def pss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_full_info().pss)
