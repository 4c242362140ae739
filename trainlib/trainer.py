"""`trainlib train`: the default job, and the training loop behind it.

    trainlib train                                # 2 local CPU ranks via torchrun, the default GPT
    trainlib train --nproc-per-node 4 --mesh.tp 2 --train.steps 100
    torchrun --nproc-per-node 2 -m trainlib.cli train    # the same, launched by hand / by a pod

Started without a launcher's RANK in the environment, it starts torchrun itself with
--nproc-per-node local processes and, once they finish, prints rank 0's summary as the last line
of stdout: one JSON object with steps, loss_first, loss_last, tokens_per_s, wall_s and
weights_sha256 (sha256 of the final weights, serialised in sorted-name order).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from . import comm
from . import rank_errors
from .config import Config, ConfigError, describe_flags, load_config
from .data import DistributedSampler, default_tokens
from .callbacks import Callback, fire, fire_error
from .checkpoint import resume
from .data_parallel import DataParallel
from .mesh import Mesh, MeshError
from .observe import step_stats
from .observe.sinks import sinks_from_config
from .observe.window import WindowStats, aggregate, totals
from .models.gpt import GPT
from .optim import DistributedOptimizer
from .compose import ParallelModel, lm_loss_fn, parallelize
from .precision import MixedPrecision
from .tensor_parallel import GPT_PLAN
from .runtime import LaunchError, current
from .errors import CollectiveMismatch, CollectiveTimeout
from .validate import check_run

EXIT_LOST_PEER = 138   # >= 128: retryable for Kubeflow's ExitCode restart policy (launchers/errors.py)

log = logging.getLogger("trainlib")

SUMMARY_ENV = "TRAINLIB_SUMMARY_PATH"


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) in sorted-name order: equal iff the weights are bitwise equal."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to 10% of train.lr."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_model(cfg: Config) -> GPT:
    return GPT(cfg.model, seed=cfg.train.seed)   # cfg.model is a GPTConfig


def _shard(cfg: Config) -> str | None:
    return None if cfg.dp.shard == "none" else cfg.dp.shard


def _activation_checkpointing(cfg: Config) -> str | None:
    return None if cfg.train.activation_checkpointing == "none" else cfg.train.activation_checkpointing


def wrap_data_parallel(model: nn.Module, cfg: Config, mesh: Mesh) -> nn.Module:
    """Wrap for data parallelism: torch DDP for sync.kind=ddp, else tl.DataParallel with build_sync(cfg)."""
    s = cfg.sync
    if _activation_checkpointing(cfg):
        from .activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model, _activation_checkpointing(cfg))
    if s.kind == "ddp":  # torch DDP, kept as the reference the benchmarks and tests compare against
        if _shard(cfg) or cfg.train.precision != "fp32":
            raise ConfigError("sync.kind=ddp (the torch DDP reference) has no dp.shard or train.precision; use "
                              "--sync.kind allreduce")
        return nn.parallel.DistributedDataParallel(model, process_group=mesh.group("dp"), bucket_cap_mb=s.bucket_mb)
    return DataParallel(model, mesh=mesh, sync=build_sync(cfg), bucket_mb=s.bucket_mb, shard=_shard(cfg),
                        mixed_precision=MixedPrecision.named(cfg.train.precision))


def build_sync(cfg: Config):
    """The one place that picks trainlib's gradient-sync backend from sync.kind (allreduce | ps)."""
    from .sync import AllReduce

    s = cfg.sync
    if s.kind == "allreduce":
        return AllReduce(bucket_mb=s.bucket_mb, compress=None if s.compress == "none" else s.compress,
                         transport=s.transport)
    from .sync import ParameterServer

    return ParameterServer(servers=[a.strip() for a in s.servers.split(",") if a.strip()] or None, mode=s.mode,
                           staleness=s.staleness, partition_mb=s.partition_mb, bucket_mb=s.bucket_mb)


def wrap(model: GPT, cfg: Config, mesh: Mesh) -> ParallelModel:
    """Every layout as one composed model (trainlib/compose.py): the training loop has one interface."""
    if mesh.size("pp") > 1 or mesh.size("tp") > 1:
        return wrap_parallel(model, cfg, mesh)  # PP split -> TP -> DP
    return parallelize(model, mesh, loss_fn=lm_loss_fn(mesh),
                       dp_wrapper=lambda local: wrap_data_parallel(local, cfg, mesh))


def wrap_parallel(model: GPT, cfg: Config, mesh: Mesh) -> ParallelModel:
    """pp > 1 or tp > 1: tl.parallelize with the default GPT plan; sync.kind picks the dp backend."""
    m, s = cfg.mesh, cfg.sync
    if s.kind == "ddp":
        raise ConfigError(f"sync.kind=ddp (torch DDP) cannot wrap pipeline or tensor-parallel stages ({mesh}); "
                          "use --sync.kind allreduce")
    from .pipeline import SCHEDULES

    if m.schedule not in SCHEDULES:
        raise ConfigError(f"mesh.schedule={m.schedule!r} is not one of {', '.join(SCHEDULES)}")
    microbatches = m.microbatches or 2 * mesh.size("pp")
    per_rank = cfg.train.batch_size // mesh.size("dp")
    if mesh.size("pp") > 1 and per_rank % microbatches:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} / dp {mesh.size('dp')} = {per_rank} sequences per "
                          f"rank is not divisible by mesh.microbatches={microbatches}; make it a multiple")
    return parallelize(model, mesh, tp_plan=GPT_PLAN, schedule=m.schedule, microbatches=microbatches,
                       loss_fn=lm_loss_fn(mesh), sync=build_sync(cfg), bucket_mb=s.bucket_mb, shard=_shard(cfg),
                       mixed_precision=MixedPrecision.named(cfg.train.precision),
                       activation_checkpointing=_activation_checkpointing(cfg))


def _mean_over(value: float, group) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    comm.all_reduce(t, op="avg", group=group)
    return float(t.item())


def train(cfg: Config, callbacks: list[Callback] | tuple[Callback, ...] = ()) -> dict:
    """Run the training loop on this rank; returns the summary (identical on every rank).

    `callbacks` (trainlib.Callback) are called on rank 0 only: before the first step, at every log
    window with the metrics record, after each checkpoint, at the end with the summary, and with
    the error if training raises. Rank 0 also writes the summary as summary.json beside
    train.metrics (what `trainlib report` reads)."""
    live: list[Callback] = []   # the callbacks actually started (rank 0's, sinks included)
    try:
        summary = _train(cfg, callbacks, live)
    except BaseException as e:
        fire_error(live, e)
        raise
    rt = current()
    if rt is not None and rt.is_main:
        _write_summary(cfg, summary)
    return summary


def _write_summary(cfg: Config, summary: dict) -> None:
    path = Path(cfg.train.metrics).with_name("summary.json")
    # the temporary name is this process's own: two runs sharing a metrics directory must not
    # rename each other's file away (the later one wins summary.json, neither crashes)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, path)   # a report never reads half a summary


def _train(cfg: Config, callbacks: list[Callback] | tuple[Callback, ...], live: list[Callback]) -> dict:
    import trainlib as tl

    rt = tl.init()
    mesh = Mesh(pp=cfg.mesh.pp, dp=cfg.mesh.dp, tp=cfg.mesh.tp)
    torch.manual_seed(cfg.train.seed + rt.rank)
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model = wrap(model, cfg, mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    # sharded / mixed precision: AdamW steps this rank's fp32 master slices (a pass-through otherwise)
    opt = DistributedOptimizer(torch.optim.AdamW(params, lr=cfg.train.lr, betas=(0.9, 0.95),
                                                 weight_decay=cfg.train.weight_decay), model)
    tokens = default_tokens(cfg.train.corpus_bytes)
    sampler = DistributedSampler(tokens, cfg.model.seq_len, cfg.train.batch_size, mesh.rank("dp"), mesh.size("dp"),
                                 seed=cfg.train.seed)
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    metrics = _open_metrics(cfg) if rt.is_main else None
    bar = _progress(cfg, rt.is_main)
    dp_group = mesh.group("dp")
    if rt.is_main:
        log.info("training GPT (%d params) on %d ranks, %s, sync=%s", n_params, rt.world_size, mesh, cfg.sync.kind)

    # counters a resumed run must continue from (checkpointed with the weights; see checkpoint/resume.py)
    counters = {"loss_first": float("nan"), "window_loss": 0.0, "window_steps": 0, "nonfinite_skipped": 0}
    start, counters = resume.restore(cfg.checkpoint, model, opt, sampler, counters)
    loss_first, loss_last = counters["loss_first"], float("nan")
    callbacks = (*sinks_from_config(cfg), *callbacks) if rt.is_main else ()   # --observe.* sinks
    live.extend(callbacks)
    fire(callbacks, "on_train_start", cfg, {"world_size": rt.world_size, "mesh": dict(mesh.layout.__dict__),
                                            "params": n_params, "start_step": start})
    # the step breakdown (observe/step_stats.py): this rank's sums over the log window and the run
    model.observe = cfg.observe.breakdown
    step_stats.abandon_step()   # a step left open by an earlier train() in this process that raised
    window_stats, run_stats = (WindowStats(), WindowStats()) if model.observe else (None, None)
    if model.observe:
        step_stats.reset_peak_memory()
    profiler = _profiler(cfg, rt.rank)
    phase = step_stats.phase
    t_start = window_start = time.perf_counter()
    window_loss, window_steps = counters["window_loss"], counters["window_steps"]
    for step in range(start, cfg.train.steps):
        if profiler is not None:
            profiler.before_step(step + 1)
        rec = model.open_step()   # None when --observe.breakdown is off
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with phase("data"):
            x, y = sampler.next_batch()
        loss = model.step(x, y)  # forward + backward (pipeline schedule, vocab-parallel loss, loss scale inside)
        with phase("optimizer"):
            _optimizer_step(model, opt, cfg, step, counters)
        window_loss += loss.item()   # inside the step: on GPU this is where the step's kernels finish
        if rec is not None:
            stats = model.close_step(rec)
            window_stats.add(stats)
        if profiler is not None:
            profiler.after_step(step + 1)
        window_steps += 1
        last = step == cfg.train.steps - 1
        if step == 0 or last or (step + 1) % cfg.train.log_every == 0:
            mean_loss = _mean_over(window_loss / window_steps, dp_group)
            now = time.perf_counter()
            tps = window_steps * tokens_per_step / max(now - window_start, 1e-9)
            if step == 0:
                loss_first = mean_loss
            loss_last = mean_loss
            record = {"step": step + 1, "loss": round(mean_loss, 5), "lr": lr_at(step, cfg),
                      "tokens_per_s": round(tps, 1), "elapsed_s": round(now - t_start, 3)}
            if window_stats is not None:   # one small all-gather per window, not per step
                record.update(aggregate(window_stats.gather()))
                run_stats.merge(window_stats)
                window_stats.reset()
                step_stats.reset_peak_memory()
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            fire(callbacks, "on_log", record)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tps:,.0f}")
            elif rt.is_main:
                log.info("step %d/%d loss %.4f tokens/s %.0f", step + 1, cfg.train.steps, mean_loss, tps)
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        counters.update(loss_first=loss_first, window_loss=window_loss, window_steps=window_steps)
        if resume.after_step(cfg.checkpoint, step + 1, cfg.train.steps, model, opt, sampler, counters):
            fire(callbacks, "on_checkpoint", step + 1, cfg.checkpoint.dir)
        if bar is not None:
            bar.update(1)
    wall = time.perf_counter() - t_start
    if profiler is not None:
        profiler.close()   # training ended inside the window: write what was traced
    if bar is not None:
        bar.close()
    if metrics:
        metrics.close()
    state = model.full_state_dict()
    summary = {"steps": cfg.train.steps, "loss_first": round(loss_first, 6), "loss_last": round(loss_last, 6),
               "tokens_per_s": round(cfg.train.steps * tokens_per_step / wall, 1), "wall_s": round(wall, 3),
               "weights_sha256": weights_sha256(state), "world_size": rt.world_size,
               "mesh": mesh.layout.__dict__, "sync": cfg.sync.kind, "params": n_params,
               "nonfinite_skipped": counters["nonfinite_skipped"], "resumed_from": counters.get("resumed_from")}
    if run_stats is not None:   # this process's steps: per-step means (the record's keys) and totals
        rows = run_stats.gather()
        summary["breakdown"] = aggregate(rows)
        summary["breakdown"]["totals"] = totals(rows, summary["breakdown"])
    model.close()
    fire(callbacks, "on_train_end", summary)
    return summary


def _optimizer_step(model: ParallelModel, opt: DistributedOptimizer, cfg: Config, step: int,
                    counters: dict) -> None:
    """Clip (or measure) the gradient norm, step unless it is non-finite, zero the gradients."""
    norm = model.clip_grad_norm_(cfg.train.grad_clip) if cfg.train.grad_clip > 0 else model.grad_norm()
    if torch.isfinite(norm):  # dp-averaged gradients: every rank takes the same branch
        opt.step()
    elif opt.dynamic_loss_scale:  # fp16 overflow: the optimizer skips the step and halves the scale
        opt.step()
    elif cfg.train.nonfinite == "raise":
        raise FloatingPointError(f"step {step + 1}: gradient norm is {float(norm)}; lower train.lr or set "
                                 "--train.nonfinite=skip to skip such steps")
    else:
        counters["nonfinite_skipped"] += 1
        log.warning("step %d: non-finite gradient norm (%s); step skipped (%d so far)", step + 1, float(norm),
                    counters["nonfinite_skipped"])
    opt.zero_grad(set_to_none=True)


def _profiler(cfg: Config, rank: int):
    """--profile.steps A:B: a torch profiler trace of those steps on this rank (observe/profile.py)."""
    if cfg.profile.window is None:
        return None
    from .observe.profile import StepProfiler

    first, last = cfg.profile.window
    if first > cfg.train.steps:
        log.warning("profile.steps=%s starts after the last step (train.steps=%d): no trace", cfg.profile.steps,
                    cfg.train.steps)
        return None
    return StepProfiler(first, last, cfg.profile.dir, rank)


def _open_metrics(cfg: Config):
    path = Path(cfg.train.metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w")


def _progress(cfg: Config, main: bool):
    if not main or os.environ.get("TRAINLIB_NO_PROGRESS"):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.train.steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainlib train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the default GPT. Started by hand it checks the whole configuration, then launches "
                    "--nproc-per-node local ranks through torchrun; inside torchrun (RANK set) it runs as one rank. "
                    "A bad value exits 1 with one line naming it and the fix.",
        epilog="config overrides (--section.key=value or --section.key value; defaults shown):\n" + describe_flags())
    p.add_argument("--config", help="TOML file with [train] [model] [mesh] [sync] ... tables")
    p.add_argument("--nproc-per-node", type=int, default=2, help="local processes to start (default 2)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun restarts the local ranks this often after a failure; with --checkpoint.dir "
                        "they resume from the latest checkpoint (default 0)")
    p.add_argument("--debug", action="store_true", help="print the traceback behind an error (every rank)")
    return p


# a user can fix these: one line naming the value and the fix, exit 1 (permanent for Kubeflow)
USER_ERRORS = (ConfigError, MeshError, LaunchError, FloatingPointError, resume.CheckpointError, CollectiveMismatch)
# a peer or a server was lost: infrastructure, so retryable (Kubeflow's ExitCode policy and
# torchrun's --max-restarts restart the job, which resumes from its last checkpoint)
LOST_PEER_ERRORS = (CollectiveTimeout,   # includes PSTimeout and PipelineTimeout (trainlib.errors)
                    # a peer that never joined the process group (its node died before init)
                    *(getattr(torch.distributed, n) for n in ("DistStoreError", "DistNetworkError")
                      if hasattr(torch.distributed, n)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = _parser().parse_known_args(argv)
    if args.debug:
        os.environ[rank_errors.DEBUG_ENV] = "1"  # the ranks inherit it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config, overrides)
        if args.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node={args.nproc_per_node} must be >= 1")
        if args.max_restarts < 0:
            raise ConfigError(f"--max-restarts={args.max_restarts} must be >= 0")
        if "RANK" not in os.environ and args.nproc_per_node > 1:
            _warn(check_run(cfg, args.nproc_per_node))  # everything knowable before a rank starts
            return _launch_local(argv, args.nproc_per_node, args.max_restarts)
        if os.environ.get(rank_errors.VALIDATED_ENV) != "1":  # no trainlib launcher checked this run
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
            nodes = max(1, world // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)))
            # a rank in a pod may start before the servers' pods exist: it does not look their names up
            warnings = check_run(cfg, world, nodes, resolve="RANK" not in os.environ)
            if os.environ.get("RANK", "0") == "0":
                _warn(warnings)
    except (*USER_ERRORS, ValueError) as e:  # before training: every rank sees the same bad value
        rank_errors.report(f"trainlib train: error: {e}", e)
        return 1
    return _run_rank(cfg)


def preflight(argv: list[str], world_size: int, nodes: int = 1, env: dict[str, str] | None = None,
              resolve: bool = True) -> list[str]:
    """Check `trainlib train ARGV` for a job of world_size ranks, as a launcher does before it starts
    them (trainlib launch); returns warnings, raises ConfigError naming the value and the fix."""
    return check_run(config_from_argv(argv), world_size, nodes, env, resolve)


def config_from_argv(argv: list[str]) -> Config:
    """The Config that `trainlib train ARGV` would run; ConfigError for a bad value or flag."""
    try:
        args, overrides = _parser().parse_known_args(argv)
    except SystemExit:  # argparse printed the usage error
        raise ConfigError(f"trainlib train {' '.join(argv)}: bad arguments (see the usage above)") from None
    return load_config(args.config, overrides)


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        print(f"trainlib train: warning: {w}", file=sys.stderr, flush=True)


def _run_rank(cfg: Config) -> int:
    """Train on this rank; an error becomes one line from the first failing rank (rank_errors)."""
    try:
        summary = train(cfg)
    except USER_ERRORS as e:
        rank_errors.report(f"trainlib train: error: {e}", e)
        return 1
    except LOST_PEER_ERRORS as e:
        rank_errors.report(f"trainlib train: lost a peer: {e}", e)
        return EXIT_LOST_PEER
    except Exception as e:  # a bug, not a bad value: the first failing rank shows its traceback
        if rank_errors.report(f"trainlib train: {type(e).__name__}: {e}; the traceback is above", e,
                              print_line=False) and not rank_errors.debug_enabled():
            traceback.print_exception(e, file=sys.stderr)
        return 1
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        out = os.environ.get(SUMMARY_ENV)
        if out:
            Path(out).write_text(json.dumps(summary))
        else:
            print(json.dumps(summary), flush=True)
    from .runtime import shutdown

    # every rank leaves the group only once all are done with it: a rank that destroyed its group while
    # a slower one was still in the run's last collectives (the final gathers, a sync's close) gave that
    # one a lost peer (exit 138) and itself a C++ "terminate called" from the group's threads
    if dist.is_available() and dist.is_initialized():
        try:
            comm.barrier()
        except LOST_PEER_ERRORS as e:
            log.warning("trainlib train: a peer left before the final barrier (%s); the run itself finished", e)
    shutdown()
    return 0


def _torchrun_argv(argv: list[str], nproc: int, max_restarts: int) -> list[str]:
    """torchrun's arguments for `trainlib train ARGV` on this machine, minus our launcher flags."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc-per-node", "--max-restarts"):
            skip = True
            continue
        if a.startswith(("--nproc-per-node=", "--max-restarts=")):
            continue
        rest.append(a)
    return ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            "-m", "trainlib.cli", "train", *rest]


def _launch_local(argv: list[str], nproc: int, max_restarts: int = 0) -> int:
    """Start `nproc` local ranks through torchrun's agent (in this process, as `trainlib launch`
    does, so its failure is ours to word) and print rank 0's summary as the last stdout line."""
    with tempfile.TemporaryDirectory(prefix="trainlib-train-") as tmp:
        summary_path = os.path.join(tmp, "summary.json")
        threads = max(1, (os.cpu_count() or 1) // nproc)
        os.environ.update({SUMMARY_ENV: summary_path, rank_errors.ERROR_DIR_ENV: tmp,
                           rank_errors.VALIDATED_ENV: "1",
                           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))})
        rc = _run_agent(_torchrun_argv(argv, nproc, max_restarts))
        if rc != 0:
            line = (rank_errors.first_error(tmp)
                    or f"trainlib train: the local ranks failed or were stopped (exit code {rc})")
            print(line, file=sys.stderr, flush=True)
            return rc
        with contextlib.suppress(FileNotFoundError):
            print(Path(summary_path).read_text(), flush=True)
            return 0
        print("trainlib train: rank 0 wrote no summary", file=sys.stderr)
        return 1


def _run_agent(torchrun_argv: list[str]) -> int:
    """torch.distributed.run in-process; 0, or the first failed rank's exit code (1 for a user error,
    >= 128 for a lost peer or a signal, as launchers/errors.py classifies them)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from .launchers.errors import classify_worker_exit

    if not rank_errors.debug_enabled():  # the agent's own report repeats what the rank said
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(torchrun_argv))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return classify_worker_exit(failure.exitcode)
    except Exception as e:
        if type(e).__name__ != "SignalException":  # the agent itself was stopped (Ctrl-C, SIGTERM)
            raise
        return 128 + int(getattr(e, "sigval", 15))
    return 0
