"""The GPU check of issue 11, one JSON on stdout: the bucket kernels against torch and a device
copy, DataParallel at world 1 on NCCL against torch DDP, and every shard stage with the bf16 policy.

    bash benchmarks/gpu_check.sh               # one CUDA GPU (sized for well under 8 min on an H200)
    bash benchmarks/gpu_check.sh --dry-run     # CPU, gloo, tiny sizes: what CI runs (tests/test_gpu_check.py)

Sections of the JSON:
  kernels         GB/s of pack/unpack (fp32 grads <-> bf16 bucket), scale_cast (fp32 -> bf16),
                  epilogue (fp32) and unscale_epilogue (bf16 -> fp32 master grad) for each backend
                  (triton on CUDA; reference, cpu and triton-under-TRITON_INTERPRET in a dry run),
                  beside the torch op chain computing the same values and `dst.copy_(src)` of fp32
                  (GB/s = bytes read + written / median time; copy moves 2 * 4 bytes an element)
  data_parallel   steps/s of the default GPT (trainlib.models.gpt): tl.DataParallel vs torch DDP vs
                  the bare module, alternating; world 1 on NCCL (gloo in a dry run); final losses
  shard           per stage (None, optimizer, gradients, parameters) and precision (fp32, bf16):
                  steps/s, torch.cuda.max_memory_allocated (CUDA only), the loss after N steps, and
                  bf16's loss against the fp32 run of the same stage ("shard API not available" until
                  tl.DataParallel takes shard=)
Every figure is a median of alternating repetitions measured in this one run (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import inspect
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterator

import torch

from .bench_kernels import SCALE, UNSCALE, _timer, _torch_epilogue, _torch_unscale_epilogue
from .harness import alternate, metadata

BF16, F32 = torch.bfloat16, torch.float32
STAGES = (None, "optimizer", "gradients", "parameters")
BF16_LOSS_RTOL = 0.05   # bf16 compute vs fp32 after N steps; bf16 keeps 8 bits of mantissa
BUDGET_S = 420.0        # the script's own deadline: later sections report "skipped" rather than overrun


class Sizes:
    """What a run measures: the real sizes on a GPU, tiny ones in a dry run."""

    def __init__(self, dry_run: bool):
        self.kernel_elems = [1 << 12, 1 << 15] if dry_run else [1 << 20, 1 << 24, 1 << 27]
        self.interp_elems = [1 << 12]      # Triton's interpreter runs numpy per program: keep it small
        self.n_tensors = 32                # tensors packed into one bucket
        self.kernel_reps = 3 if dry_run else 7
        self.sample_s = 0.002 if dry_run else 0.02
        from trainlib.models.gpt import GPTConfig

        self.gpt = GPTConfig() if dry_run else GPTConfig(vocab_size=256, seq_len=256, n_layer=6, n_head=8,
                                                         d_model=512)
        self.batch = 4 if dry_run else 16
        self.warmup, self.steps, self.dp_reps = (1, 2, 2) if dry_run else (5, 20, 5)
        self.shard_steps = 4 if dry_run else 60     # the loss is compared after this many steps


# ---- kernels ---------------------------------------------------------------------------------
@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """TRAINLIB_KERNELS=name for the calls inside (the dispatcher reads it on every call)."""
    before = os.environ.get("TRAINLIB_KERNELS")
    os.environ["TRAINLIB_KERNELS"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRAINLIB_KERNELS", None)
        else:
            os.environ["TRAINLIB_KERNELS"] = before


def backend_unavailable(name: str, device: torch.device) -> str | None:
    """Why kernel backend `name` cannot run on `device` here (the dispatcher's own words), or None."""
    import trainlib.kernels as K

    with forced_backend(name):
        try:
            got = K.backend_for(torch.empty(0, device=device))
        except ValueError as e:
            return str(e)
    return None if got == name else f"TRAINLIB_KERNELS={name} falls back to {got!r} here"


def kernel_ops(n: int, n_tensors: int, device: torch.device) -> dict[str, tuple[Callable, Callable, int]]:
    """op -> (trainlib kernel, torch op chain with the same values, bytes read + written)."""
    import trainlib.kernels as K

    src = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)   # fp32 gradients
    ts = list(src.split(n // n_tensors))
    outs = [torch.empty_like(t) for t in ts]
    bucket, low = torch.empty(n, dtype=BF16, device=device), torch.empty(n, dtype=BF16, device=device)
    half, master = src.to(BF16), torch.empty_like(src)

    def torch_pack() -> None:
        bucket.copy_(torch.cat(ts).mul_(SCALE))

    def torch_unpack() -> None:
        for o, piece in zip(outs, bucket.float().mul_(SCALE).split(n // n_tensors)):
            o.copy_(piece)

    return {
        "pack": (lambda: K.pack(ts, bucket, SCALE), torch_pack, n * 6),
        "unpack": (lambda: K.unpack(bucket, outs, SCALE), torch_unpack, n * 6),
        "scale_cast": (lambda: K.scale_cast(src, low, SCALE), lambda: low.copy_(src * SCALE), n * 6),
        "epilogue": (lambda: K.epilogue(src), lambda: _torch_epilogue(src), n * 4),
        "unscale_epilogue": (lambda: K.unscale_epilogue(half, master, UNSCALE),
                             lambda: _torch_unscale_epilogue(half, master), n * 6),
    }


def kernel_bandwidth(backend: str, sizes: list[int], sz: Sizes, device: torch.device) -> dict[str, Any]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    res: dict[str, Any] = {}
    with forced_backend(backend):
        for n in sizes:
            src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
            copy = _timer(lambda: dst.copy_(src), sz.sample_s, sync)
            for op, (fused, peer, moved) in kernel_ops(n, sz.n_tensors, device).items():
                r = alternate({"fused": _timer(fused, sz.sample_s, sync), "torch": _timer(peer, sz.sample_s, sync),
                               "copy": copy}, sz.kernel_reps)
                t = {k: v["median_s"] for k, v in r.items()}
                fused_bw, copy_bw = moved / t["fused"] / 1e9, 2 * n * 4 / t["copy"] / 1e9
                res.setdefault(op, {})[str(n)] = {
                    "fused_GBps": fused_bw, "torch_GBps": moved / t["torch"] / 1e9, "copy_GBps": copy_bw,
                    "speedup_vs_torch": t["torch"] / t["fused"], "fraction_of_copy_bw": fused_bw / copy_bw}
    return res


def kernels_section(sz: Sizes, device: torch.device, dry_run: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"device": str(device), "elements": sz.kernel_elems, "tensors_per_bucket": sz.n_tensors,
                           "backends": {}}
    backends = ["reference", "cpu", "triton"] if dry_run else ["triton"]
    for b in backends:
        why = backend_unavailable(b, device)
        if why is not None:
            out["backends"][b] = {"skipped": why}
            continue
        sizes = sz.interp_elems if b == "triton" and device.type != "cuda" else sz.kernel_elems
        out["backends"][b] = kernel_bandwidth(b, sizes, sz, device)
    return out


# ---- training runs ---------------------------------------------------------------------------
def init_world1(device: torch.device, tmp: str) -> str:
    """A world-1 process group in this process (FileStore: no port to find), then tl.init() on it."""
    import torch.distributed as dist

    import trainlib as tl

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=300))
    tl.init(backend=backend, device=str(device))
    return backend


def batches(sz: Sizes, device: torch.device, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of the default corpus, on the device before any timing starts."""
    from trainlib.data import DistributedSampler, default_tokens

    need = (count * sz.batch + 1) * sz.gpt.seq_len + 1
    sampler = DistributedSampler(default_tokens(max(need, 1 << 16)), sz.gpt.seq_len, sz.batch)
    return [tuple(t.to(device) for t in sampler.next_batch()) for _ in range(count)]


class Trainer:
    """One model + optimizer stepping through fixed batches; `steps(k)` runs k and returns seconds."""

    def __init__(self, model: torch.nn.Module, opt, data: list, device: torch.device, scaled: bool = False):
        self.model, self.opt, self.data, self.device, self.scaled = model, opt, data, device, scaled
        self.i, self.losses = 0, []

    def step(self) -> None:
        from trainlib.models.gpt import lm_loss

        x, y = self.data[self.i % len(self.data)]
        self.i += 1
        loss = lm_loss(self.model(x).float(), y)
        (self.opt.scale_loss(loss) if self.scaled else loss).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss.detach())

    def steps(self, k: int) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(k):
            self.step()
        sync()
        return (time.perf_counter() - t0) / k

    def last_loss(self) -> float:
        return float(self.losses[-1])


def data_parallel_section(sz: Sizes, device: torch.device, backend: str) -> dict[str, Any]:
    """tl.DataParallel vs torch DDP vs the bare module: same model, data and AdamW, alternating."""
    import trainlib as tl
    from torch.nn.parallel import DistributedDataParallel as DDP
    from trainlib.models.gpt import GPT

    data = batches(sz, device, 8)
    mesh = tl.Mesh(dp=1)

    def make(wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> Trainer:
        model = wrap(GPT(sz.gpt, seed=0).to(device))
        return Trainer(model, torch.optim.AdamW(model.parameters(), lr=3e-4), data, device)

    ddp_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    runs = {"trainlib": make(lambda m: tl.DataParallel(m, mesh)),
            "torch_ddp": make(lambda m: DDP(m, device_ids=ddp_ids)),
            "plain": make(lambda m: m)}
    for r in runs.values():
        r.steps(sz.warmup)
    timed = alternate({k: (lambda r=r: r.steps(sz.steps)) for k, r in runs.items()}, sz.dp_reps)
    sps = {k: 1.0 / v["median_s"] for k, v in timed.items()}
    losses = {k: r.last_loss() for k, r in runs.items()}
    return {"backend": backend, "world_size": 1, "params": sum(p.numel() for p in runs["plain"].model.parameters()),
            "model": dataclasses.asdict(sz.gpt), "batch": sz.batch,
            "steps_per_s": sps, "tokens_per_s": {k: v * sz.batch * sz.gpt.seq_len for k, v in sps.items()},
            "trainlib_vs_torch_ddp": sps["trainlib"] / sps["torch_ddp"],
            "trainlib_vs_plain": sps["trainlib"] / sps["plain"],
            "steps_each": sz.warmup + sz.dp_reps * sz.steps, "final_loss": losses,
            "loss_max_abs_diff_vs_plain": max(abs(v - losses["plain"]) for v in losses.values())}


def shard_unavailable(data_parallel: type | None = None) -> str | None:
    """Why the sharded/mixed-precision API of issue 11 cannot be exercised yet, or None.
    `data_parallel`: the wrapper class to inspect (default tl.DataParallel)."""
    import trainlib as tl

    cls = tl.DataParallel if data_parallel is None else data_parallel
    params = inspect.signature(cls.__init__).parameters
    missing = [p for p in ("shard", "mixed_precision") if p not in params]
    if missing:
        return f"shard API not available: {cls.__name__} has no {', '.join(p + '=' for p in missing)} yet"
    for name in ("MixedPrecision", "DistributedOptimizer"):
        try:
            getattr(tl, name)
        except AttributeError:
            return f"shard API not available: trainlib.{name} is missing"
    return None


def shard_run(stage: str | None, precision: str, sz: Sizes, device: torch.device, mesh,
              data: list) -> dict[str, Any]:
    import trainlib as tl
    from trainlib.models.gpt import GPT

    mp = tl.MixedPrecision(param_dtype=BF16, reduce_dtype=F32) if precision == "bf16" else None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = tl.DataParallel(GPT(sz.gpt, seed=0).to(device), mesh, shard=stage, mixed_precision=mp)
    opt = tl.DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4), model)
    run = Trainer(model, opt, data, device, scaled=True)
    run.steps(sz.warmup)
    per_step = run.steps(sz.shard_steps - sz.warmup)
    out = {"steps_per_s": 1.0 / per_step, "loss": run.last_loss(), "steps": len(run.losses),
           "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    del run, opt, model
    return out


def shard_section(sz: Sizes, device: torch.device, deadline: float) -> dict[str, Any]:
    why = shard_unavailable()
    if why is not None:
        return {"available": False, "reason": why}
    import trainlib as tl

    mesh, data = tl.Mesh(dp=1), batches(sz, device, sz.shard_steps)
    stages: dict[str, Any] = {}
    for stage in STAGES:
        row: dict[str, Any] = {}
        for precision in ("fp32", "bf16"):
            if time.monotonic() > deadline:
                row[precision] = {"skipped": f"the script's {BUDGET_S:.0f} s budget ran out"}
                continue
            try:
                row[precision] = shard_run(stage, precision, sz, device, mesh, data)
            except Exception as e:  # one failing stage must not cost the other figures of a GPU run
                row[precision] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if all("loss" in row.get(p, {}) for p in ("fp32", "bf16")):
            diff = abs(row["bf16"]["loss"] - row["fp32"]["loss"])
            row["bf16_loss_abs_diff_vs_fp32"] = diff
            row["bf16_within_rtol"] = diff <= BF16_LOSS_RTOL * abs(row["fp32"]["loss"])
        stages[str(stage).lower()] = row
    base = stages["none"].get("fp32", {}).get("loss")
    for row in stages.values():  # at world 1 every stage is the same arithmetic as the unsharded run
        if base is not None and "loss" in row.get("fp32", {}):
            row["fp32_loss_abs_diff_vs_unsharded"] = abs(row["fp32"]["loss"] - base)
    return {"available": True, "precision_policy": "MixedPrecision(param_dtype=bf16, reduce_dtype=fp32)",
            "peak_memory": "torch.cuda.max_memory_allocated per run" if device.type == "cuda"
            else "not measured: a CUDA allocator statistic",
            "bf16_loss_rtol": BF16_LOSS_RTOL, "steps": sz.shard_steps, "stages": stages}


# ---- main ------------------------------------------------------------------------------------
def run(dry_run: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    deadline = t0 + BUDGET_S
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --dry-run for the CPU check")
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    sz = Sizes(dry_run)
    torch.manual_seed(0)
    result: dict[str, Any] = {"dry_run": dry_run, "device": str(device),
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    section(result, "kernels", lambda: kernels_section(sz, device, dry_run))
    with tempfile.TemporaryDirectory(prefix="trainlib-gpu-check-") as tmp:
        backend = init_world1(device, tmp)
        try:
            section(result, "data_parallel", lambda: data_parallel_section(sz, device, backend))
            section(result, "shard", lambda: shard_section(sz, device, deadline))
        finally:
            from trainlib.runtime import shutdown

            shutdown()
    result["wall_s"] = time.monotonic() - t0
    return result


def section(result: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """result[name] = fn(), or {"error": ...}: a GPU run is rare, so one failing section must not
    cost the figures of the others (main() still exits 1)."""
    try:
        result[name] = fn()
    except Exception as e:
        log_tail = traceback.format_exc().strip().splitlines()[-6:]
        result[name] = {"error": f"{type(e).__name__}: {e}"[:500], "traceback": log_tail}
        traceback.print_exc()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny sizes (CI); no GPU needed")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args(argv)
    # before triton is first imported: its interpreter runs the kernels on CPU tensors in a dry
    # run, and must be off on a GPU (it would run them in numpy, on copies of the CUDA tensors)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif os.environ.pop("TRITON_INTERPRET", None) is not None:
        print("gpu_check: unset TRITON_INTERPRET for the GPU run", file=sys.stderr)
    t0 = time.perf_counter()
    # stdout carries the one JSON and nothing else: from here on file descriptor 1 is stderr, so
    # that native output too (NCCL_DEBUG lines, Triton, gloo), even at exit, lands there
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    result = run(args.dry_run)
    result["meta"] = metadata("gpu_check", " ".join(["gpu_check.sh", *(argv or sys.argv[1:])]), args.dry_run,
                              time.perf_counter() - t0)
    text = json.dumps(result, default=str)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    with json_out:
        json_out.write(text + "\n")
    return 1 if any(isinstance(v, dict) and "error" in v for v in result.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
