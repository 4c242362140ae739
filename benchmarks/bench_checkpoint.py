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

Asynchronous saves ("async" in the result; 2 gloo ranks on CPU, each with its own copy of the
state, as `trainlib train` has): how long the training loop is held by one save, per candidate:
    sync_save        tl.checkpoint.save (the whole save blocks)
    trainlib_async   CheckpointWriter.save: snapshot into host buffers, then a background write
    dcp_async        torch.distributed.checkpoint.async_save of the same tensors (each rank's under
                     its own keys, so DCP writes what trainlib writes instead of deduplicating)
    trainlib_async_eager   the same with every tensor copied inside the call (no until=)
Each save call is followed by one training step, as in the trainer. Blocking = the call's wall
time plus, for trainlib_async (save(until=optimizer)), the time that step's optimizer waited for the
background copy; the max over ranks (the next collective waits for the slowest). next_step_s is that
step's time (background work competes with it for the CPU: on a 2-core machine running 2 ranks this
is where an asynchronous save costs). Then the save is waited for, untimed (its whole duration is
done_s), so no two saves overlap. Alternating repetitions, medians; target: trainlib_async <= 10%
of sync_save.
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
from trainlib.testing import run_ranks
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


def _async_ranks(overrides: list[str], reps: int, work: str) -> dict:
    """One rank's side of the async comparison (run by run_ranks on 2 gloo ranks)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from trainlib import comm
    from trainlib.checkpoint.async_save import CheckpointWriter
    from trainlib.checkpoint.layout import layout_of

    r = dist.get_rank()
    model, opt, sampler, counters, step = _setup(load_config(None, overrides))
    root = Path(work)
    writer = CheckpointWriter(root / "async", keep=2)
    # DCP's background thread runs collectives too: on the default group they would cross the
    # training's (a deadlock seen here), so it gets a gloo group of its own, as torchtitan gives it
    dcp_group = dist.new_group(backend="gloo")
    n = [0]

    def slowest(dt: float) -> float:
        t = torch.tensor([dt], dtype=torch.float64)
        comm.all_reduce(t, op="max")
        return float(t.item())

    names = ("sync_save", "trainlib_async", "trainlib_async_eager", "dcp_async")
    done: dict[str, list[float]] = {k: [] for k in names}
    next_step: dict[str, list[float]] = {k: [] for k in names}

    def candidate(name: str, call, finish):
        def timed() -> float:
            n[0] += 1
            comm.barrier()
            t0 = time.perf_counter()
            handle = call(n[0])
            blocked = time.perf_counter() - t0
            next_step[name].append(slowest(step()))
            blocked += writer.hook_wait_s if name == "trainlib_async" else 0.0
            finish(handle)
            done[name].append(slowest(time.perf_counter() - t0))
            return slowest(blocked)
        return timed

    def tl_sync(i: int) -> None:
        tl.checkpoint.save(root / "sync", i, resume.state_of(model, opt, sampler, counters), keep=2,
                           layout=layout_of(model))

    def tl_async(until):
        def call(i: int) -> None:
            writer.save(i, resume.state_of(model, opt, sampler, counters), layout=layout_of(model), until=until)
        return call

    def dcp_call(i: int):
        msd, osd = get_state_dict(model, opt)
        return dcp.async_save({f"rank{r}": {"model": msd, "optim": osd}}, checkpoint_id=str(root / "dcp" / str(i)),
                              process_group=dcp_group)

    def dcp_finish(fut) -> None:
        getattr(fut, "upload_completion", fut).result()
        comm.barrier()
        if r == 0:
            shutil.rmtree(root / "dcp" / str(n[0] - 4), ignore_errors=True)

    cands = {"sync_save": candidate("sync_save", tl_sync, lambda h: None),
             "trainlib_async": candidate("trainlib_async", tl_async(opt), lambda h: writer.wait()),
             "trainlib_async_eager": candidate("trainlib_async_eager", tl_async(None), lambda h: writer.wait()),
             "dcp_async": candidate("dcp_async", dcp_call, dcp_finish)}
    for c in cands.values():  # warm-up: buffers, DCP's planner caches
        c()
    for d in (done, next_step):
        for v in d.values():
            v.clear()
    base = [slowest(step()) for _ in range(3)]
    res = alternate(cands, reps)
    writer.close()
    for name in names:
        res[name]["done_median_s"] = sorted(done[name])[len(done[name]) // 2]
        res[name]["next_step_median_s"] = sorted(next_step[name])[len(next_step[name]) // 2]
    res["step_s"] = sorted(base)[1]
    shard = root / "sync" / f"step_{max(tl.checkpoint.list_steps(root / 'sync')):08d}"
    res["bytes_per_rank"] = (shard / f"rank{r}.safetensors").stat().st_size
    return res


def _measure_async(overrides: list[str], reps: int, work: Path) -> dict:
    res = run_ranks(_async_ranks, 2, overrides, reps, str(work), timeout_s=900, env={"TRAINLIB_TIMEOUT_S": "120"})[0]
    med = {k: res[k]["median_s"] for k in ("sync_save", "trainlib_async", "trainlib_async_eager", "dcp_async")}
    rounded = {k: {kk: (round(vv, 5) if isinstance(vv, float) else [round(x, 5) for x in vv])
                   for kk, vv in res[k].items()} for k in med}
    return {"ranks": 2, "bytes_per_rank": res["bytes_per_rank"], "step_s": round(res["step_s"], 5), **rounded,
            "blocking_ratio_async_eager_vs_sync": round(med["trainlib_async_eager"] / med["sync_save"], 4),
            "blocking_ratio_async_vs_sync": round(med["trainlib_async"] / med["sync_save"], 4),
            "blocking_ratio_dcp_async_vs_sync": round(med["dcp_async"] / med["sync_save"], 4),
            "blocking_ratio_async_vs_dcp_async": round(med["trainlib_async"] / med["dcp_async"], 4),
            "target_async_le_10pct_of_sync": med["trainlib_async"] <= 0.10 * med["sync_save"]}


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
        big = ["--model.d_model", "512", "--model.n_layer", "8", "--model.n_head", "8"]
        # --quick (CI: the code path, not the figures): one sequence per rank, 2 rounds
        out["async"] = {"default": _measure_async(["--train.batch_size", "2"] if quick else [], 2 if quick else reps,
                                                  work / "async-default")}
        if not quick:
            out["async"]["gpt_d512_l8"] = _measure_async(big, reps, work / "async-big")
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
    for name, a in out["async"].items():
        out["summary"][f"async_{name}"] = {
            k: a[k] for k in ("blocking_ratio_async_vs_sync", "blocking_ratio_async_eager_vs_sync",
                              "blocking_ratio_dcp_async_vs_sync",
                              "blocking_ratio_async_vs_dcp_async", "target_async_le_10pct_of_sync")}
        out["summary"][f"async_{name}"].update({f"{k}_blocking_s": a[k]["median_s"]
                                                for k in ("sync_save", "trainlib_async", "dcp_async")})
        out["summary"][f"async_{name}"]["step_s"] = a["step_s"]
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


def table_headline(s: dict) -> str:
    """This benchmark's line in `trainlib bench table` (benchmarks/README.md), from a result's summary."""
    from trainlib.benchmarks.harness import ratio_text

    return (f"{s['checkpoint_MB']} MB: save {s['save_s'] * 1e3:.1f} ms = {ratio_text(s['save_ratio_vs_torch_save_fsync'])} of "
            f"torch.save+fsync, load {ratio_text(s['load_ratio_vs_torch_load'])} of torch.load; "
            f"{s['save_share_at_every_100'] * 100:.2f}% of step time at every=100")
