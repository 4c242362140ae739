"""Run a torch.distributed training function on N Ray workers reserved together (gang scheduled),
restarting the group from the latest trainlib checkpoint when a worker or its node dies.

    import ray
    from trainlib.launchers import ray as tl_ray
    ray.init()                                           # or ray.init(address="auto") on a cluster
    results = tl_ray.run(tl_ray.train_trainlib, num_workers=4,
                         config={"train.steps": 100}, resources_per_worker={"CPU": 4, "GPU": 1},
                         max_failures=3, checkpoint_dir="/shared/ckpt", min_workers=2)
    results.restarts                                     # how many times the group was restarted

How it works (the same steps Ray Train takes for torch):
1. A placement group with one bundle per worker is reserved first, so either all N workers get
   their resources or none start: no half-started job blocks the cluster (gang scheduling).
   PACK keeps workers on few nodes (fast intra-node links); SPREAD puts one per node.
2. One actor per bundle. Rank 0's actor reports its node IP and a free port: the rendezvous.
3. Every actor gets RANK, WORLD_SIZE, LOCAL_RANK (its index among actors on the same node),
   LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, then calls fn(config); fn calls tl.init(), which
   reads exactly those variables (the torchrun path). With GPU bundles Ray sets
   CUDA_VISIBLE_DEVICES per actor, and tl.init picks cuda:LOCAL_RANK % visible devices.
4. Results come back in rank order. The first failing worker fails the attempt (the others are
   killed, they would only wait for a peer that is gone); `timeout_s` bounds the whole run.
5. Fault tolerance (Ray Train's FailureConfig, for trainlib checkpoints): a failure is retryable
   when a worker's process or node died (RayActorError, WorkerCrashedError, NodeDiedError) or a
   rank lost its peer (CollectiveTimeout and the other errors `trainlib train` exits >= 128 for).
   Then the group is torn down, a new placement group is reserved and fn runs again with
   config["checkpoint.dir"] = checkpoint_dir, so trainlib resumes from its latest checkpoint, up to
   `max_failures` times. A user error (ConfigError & co, exit 1 in `trainlib train`) or a bug is
   raised at once: a restart would repeat it. Each restart sets TORCHELASTIC_RESTART_COUNT, as
   torchrun does, so code (and trainlib.testing's fault hook) can tell a restarted worker.
6. Elastic shrink: when the full group cannot be placed within `place_timeout_s` and
   `min_workers` < num_workers, the largest smaller world size that the cluster can place and that
   the job's layout allows (for trainlib's job: `trainlib.validate.check_run`) is used instead;
   trainlib reshards the checkpoint onto it (trainlib/checkpoint/reshard.py).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from trainlib.launchers.errors import LaunchConfigError, LaunchInfraError

log = logging.getLogger("trainlib")

# After the first failure the other workers get this long to fail too: a SIGKILLed rank's peer
# often reports its broken connection before Ray reports the dead actor, and the dead actor is
# what makes the failure retryable.
_GRACE_S = 10.0


class _Worker:
    """One rank. A plain class; `ray.remote` wraps it at run time so importing this module needs no Ray."""

    def node(self) -> tuple[str, str]:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def rendezvous(self) -> tuple[str, int]:
        import ray

        from trainlib.runtime import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def run(self, fn: Callable[[dict], Any], config: dict, env: dict[str, str]) -> Any:
        from trainlib.runtime import shutdown

        os.environ.update(device_env(int(env.get("LOCAL_WORLD_SIZE", "1"))))
        os.environ.update(env)
        try:
            return fn(dict(config))
        finally:
            shutdown()


def device_env(nproc_per_node: int, devices: Any = None, env: dict[str, str] | None = None) -> dict[str, str]:
    """What `trainlib launch` would add for this node's devices (the EFA/NCCL plugin settings, the
    Neuron compiler cache): no `trainlib launch` runs in a Ray pod, so the actor sets them itself,
    before fn initialises NCCL. Values the user set win, as with `trainlib launch`. LD_LIBRARY_PATH
    is left out: the dynamic loader read it when the process started (the images set it in ENV);
    so is the CPU profile: Ray already gives each actor its OMP_NUM_THREADS."""
    from trainlib.launchers.devices import probe
    from trainlib.launchers.profiles import select_profile

    env = dict(os.environ if env is None else env)
    profile = select_profile(devices if devices is not None else probe(env), nproc_per_node, env)
    if profile.name == "cpu":
        return {}
    return {k: v for k, v in profile.env.items() if k != "LD_LIBRARY_PATH" and k not in env}


def train_trainlib(config: dict) -> dict:
    """The default job on this rank: `config` maps "section.key" to a value, like --section.key=value."""
    from trainlib.config import load_config
    from trainlib.trainer import train

    return train(load_config(None, [f"--{k}={v}" for k, v in config.items()]))


class RunResults(list):
    """fn's results in rank order (a list, as before), plus how the run got there.

    restarts: how many times the group was restarted; attempts: one dict per attempt with
    world_size, outcome ("ok" or the failure), and resumed_from (the checkpoint step it started from)."""

    def __init__(self, results: list[Any], attempts: list[dict[str, Any]]):
        super().__init__(results)
        self.attempts = attempts
        self.restarts = len(attempts) - 1


class WorkerGroup:
    """Started rank actors in one placement group: their result refs, and a teardown that kills them
    (and removes the group when this module reserved it)."""

    def __init__(self, pg: Any, own_pg: bool, workers: list, refs: list):
        self.pg, self.own_pg, self.workers, self.refs = pg, own_pg, workers, refs

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        if self.own_pg and self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def start_group(fn: Callable[[dict], Any], pg: Any, own_pg: bool, num_workers: int, config: dict,
                bundle: dict[str, float], env: dict[str, str], timeout_s: float) -> WorkerGroup:
    """Start one actor per bundle of the (ready) placement group `pg` and call fn(config) on each."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor = ray.remote(_Worker)
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
    group = WorkerGroup(pg, own_pg, [], [])
    try:
        for i in range(num_workers):
            group.workers.append(actor.options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), resources=custom or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote())
        nodes = ray.get([w.node.remote() for w in group.workers], timeout=timeout_s)
        addr, port = ray.get(group.workers[0].rendezvous.remote(), timeout=timeout_s)
        for rank, w in enumerate(group.workers):
            same = [i for i, (n, _) in enumerate(nodes) if n == nodes[rank][0]]
            wenv = {**env, "RANK": str(rank), "WORLD_SIZE": str(num_workers), "LOCAL_RANK": str(same.index(rank)),
                    "LOCAL_WORLD_SIZE": str(len(same)), "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
            group.refs.append(w.run.remote(fn, config, wenv))
    except BaseException:
        group.shutdown()
        raise
    return group


def run(fn: Callable[[dict], Any], num_workers: int, config: dict | None = None,
        resources_per_worker: dict[str, float] | None = None, strategy: str = "PACK", timeout_s: float = 600.0,
        placement_group: Any = None, env: dict[str, str] | None = None, max_failures: int = 0,
        checkpoint_dir: str | None = None, min_workers: int | None = None,
        place_timeout_s: float | None = None) -> RunResults:
    """Run fn(config) on `num_workers` gang-scheduled Ray actors; return their results in rank order.

    `placement_group`: use bundles 0..N-1 of an existing group (what a Tune trial gets) instead of
    reserving a new one (then there is no shrinking). `max_failures`: restarts after a retryable
    failure, resuming from `checkpoint_dir` (passed to fn as config["checkpoint.dir"]).
    `min_workers`: the smallest world size to shrink to when num_workers cannot be placed within
    `place_timeout_s` (default: timeout_s, or 60 s when shrinking is allowed)."""
    import ray

    min_workers = num_workers if min_workers is None else min_workers
    _check_args(num_workers, max_failures, min_workers, placement_group)
    if not ray.is_initialized():
        raise LaunchConfigError("Ray is not initialised: call ray.init() (local) or ray.init(address='auto') first")
    config = dict(config or {})
    if checkpoint_dir:
        config["checkpoint.dir"] = checkpoint_dir
    elif max_failures and not config.get("checkpoint.dir"):
        log.warning("Ray run: max_failures=%d without checkpoint_dir: a restart starts from step 0", max_failures)
    bundle = dict(resources_per_worker or {"CPU": 1})
    if place_timeout_s is None:
        place_timeout_s = min(timeout_s, 60.0) if min_workers < num_workers else timeout_s
    deadline = time.monotonic() + timeout_s
    attempts: list[dict[str, Any]] = []
    while True:
        resumed = _checkpoint_step(config.get("checkpoint.dir"))
        restart_env = {"TORCHELASTIC_RESTART_COUNT": str(len(attempts))}
        if placement_group is not None:
            pg, world = placement_group, num_workers
        else:
            pg, world = _reserve(fn, config, num_workers, min_workers, bundle, strategy,
                                 min(place_timeout_s, _left(deadline)))
        attempt = {"attempt": len(attempts), "world_size": world, "resumed_from": resumed}
        attempts.append(attempt)
        try:
            group = start_group(fn, pg, placement_group is None, world, config, bundle,
                                {**(env or {}), **restart_env}, _left(deadline))
        except Exception as e:  # an actor (or its node) died while starting: the same policy as later on
            if not is_retryable(e):
                raise
            results, failure = [], e
        else:
            try:
                results, failure = _wait(group, deadline, timeout_s)
            finally:
                group.shutdown()
        if failure is None:
            attempt["outcome"] = "ok"
            return RunResults(results, attempts)
        attempt["outcome"] = _describe(failure)
        restarts = len(attempts) - 1
        if not is_retryable(failure):
            raise failure
        if restarts >= max_failures:
            if max_failures == 0:
                raise failure  # as before fault tolerance existed: the worker's own error
            raise LaunchInfraError(f"Ray run failed {len(attempts)} times (max_failures={max_failures}); last: "
                                   f"{attempt['outcome']}. Raise max_failures or fix the cause") from failure
        step = _checkpoint_step(config.get("checkpoint.dir"))
        log.warning("Ray run: restart %d of %d after %s; resuming from %s", restarts + 1, max_failures,
                    attempt["outcome"], f"step {step}" if step is not None else "step 0 (no checkpoint)")


def _check_args(num_workers: int, max_failures: int, min_workers: int, placement_group: Any) -> None:
    if num_workers < 1:
        raise LaunchConfigError(f"num_workers={num_workers} must be >= 1")
    if max_failures < 0:
        raise LaunchConfigError(f"max_failures={max_failures} must be >= 0 (0: fail on the first worker failure)")
    if not 1 <= min_workers <= num_workers:
        raise LaunchConfigError(f"min_workers={min_workers} must be between 1 and num_workers={num_workers}")
    if placement_group is not None and min_workers < num_workers:
        raise LaunchConfigError(f"min_workers={min_workers} < num_workers={num_workers} needs a placement group "
                                "of its own; drop placement_group= or min_workers=")


def _reserve(fn: Callable, config: dict, num_workers: int, min_workers: int, bundle: dict[str, float],
             strategy: str, wait_s: float) -> tuple[Any, int]:
    """A ready placement group for num_workers bundles or, after wait_s, for the largest allowed smaller size."""
    import ray

    pg = _place(num_workers, bundle, strategy, wait_s)
    if pg is not None:
        return pg, num_workers
    for world in _allowed_sizes(fn, config, min_workers, num_workers - 1):
        # the cluster's free resources say whether a smaller group can fit: a short wait each
        pg = _place(world, bundle, strategy, min(5.0, wait_s))
        if pg is not None:
            log.warning("Ray run: %d workers of %s could not be placed within %.0fs; continuing with %d "
                        "(min_workers=%d)", num_workers, bundle, wait_s, world, min_workers)
            return pg, world
    raise LaunchInfraError(f"{num_workers} workers of {bundle} could not be placed together within {wait_s:.0f}s "
                           f"(strategy {strategy}, min_workers={min_workers}); free resources: "
                           f"{ray.available_resources()}")


def _place(world: int, bundle: dict[str, float], strategy: str, wait_s: float) -> Any:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([dict(bundle) for _ in range(world)], strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=wait_s)
    if ready:
        return pg
    remove_placement_group(pg)  # a pending group would grab the resources later and block others
    return None


def _allowed_sizes(fn: Callable, config: dict, lo: int, hi: int) -> list[int]:
    """World sizes hi..lo (descending) the job accepts; for trainlib's job, those its layout allows."""
    sizes = list(range(hi, lo - 1, -1))
    if fn is not train_trainlib:
        return sizes
    from trainlib.config import ConfigError, load_config
    from trainlib.validate import check_run

    cfg = load_config(None, [f"--{k}={v}" for k, v in config.items()])
    allowed = []
    for w in sizes:
        try:
            check_run(cfg, w, resolve=False)
        except ConfigError as e:
            log.info("Ray run: world size %d does not fit this job: %s", w, e)
            continue
        allowed.append(w)
    return allowed


def _wait(group: WorkerGroup, deadline: float, timeout_s: float) -> tuple[list[Any], BaseException | None]:
    """(results, None) when every rank returned; else (partial, the failure that decides retrying)."""
    import ray

    pending, failures = list(group.refs), []
    while pending and not failures:
        done, pending = ray.wait(pending, num_returns=1, timeout=_left(deadline))
        if not done:
            raise LaunchInfraError(f"{len(pending)} of {group.world_size} Ray workers still running after "
                                   f"{timeout_s:.0f}s")
        failures += _failures(done)
    if not failures:
        return ray.get(group.refs), None
    grace = time.monotonic() + min(_GRACE_S, _left(deadline))
    while pending and not any(is_retryable(f) for f in failures) and time.monotonic() < grace:
        done, pending = ray.wait(pending, num_returns=1, timeout=_left(grace))
        failures += _failures(done)
    retryable = [f for f in failures if is_retryable(f)]
    return [], (retryable or failures)[0]


def _failures(refs: list) -> list[BaseException]:
    import ray

    out = []
    for ref in refs:
        try:
            ray.get(ref)
        except Exception as e:  # Ray's errors (RayTaskError wraps the worker's own exception)
            out.append(e)
    return out


def is_retryable(err: BaseException) -> bool:
    """Whether a worker failure is worth a restart. Infrastructure (a dead process or node, a lost
    peer): yes. A user error or a bug: no, a restart would repeat it."""
    import ray.exceptions as rex

    infra = tuple(getattr(rex, n) for n in ("RayActorError", "WorkerCrashedError", "NodeDiedError",
                                            "ObjectLostError", "OwnerDiedError") if hasattr(rex, n))
    if isinstance(err, infra):
        return True
    cause = err.cause if isinstance(err, rex.RayTaskError) else err
    from trainlib.trainer import LOST_PEER_ERRORS

    return isinstance(cause, (LaunchInfraError, *LOST_PEER_ERRORS))


def _describe(err: BaseException) -> str:
    import ray.exceptions as rex

    cause = err.cause if isinstance(err, rex.RayTaskError) else err
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {first[:200]}"


def _checkpoint_step(directory: str | None) -> int | None:
    """The step trainlib would resume from (the `latest` pointer), or None."""
    if not directory:
        return None
    from trainlib.checkpoint.store import latest_step

    try:
        return latest_step(directory)
    except (OSError, ValueError):
        return None


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
