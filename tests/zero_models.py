"""Per-rank functions for the sharded-data-parallel tests (importable by run_ranks children).

Each function trains several configurations in ONE spawned group (a group costs seconds to start
on this machine) and returns, per configuration, the losses and the full weights afterwards, so
the test compares every shard stage against the unsharded DataParallel of the same run."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

import trainlib as tl
from trainlib.data_parallel import clip_grad_norm_
from trainlib.models.gpt import GPT, GPTConfig, lm_loss

STAGES = (None, "optimizer", "gradients", "parameters")


class ZeroNet(nn.Module):
    """Layers in a ModuleList (stage 3's units) with what sharding must survive: a weight tied across
    two units, a weight tied to the root (embedding / head), a frozen layer, a layer unused on some
    steps, a buffer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
        self.layers[3].weight = self.layers[0].weight          # tied across units -> root
        self.layers[1].requires_grad_(False)                   # frozen
        self.unused = nn.Linear(8, 8)                           # used on some steps only
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight                     # tied embedding / head
        self.register_buffer("shift", torch.linspace(-0.1, 0.1, 8))

    def forward(self, idx: torch.Tensor, use_unused: bool = True) -> torch.Tensor:
        h = self.emb(idx).mean(1) + self.shift
        for layer in self.layers:
            h = torch.tanh(layer(h))
        if use_unused:
            h = h + self.unused(h)
        return self.head(self.norm(h))


def _gpt() -> GPT:
    return GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32), seed=1)


def _gpt_batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g)


def _train(model_fn, stage, *, steps: int = 3, precision=None, clip: float = 0.0, accumulate: int = 1,
           transport: str = "torch", compress: str | None = None, bucket_mb: float = 0.01, lr: float = 1e-2,
           zeronet: bool = False) -> dict:
    mesh = tl.Mesh(dp=-1)
    torch.manual_seed(0)
    model = model_fn()
    dp = tl.DataParallel(model, mesh, sync=tl.AllReduce(bucket_mb=bucket_mb, transport=transport, compress=compress),
                         shard=stage, mixed_precision=precision)
    params = [p for p in dp.parameters() if p.requires_grad]
    opt = tl.DistributedOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=0.1), dp)
    r = mesh.rank("dp")
    gathers = _count_gathers(dp.sync) if stage == "parameters" else [0]
    losses, skipped, scales, allocations = [], 0, [], []
    for step in range(steps):
        allocations.append(getattr(dp, "gather_allocations", 0))
        for micro in range(accumulate):
            last = micro == accumulate - 1
            if zeronet:
                g = torch.Generator().manual_seed(1000 * step + 10 * micro + r)
                x, y = torch.randint(0, 10, (8, 5), generator=g), torch.randint(0, 10, (8,), generator=g)
                ctx = dp.no_sync() if not last else _null()
                with ctx:
                    loss = nn.functional.cross_entropy(dp(x, use_unused=(step + r) % 2 == 0).float(), y) / accumulate
                    opt.scale_loss(loss).backward()
            else:
                x, y = _gpt_batch(step * accumulate + micro, r)
                ctx = dp.no_sync() if not last else _null()
                with ctx:
                    loss = lm_loss(dp(x).float(), y) / accumulate
                    opt.scale_loss(loss).backward()
        if clip:
            norm = clip_grad_norm_(dp, clip)
            losses.append(float(norm))
        scales.append(opt.loss_scale)
        skipped += 0 if opt.step() else 1
        opt.zero_grad()
        losses.append(loss.item() * accumulate)
    full = dp.full_state_dict() if dp.sharded else {k: v.detach().clone() for k, v in model.state_dict().items()}
    stats = {"stage": stage, "losses": losses, "skipped": skipped, "scales": scales,
             "weights": {k: v.float() for k, v in full.items()},
             "param_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
             "gathers_per_step": gathers[0] / steps,
             "allocations_per_step": [b - a for a, b in zip(allocations, allocations[1:] + [dp.gather_allocations])]
             if stage == "parameters" else [],
             "gathers_expected": _stage3_gathers([b.unit for b in dp.buckets]) if stage == "parameters" else 0}
    dp.close()
    return stats


def _stage3_gathers(units: list[int]) -> int:
    """Per step: the root's buckets (unit -1) once, every unit's for forward and again for backward,
    except the last unit's, which backward finds still gathered."""
    last = max(units)
    return sum(u < 0 for u in units) + 2 * sum(u >= 0 for u in units) - sum(u == last for u in units)


def _count_gathers(sync) -> list[int]:
    """All-gathers the wrapper starts: start_all_gather_into (which may call start_all_gather itself:
    counted once), start_all_gather (the hierarchical transport's staging buffers) and the shm
    transport's settled reads (read_shards_into that succeeded)."""
    count, into, plain, inside = [0], sync.start_all_gather_into, sync.start_all_gather, [False]
    read = sync.read_shards_into

    def counted_read(*args, **kwargs):
        done = read(*args, **kwargs)
        count[0] += 1 if done else 0
        return done
    sync.read_shards_into = counted_read

    def counted_into(*args, **kwargs):
        count[0] += 1
        inside[0] = True
        try:
            return into(*args, **kwargs)
        finally:
            inside[0] = False

    def counted_plain(*args, **kwargs):
        count[0] += 0 if inside[0] else 1
        return plain(*args, **kwargs)
    sync.start_all_gather_into, sync.start_all_gather = counted_into, counted_plain
    return count


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def equivalence_cases() -> dict:
    """Every stage against the unsharded wrapper: GPT fp32, ZeroNet (tied/frozen/unused), no_sync
    accumulation, clipping, bf16 wire compression, the shm and hierarchical transports."""
    import torch.distributed as dist

    from trainlib.sync.shm import NODE_ID_ENV

    tl.init()
    torch.manual_seed(0)
    out: dict[str, dict] = {}
    for stage in STAGES:
        key = stage or "none"
        out[f"gpt/{key}"] = _train(_gpt, stage)
        out[f"zeronet/{key}"] = _train(ZeroNet, stage, steps=4, zeronet=True, bucket_mb=0.0005)
        out[f"accumulate/{key}"] = _train(_gpt, stage, accumulate=2, steps=2)
        out[f"clip/{key}"] = _train(_gpt, stage, clip=0.05, steps=2)
        out[f"compress/{key}"] = _train(_gpt, stage, compress="bf16", steps=2)
        if stage is not None:   # stages 2/3 reduce through a few reused shared buffers: unused branches too
            out[f"shm/{key}"] = _train(_gpt, stage, transport="shm")
            out[f"shm-zeronet/{key}"] = _train(ZeroNet, stage, steps=4, zeronet=True, bucket_mb=0.0005,
                                               transport="shm")
            # each rank an emulated node of its own: stage 3 gathers through the hierarchical transport's
            # shared staging buffers instead of reading the shards out of shared memory
            os.environ[NODE_ID_ENV] = f"node{dist.get_rank()}"
            try:
                out[f"hier/{key}"] = _train(_gpt, stage, transport="hierarchical")
            finally:
                os.environ.pop(NODE_ID_ENV, None)
    # stage 3 with every unit's memory pooled (the pool's floor is 32 MiB: these units are far smaller)
    from trainlib.data_parallel import sharded

    floor, sharded.POOL_MIN_BYTES = sharded.POOL_MIN_BYTES, 0
    try:
        for transport in ("torch", "shm", "hierarchical"):
            if transport == "hierarchical":
                os.environ[NODE_ID_ENV] = f"node{dist.get_rank()}"
            try:
                out[f"pool-{transport}/parameters"] = _train(_gpt, "parameters", transport=transport)
            finally:
                os.environ.pop(NODE_ID_ENV, None)
    finally:
        sharded.POOL_MIN_BYTES = floor
    return out


def prefetch_cases() -> dict:
    """Stage 3, every transport: which units' gathers are still in flight when each unit's forward ends.
    Waiting for a unit's own gather must leave the next unit's prefetch running (not drain it too)."""
    tl.init()
    out = {}
    for transport in ("torch", "shm"):
        mesh = tl.Mesh(dp=-1)
        dp = tl.DataParallel(_gpt(), mesh, sync=tl.AllReduce(bucket_mb=0.01, transport=transport), shard="parameters")
        seen: list[list[int]] = []
        for u, m in enumerate(dp.units):
            m.register_forward_hook(lambda mod, args, o, u=u: seen.append(
                sorted({b.unit for kind, b in dp._inflight if kind == "gather"})))
        x, y = _gpt_batch(0, mesh.rank("dp"))
        lm_loss(dp(x).float(), y).backward()
        out[transport] = {"seen": seen, "units": len(dp.units)}
        dp.close()
    return out


def settled_read_cases(release: bool = True) -> dict:
    """Stage 3 on shm: once every rank is in a forward after the last write, gathers read the peers'
    shards with no collective. A rank that then writes its shard (a checkpoint load) while a slow peer
    still reads it must wait for that peer (release_shards). Rank 1 sleeps inside an evaluation
    forward between its units' gathers while rank 0 loads older weights; rank 1's output must be the
    one of the weights it started the forward with. release=False: the load skips that wait."""
    import time

    tl.init()
    mesh = tl.Mesh(dp=-1)
    torch.manual_seed(0)
    dp = tl.DataParallel(_gpt(), mesh, sync=tl.AllReduce(bucket_mb=0.01, transport="shm"), shard="parameters")
    opt = tl.DistributedOptimizer(torch.optim.AdamW(list(dp.parameters()), lr=1e-2), dp)
    if not release:
        dp.release_shards = lambda: setattr(dp, "_settled", False)
    r = mesh.rank("dp")
    out: dict = {}
    for step in range(2):
        x, y = _gpt_batch(step, r)
        lm_loss(dp(x).float(), y).backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            older = dp.shard_state_dict()
    xe, _ = _gpt_batch(7, 0)
    with torch.no_grad():
        ref = dp(xe).float()
        reads = dp.sync.read_shards_into
        counted = [0]
        dp.sync.read_shards_into = lambda *a: counted.__setitem__(0, counted[0] + 1) or reads(*a)
        slow = dp.units[0].register_forward_hook(lambda *a: time.sleep(0.5)) if r == 1 else None
        got = dp(xe).float()
    dp.load_shard_state_dict(older)
    if slow is not None:
        slow.remove()
    out["eval_diff"] = float((got - ref).abs().max())
    out["settled_reads"] = counted[0]
    out["units"] = len(dp.units)
    dp.close()
    return out


def precision_cases() -> dict:
    """bf16 policy per stage against fp32; fp16 with dynamic loss scaling from a scale that overflows."""
    tl.init()
    bf16 = tl.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out = {"fp32": _train(_gpt, None, steps=5, lr=3e-3)}
    for stage in STAGES:
        out[f"bf16/{stage or 'none'}"] = _train(_gpt, stage, steps=5, precision=bf16, lr=3e-3)
    fp16 = tl.MixedPrecision(param_dtype=torch.float16, reduce_dtype=torch.float32, init_scale=2.0 ** 20,
                             growth_interval=2)
    for stage in (None, "parameters"):
        out[f"fp16/{stage or 'none'}"] = _train(_gpt, stage, steps=8, precision=fp16, lr=3e-3)
    return out
