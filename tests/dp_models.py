"""Models and per-rank functions for the data-parallel tests (importable by run_ranks children)."""
from __future__ import annotations

import torch
import torch.nn as nn

import trainlib as tl


class AwkwardNet(nn.Module):
    """Every case DDP must handle: an unused branch, tied weights, a frozen layer, buffers, fp64 params."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.branch = nn.Linear(16, 16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.fc2 = nn.Linear(16, 8)
        self.d64 = nn.Linear(8, 8).double()
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, idx: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        h = self.bn(self.fc1(self.emb(idx).mean(1))).relu()
        if use_branch:
            h = h + self.branch(h)
        h = self.fc2(self.frozen(h))
        h = h + self.d64(h.double()).float()
        return self.out(h)


def _batch(step: int, rank: int, n: int = 8):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 10, (n, 5), generator=g), torch.randint(0, 10, (n,), generator=g)


def _max_grad_diff(a: nn.Module, b: nn.Module) -> float:
    worst = 0.0
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        if pa.grad is None and pb.grad is None:
            continue
        ga = pa.grad if pa.grad is not None else torch.zeros_like(pa)
        gb = pb.grad if pb.grad is not None else torch.zeros_like(pb)
        worst = max(worst, (ga.double() - gb.double()).abs().max().item())
    return worst


def versus_ddp(bucket_mb: float, set_to_none: bool, steps: int = 4) -> dict:
    """Train AwkwardNet under torch DDP and tl.DataParallel side by side; report the worst grad difference."""
    rt = tl.init()
    torch.manual_seed(0)
    ref, ours = AwkwardNet(), AwkwardNet()
    ours.load_state_dict(ref.state_dict())
    ddp = nn.parallel.DistributedDataParallel(ref, find_unused_parameters=True)
    dp = tl.DataParallel(ours, sync=tl.AllReduce(bucket_mb=bucket_mb))
    opt_r = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    diffs, views_ok = [], True
    for step in range(steps):
        x, y = _batch(step, rt.rank)
        use_branch = (step + rt.rank) % 2 == 0  # unused on some ranks in some steps
        for model, opt in ((ddp, opt_r), (dp, opt_o)):
            nn.functional.cross_entropy(model(x, use_branch), y).backward()
        diffs.append(_max_grad_diff(ref, ours))
        for b in dp.buckets:  # grads are views into the flat bucket after every backward
            views_ok &= all(b.view(i).data_ptr() == p.grad.data_ptr() for i, p in enumerate(b.params))
        opt_r.step()
        opt_o.step()
        opt_r.zero_grad(set_to_none=set_to_none)
        opt_o.zero_grad(set_to_none=set_to_none)
    buf_diff = max((a - b).abs().max().item() for a, b in zip(ref.buffers(), ours.buffers()) if a.is_floating_point())
    frozen_untouched = ours.frozen.weight.grad is None
    dp.close()
    return {"grad_diff": max(diffs), "buffer_diff": buf_diff, "views": views_ok, "frozen_untouched": frozen_untouched,
            "buckets": len(dp.buckets)}


def no_sync_accumulation(k: int = 3) -> dict:
    """k micro-steps under no_sync (+1 synced) must equal one (k+1)-times-larger batch, single process."""
    rt = tl.init()
    torch.manual_seed(0)
    model, ref = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)), None
    ref = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    ref.load_state_dict(model.state_dict())
    dp = tl.DataParallel(model)
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(rt.world_size, k + 1, 4, 6, generator=g)
    ys = torch.randn(rt.world_size, k + 1, 4, 3, generator=g)
    mse = nn.functional.mse_loss
    with dp.no_sync():
        for i in range(k):
            (mse(dp(xs[rt.rank, i]), ys[rt.rank, i]) / (k + 1)).backward()
    (mse(dp(xs[rt.rank, k]), ys[rt.rank, k]) / (k + 1)).backward()
    # reference: every rank's every micro-batch at once, one process
    mse(ref(xs.reshape(-1, 6)), ys.reshape(-1, 3)).backward()
    return {"diff": _max_grad_diff(model, ref)}


def compressed(compress: str) -> dict:
    """bf16/fp16 on the wire: gradients within the format's rounding of the fp32 all-reduce."""
    rt = tl.init()
    torch.manual_seed(0)
    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    b.load_state_dict(a.state_dict())
    exact, lossy = tl.DataParallel(a), tl.DataParallel(b, sync=tl.AllReduce(compress=compress))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(rt.rank))
    for m in (exact, lossy):
        m(x).pow(2).mean().backward()
    rel = max(((pa.grad - pb.grad).abs().max() / pa.grad.abs().max()).item()
              for pa, pb in zip(a.parameters(), b.parameters()))
    return {"rel_err": rel, "dtype": str(lossy.buckets[0].comm.dtype)}


def mismatched_models() -> str:
    rt = tl.init()
    model = nn.Linear(4, 4 + rt.rank)
    try:
        tl.DataParallel(model)
    except ValueError as e:
        return str(e)
    return "no error"


def shm_versus_ddp(steps: int = 3) -> dict:
    """The shared-memory transport against torch DDP on AwkwardNet, with many small buckets."""
    rt = tl.init()
    torch.manual_seed(0)
    ref, ours = AwkwardNet(), AwkwardNet()
    ours.load_state_dict(ref.state_dict())
    ddp = nn.parallel.DistributedDataParallel(ref, find_unused_parameters=True)
    dp = tl.DataParallel(ours, sync=tl.AllReduce(bucket_mb=0.001, transport="shm"))
    diffs = []
    for step in range(steps):
        x, y = _batch(step, rt.rank)
        for model in (ddp, dp):
            nn.functional.cross_entropy(model(x, step % 2 == 0), y).backward()
        diffs.append(_max_grad_diff(ref, ours))
        for m in (ref, ours):
            m.zero_grad(set_to_none=True)
    dp.close()
    import os
    leftovers = [f for f in os.listdir("/dev/shm") if f.startswith("trainlib-")]
    return {"grad_diff": max(diffs), "buckets": len(dp.buckets), "leftovers": leftovers}
