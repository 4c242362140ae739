"""Run a torch.distributed training function on N Ray workers reserved together (gang scheduled).

    import ray
    from trainlib.launchers import ray as tl_ray
    ray.init()                                           # or ray.init(address="auto") on a cluster
    results = tl_ray.run(tl_ray.train_trainlib, num_workers=4,
                         config={"train.steps": 100}, resources_per_worker={"CPU": 4, "GPU": 1})

How it works (the same steps Ray Train takes for torch):
1. A placement group with one bundle per worker is reserved first, so either all N workers get
   their resources or none start: no half-started job blocks the cluster (gang scheduling).
   PACK keeps workers on few nodes (fast intra-node links); SPREAD puts one per node.
2. One actor per bundle. Rank 0's actor reports its node IP and a free port: the rendezvous.
3. Every actor gets RANK, WORLD_SIZE, LOCAL_RANK (its index among actors on the same node),
   LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, then calls fn(config); fn calls tl.init(), which
   reads exactly those variables (the torchrun path). With GPU bundles Ray sets
   CUDA_VISIBLE_DEVICES per actor, and tl.init picks cuda:LOCAL_RANK % visible devices.
4. Results come back in rank order. The first failing worker fails the whole run at once (the
   others are killed, they would only wait for a peer that is gone); `timeout_s` bounds the wait
   for resources and for the run.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

from trainlib.launchers.errors import LaunchConfigError, LaunchInfraError


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

        os.environ.update(env)
        try:
            return fn(dict(config))
        finally:
            shutdown()


def train_trainlib(config: dict) -> dict:
    """The default job on this rank: `config` maps "section.key" to a value, like --section.key=value."""
    from trainlib.config import load_config
    from trainlib.trainer import train

    return train(load_config(None, [f"--{k}={v}" for k, v in config.items()]))


def run(fn: Callable[[dict], Any], num_workers: int, config: dict | None = None,
        resources_per_worker: dict[str, float] | None = None, strategy: str = "PACK", timeout_s: float = 600.0,
        placement_group: Any = None, env: dict[str, str] | None = None) -> list[Any]:
    """Run fn(config) on `num_workers` gang-scheduled Ray actors; return their results in rank order.

    `placement_group`: use bundles 0..N-1 of an existing group (what a Tune trial gets) instead of
    reserving a new one.
    """
    import ray
    from ray.util.placement_group import placement_group as make_pg
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if num_workers < 1:
        raise LaunchConfigError(f"num_workers={num_workers} must be >= 1")
    if not ray.is_initialized():
        raise LaunchConfigError("Ray is not initialised: call ray.init() (local) or ray.init(address='auto') first")
    bundle = dict(resources_per_worker or {"CPU": 1})
    deadline = time.monotonic() + timeout_s
    own_pg = placement_group is None
    pg = make_pg([dict(bundle) for _ in range(num_workers)], strategy=strategy) if own_pg else placement_group
    workers: list = []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            raise LaunchInfraError(f"{num_workers} workers of {bundle} could not be placed together within {timeout_s:.0f}s "
                                   f"(strategy {strategy}); free resources: {ray.available_resources()}")
        actor = ray.remote(_Worker)
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
        for i in range(num_workers):
            workers.append(actor.options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), resources=custom or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote())
        nodes = ray.get([w.node.remote() for w in workers], timeout=_left(deadline))
        addr, port = ray.get(workers[0].rendezvous.remote(), timeout=_left(deadline))
        refs = []
        for rank, w in enumerate(workers):
            same = [i for i, (n, _) in enumerate(nodes) if n == nodes[rank][0]]
            wenv = {**(env or {}), "RANK": str(rank), "WORLD_SIZE": str(num_workers), "LOCAL_RANK": str(same.index(rank)),
                    "LOCAL_WORLD_SIZE": str(len(same)), "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
            refs.append(w.run.remote(fn, config or {}, wenv))
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=_left(deadline))
            if not done:
                raise LaunchInfraError(f"{len(pending)} of {num_workers} Ray workers still running after {timeout_s:.0f}s")
            ray.get(done[0])  # re-raises the first failure; `finally` then stops the rest
        return ray.get(refs)
    finally:
        for w in workers:
            ray.kill(w)
        if own_pg:
            remove_placement_group(pg)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
