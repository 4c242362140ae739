"""Checkpoint cost: trainlib's atomic, checksummed save/load vs torch.save/torch.load of the same state.

    trainlib bench checkpoint [--quick]

State: the default job's GPT (trainer.build_model with the default config) after one AdamW step
(weights + exp_avg + exp_avg_sq + step counts), the sampler position and the RNG states, i.e.
exactly what `trainlib train --checkpoint.dir D` writes per rank. Non-quick adds a larger GPT
(d_model 512, 8 layers) to show throughput once fixed costs stop dominating.

Candidates, alternating rounds, medians:
    trainlib_save  tl.checkpoint.save: safetensors + JSON, sha256, fsync of files and directories,
                   manifest, rename, `latest` pointer, prune to keep=2
    torch_save     torch.save(state, path) (the baseline; no fsync, no checksum, not atomic)
    torch_save_fsync  the baseline plus one fsync, to separate durability cost from format cost
    trainlib_load  tl.checkpoint.load: read, verify sha256 of every file, parse, restore RNG
    torch_load     torch.load(path, weights_only=True)

Share of step time at the default cadence = save_s / (checkpoint.every * step_s), with step_s the
median time of one training step of the same model on one process at the default per-rank batch
(train.batch_size / 2 ranks), measured in the same run.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import trainlib as tl
from trainlib.benchmarks.harness import alternate
from trainlib.checkpoint import resume
from trainlib.config import Config, load_config
from trainlib.data import DistributedSampler, default_tokens
from trainlib.models.gpt import lm_loss
from trainlib.trainer import build_model

MB = 1024 * 1024


def _setup(cfg: Config):
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95))
    tokens = default_tokens(1 << 18)
    local_batch = max(1, cfg.train.batch_size // 2)
    sampler = DistributedSampler(tokens, cfg.model.seq_len, local_batch, seed=0)

    def step() -> float:
        t0 = time.perf_counter()
        x, y = sampler.next_batch()
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step()  # the optimizer state exists from here on
    counters = {"loss_first": 5.5, "window_loss": 0.0, "window_steps": 0, "nonfinite_skipped": 0}
    return model, opt, sampler, counters, step


def _measure(cfg: Config, reps: int, work: Path) -> dict:
    model, opt, sampler, counters, step = _setup(cfg)
    steps_s = sorted(step() for _ in range(max(3, reps)))
    step_s = steps_s[len(steps_s) // 2]
    root, tpath = work / "tl", work / "torch.pt"
    n = [0]

    def tl_save() -> float:
        n[0] += 1
        t0 = time.perf_counter()
        tl.checkpoint.save(root, n[0], resume.state_of(model, opt, sampler, counters), keep=2)
        return time.perf_counter() - t0

    def torch_save() -> float:
        t0 = time.perf_counter()
        torch.save({**resume.state_of(model, opt, sampler, counters), "rng": tl.checkpoint.rng.capture()}, tpath)
        return time.perf_counter() - t0

    def torch_save_fsync() -> float:
        t0 = time.perf_counter()
        with open(tpath, "wb") as f:
            torch.save({**resume.state_of(model, opt, sampler, counters), "rng": tl.checkpoint.rng.capture()}, f)
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - t0

    def tl_load() -> float:
        t0 = time.perf_counter()
        ck = tl.checkpoint.load(root)
        dt = time.perf_counter() - t0
        assert ck is not None and ck.step == n[0]
        return dt

    def torch_load() -> float:
        t0 = time.perf_counter()
        torch.load(tpath, weights_only=True)
        return time.perf_counter() - t0

    tl_save(), torch_save()  # warm-up, and something to load
    saves = alternate({"trainlib_save": tl_save, "torch_save": torch_save, "torch_save_fsync": torch_save_fsync},
                      reps)
    loads = alternate({"trainlib_load": tl_load, "torch_load": torch_load}, reps)
    shard = root / f"step_{n[0]:08d}"
    tl_bytes = sum(p.stat().st_size for p in shard.iterdir())
    every = Config().checkpoint.every
    res = {name: {k: (round(v, 5) if isinstance(v, float) else [round(x, 5) for x in v]) for k, v in d.items()}
           for name, d in {**saves, **loads}.items()}
    med = {k: v["median_s"] for k, v in {**saves, **loads}.items()}
    return {
        "model": {"d_model": cfg.model.d_model, "n_layer": cfg.model.n_layer, "seq_len": cfg.model.seq_len,
                  "params": sum(p.numel() for p in model.parameters())},
        "checkpoint_bytes": tl_bytes, "torch_save_bytes": tpath.stat().st_size,
        "step_s": round(step_s, 5), "every": every, **res,
        "save_ratio_vs_torch_save": round(med["trainlib_save"] / med["torch_save"], 3),
        "save_ratio_vs_torch_save_fsync": round(med["trainlib_save"] / med["torch_save_fsync"], 3),
        "load_ratio_vs_torch_load": round(med["trainlib_load"] / med["torch_load"], 3),
        "save_MBps": round(tl_bytes / MB / med["trainlib_save"], 1),
        "load_MBps": round(tl_bytes / MB / med["trainlib_load"], 1),
        "save_share_of_step_time": round(med["trainlib_save"] / (every * step_s), 5),
        "load_share_of_run": "once per (re)start",
    }


def run(quick: bool) -> dict:
    torch.set_num_threads(1)
    configs = {"default": load_config(None, [])}
    if not quick:
        configs["gpt_d512_l8"] = load_config(None, ["--model.d_model", "512", "--model.n_layer", "8",
                                                    "--model.n_head", "8"])
    reps = 3 if quick else 9
    out = {}
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    try:
        for name, cfg in configs.items():
            out[name] = _measure(cfg, reps, work / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    d = out["default"]
    out["summary"] = {
        "params": d["model"]["params"], "checkpoint_MB": round(d["checkpoint_bytes"] / MB, 2),
        "save_s": d["trainlib_save"]["median_s"], "torch_save_s": d["torch_save"]["median_s"],
        "load_s": d["trainlib_load"]["median_s"], "torch_load_s": d["torch_load"]["median_s"],
        "save_ratio_vs_torch_save": d["save_ratio_vs_torch_save"],
        "save_ratio_vs_torch_save_fsync": d["save_ratio_vs_torch_save_fsync"],
        "load_ratio_vs_torch_load": d["load_ratio_vs_torch_load"], "step_s": d["step_s"],
        "save_share_at_every_%d" % d["every"]: d["save_share_of_step_time"],
    }
    return out


def plot(result: dict, path: str) -> None:
    """Median seconds per candidate, one group of bars per model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["trainlib_save", "torch_save", "torch_save_fsync", "trainlib_load", "torch_load"]
    models = [k for k in result if isinstance(result[k], dict) and "trainlib_save" in result[k]]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        r = result[m]
        ax.bar(names, [r[n]["median_s"] for n in names], color=["C0", "C1", "C1", "C0", "C1"])
        ax.set_title(f"{m}: {r['model']['params'] / 1e6:.1f}M params, {r['checkpoint_bytes'] / MB:.0f} MB")
        ax.set_ylabel("median seconds")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
