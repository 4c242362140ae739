"""Distributed hyper-parameter search with Ray Tune over trainlib runs, reported step by step.

    import ray
    from ray import tune
    from trainlib.launchers.tune import search
    ray.init()
    results = search({"train.lr": tune.loguniform(1e-4, 1e-2), "train.steps": 200, "train.log_every": 10},
                     num_samples=8, workers_per_trial=2,
                     scheduler=tune.schedulers.ASHAScheduler(time_attr="step", max_t=200, grace_period=20))
    best = results[0]      # sorted by `metric` (default: the run's last loss), best first

Each trial is a complete trainlib run on `workers_per_trial` Ray actors: Tune reserves one
placement group per trial (an empty head bundle for the trial itself, which only coordinates, plus
one bundle per worker), and trainlib.launchers.ray starts the ranks inside that group, so a
trial's ranks are gang scheduled and trials never steal each other's workers.

Per step: rank 0's trainer pushes every log record (step, loss, tokens_per_s, ...; every
train.log_every steps) and every checkpoint it writes into a Ray queue (trainlib.Callback); the
trial drains it and calls tune.report once per record — `loss_last` is the record's loss, so
schedulers compare trials on the metric the final ranking uses — with a Tune Checkpoint of the
trainlib checkpoint written since the previous record (checkpoint_step says which). The last report
also carries the run's summary (weights_sha256, resumed_from, ...) and done=True. Give schedulers
time in steps (time_attr="step", max_t=train.steps): a run reports at step 1 and then every
log_every steps, so a max_t counted in reports (training_iteration) can stop it one report short. A trial restored from a Tune
checkpoint (PopulationBasedTraining's exploit, a trial restart) copies it into a fresh trainlib
checkpoint directory, and trainlib resumes from it with the trial's (possibly new) config: the
learning rate is recomputed from train.lr every step. When Tune stops a trial (ASHA), the trial's
report raises SystemExit and the workers are killed; they are also owned by the trial's actor, so
Ray kills them with it.

Checkpoints live under config["checkpoint.dir"]/<trial id> when the search sets one (use shared
storage for multi-node trials), else in a local temporary directory removed when the trial ends;
set checkpoint.every (a multiple of train.log_every) for PBT to have something to exploit.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from trainlib.callbacks import Callback
from trainlib.launchers import ray as tl_ray

log = logging.getLogger("trainlib")


class QueueReporter(Callback):
    """Rank 0's trainer -> the trial: log records and checkpoint notices, in order, through a Ray queue."""

    def __init__(self, queue: Any):
        self.queue = queue

    def on_log(self, record: dict[str, Any]) -> None:
        self.queue.put(("log", dict(record)))

    def on_checkpoint(self, step: int, directory: str) -> None:
        self.queue.put(("checkpoint", int(step), str(directory)))


def _train_reporting(fn: Callable[..., dict], queue: Any, config: dict) -> dict:
    """One rank of a per-step trial: fn(config, callbacks=[QueueReporter]) (callbacks fire on rank 0)."""
    return fn(config, callbacks=[QueueReporter(queue)])


def train_trainlib(config: dict, callbacks: list[Callback] | tuple[Callback, ...] = ()) -> dict:
    """trainlib's default job with callbacks (tl_ray.train_trainlib takes none: its signature is fn(config))."""
    from trainlib.config import load_config
    from trainlib.trainer import train

    return train(load_config(None, [f"--{k}={v}" for k, v in config.items()]), callbacks=callbacks)


def _per_step(fn: Callable) -> Callable | None:
    """The function a trial runs for per-step reports, or None when fn cannot take callbacks."""
    if fn is tl_ray.train_trainlib:
        return train_trainlib
    return fn if "callbacks" in inspect.signature(fn).parameters else None


def _report(metrics: dict, checkpoint: Any = None) -> None:
    from ray import tune

    report = getattr(tune, "report", None)
    if report is None:  # Ray < 2.40 reported through ray.train
        from ray.train import report
    report(metrics, checkpoint=checkpoint) if checkpoint is not None else report(metrics)


class _Reporter:
    """Turns the queue's events into tune.report calls: one per log record, each sent once the next
    event shows whether a checkpoint of its step follows (the trainer logs a step before saving it)."""

    def __init__(self, ckdir: str, restored: dict | None = None):
        self.ckdir = ckdir
        self.record: dict | None = None
        self.ck_step: int | None = None
        # the metrics of the checkpoint this start was restored from: a run resumed at its last step
        # logs nothing, and its final report still needs a loss
        self.restored = restored

    def event(self, ev: tuple) -> None:
        if ev[0] == "checkpoint":
            self.ck_step = ev[1]
            return
        if self.record is not None:
            self._send(self.record)
        self.record = ev[1]

    def finish(self, summary: dict) -> None:
        last = self.record or self.restored or {}
        metrics = {**last, **summary}
        if not math.isfinite(float(metrics.get("loss_last", math.nan))) and "loss_last" in last:
            metrics["loss_last"] = last["loss_last"]
        # done: the trial is over, so no scheduler decides on (PBT: restarts) this last report
        self._send({**metrics, "done": True})

    def _send(self, metrics: dict) -> None:
        metrics = {**metrics, "loss_last": metrics.get("loss_last", metrics.get("loss"))}
        step, self.ck_step = self.ck_step, None
        staged = _stage(self.ckdir, step, metrics) if step is not None else None
        if staged is None:
            _report(metrics)
            return
        from ray.tune import Checkpoint

        try:
            _report({**metrics, "checkpoint_step": step}, Checkpoint.from_directory(staged))
        finally:  # Tune copied it into the trial's storage during report()
            shutil.rmtree(staged, ignore_errors=True)


RECORD = "tune_record.json"


def _stage(ckdir: str, step: int, metrics: dict) -> str | None:
    """A directory holding only trainlib checkpoint `step`, a `latest` naming it and the metrics
    reported with it (RECORD): a Tune checkpoint."""
    from trainlib.checkpoint.backends import LATEST, is_s3, step_name

    if is_s3(ckdir):
        return None  # already durable and shared: Tune's copy is for local directories
    staged = tempfile.mkdtemp(prefix="trainlib-tune-ckpt-")
    try:
        shutil.copytree(Path(ckdir) / step_name(step), Path(staged) / step_name(step))
    except FileNotFoundError:  # pruned (checkpoint.keep) before the trial got to it
        shutil.rmtree(staged, ignore_errors=True)
        log.warning("trial: checkpoint step %d under %s is gone (pruned); reported without it", step, ckdir)
        return None
    (Path(staged) / LATEST).write_text(step_name(step) + "\n")
    (Path(staged) / RECORD).write_text(json.dumps({k: v for k, v in metrics.items() if k != "done"}, default=str))
    return staged


def _trial_checkpoint_dir(config: dict, trial_id: str) -> tuple[str, bool]:
    """(a fresh trainlib checkpoint directory for this trial start, whether it is a temporary one)."""
    base = config.get("checkpoint.dir")
    if base:
        return f"{str(base).rstrip('/')}/{trial_id}-{uuid.uuid4().hex[:8]}", False
    return tempfile.mkdtemp(prefix=f"trainlib-tune-{trial_id}-"), True


def _trial(fn: Callable[[dict], dict], workers: int, timeout_s: float,
           bundle: dict[str, float]) -> Callable[[dict], None]:
    def trainable(config: dict) -> None:
        from ray import tune
        from ray.util import get_current_placement_group

        pg = get_current_placement_group()
        step_fn = _per_step(fn)
        if step_fn is None:  # a function without callbacks: its final summary only
            results = tl_ray.run(fn, workers, config, resources_per_worker=bundle, placement_group=pg,
                                 timeout_s=timeout_s)
            _report(dict(results[0]))
            return
        trial_id = tune.get_context().get_trial_id() or "trial"
        ckdir, temporary = _trial_checkpoint_dir(config, trial_id)
        restored, record = tune.get_checkpoint(), None
        if restored is not None:  # PBT exploit or a trial restart: trainlib resumes from it
            with restored.as_directory() as d:
                shutil.copytree(d, ckdir, dirs_exist_ok=True)
            path = Path(ckdir) / RECORD
            record = json.loads(path.read_text()) if path.exists() else None
        try:
            _run_trial(step_fn, workers, {**config, "checkpoint.dir": ckdir}, pg, bundle, timeout_s, record)
        finally:
            if temporary:
                shutil.rmtree(ckdir, ignore_errors=True)

    return trainable


def _run_trial(fn: Callable[..., dict], workers: int, config: dict, pg: Any, bundle: dict[str, float],
               timeout_s: float, restored: dict | None) -> None:
    import ray
    from ray.util.queue import Empty, Queue

    # num_cpus=0: the queue must not need a CPU outside the trial's placement group
    queue = Queue(actor_options={"num_cpus": 0})
    group = None
    try:
        group = tl_ray.start_group(functools.partial(_train_reporting, fn, queue), pg, False, workers, config,
                                   bundle, {}, timeout_s)
        reporter, deadline = _Reporter(config["checkpoint.dir"], restored), time.monotonic() + timeout_s
        pending = list(group.refs)
        while True:
            try:  # a short wait, so that a finished (or failed) group is noticed
                events = [queue.get(timeout=0.5)] + queue.get_nowait_batch(queue.qsize())
            except Empty:
                events = []
            for ev in events:
                reporter.event(ev)
            if pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                failures = tl_ray._failures(done)
                if failures:  # the others would wait for a peer that is gone
                    raise failures[0]
            if not pending and not events and queue.empty():
                break
            if time.monotonic() > deadline:
                raise tl_ray.LaunchInfraError(f"trial still running after {timeout_s:.0f}s (timeout_s)")
        results = ray.get(group.refs)  # re-raises a worker's failure
        reporter.finish(dict(results[0]))
    finally:  # also on SystemExit from tune.report when the scheduler stops this trial
        if group is not None:
            group.shutdown()
        ray.kill(queue.actor, no_restart=True)


def search(param_space: dict[str, Any], num_samples: int = 1, workers_per_trial: int = 1,
           fn: Callable[[dict], dict] = tl_ray.train_trainlib, metric: str = "loss_last", mode: str = "min",
           resources_per_worker: dict[str, float] | None = None, max_concurrent: int | None = None,
           timeout_s: float = 3600.0, storage_path: str | None = None, scheduler: Any = None,
           max_failures: int = 0, verbose: int | None = None, reuse_actors: bool = True) -> list[dict]:
    """Run the search; return every trial's final report, best first. A failed trial raises.

    `scheduler`: a Tune trial scheduler (ASHAScheduler, PopulationBasedTraining, ...) that decides on
    the per-step reports; its metric and mode come from `metric` and `mode` here. `max_failures`:
    Tune restarts a failed trial this often, from its last reported checkpoint. `verbose`: Tune's
    console output (0 silent, 1 status tables; default Tune's). `reuse_actors`: a trial's
    coordinating actor serves the next trial (or PBT's restart of the same one) instead of a fresh
    process importing torch again; its workers are always new."""
    from ray import tune

    bundle = dict(resources_per_worker or {"CPU": 1})
    pgf = tune.PlacementGroupFactory([{}] + [dict(bundle) for _ in range(workers_per_trial)])
    trainable = tune.with_resources(_trial(fn, workers_per_trial, timeout_s, bundle), pgf)
    run_config: dict[str, Any] = {"storage_path": storage_path} if storage_path else {}
    if max_failures:
        run_config["failure_config"] = tune.FailureConfig(max_failures=max_failures)
    if verbose is not None:
        run_config["verbose"] = verbose
    tuner = tune.Tuner(trainable, param_space=param_space,
                       tune_config=tune.TuneConfig(num_samples=num_samples, metric=metric, mode=mode,
                                                   scheduler=scheduler, max_concurrent_trials=max_concurrent,
                                                   reuse_actors=reuse_actors,
                                                   time_budget_s=timeout_s),
                       run_config=tune.RunConfig(**run_config) if hasattr(tune, "RunConfig") else None)
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(grid)} trials failed; first: {errors[0]}")
    rows = [dict(r.metrics) for r in grid]
    return sorted(rows, key=lambda m: m[metric], reverse=(mode == "max"))
