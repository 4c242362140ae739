"""`tl.ParameterServer`: the parameter server as a gradient-sync backend (protocol in sync/base.py).

    model = tl.DataParallel(model, mesh=mesh, sync=tl.ParameterServer())                  # colocated, sync
    sync=tl.ParameterServer(servers=["ps-0.ps:5555", "ps-1.ps:5555"], mode="async", staleness=2)

mode="sync" (BytePS's summation service): start(bucket) pushes the bucket's partitions (already
scaled by 1/dp) to their servers; each server sums the W pushes of a (key, step) and answers every
pusher with the sum, which wait() writes back into bucket.comm, so gradients equal all-reduce's.

mode="async" (stale synchronous parallel, Ho et al. 2013): gradients stay local and the optimizer
steps locally; at the next forward the worker pushes its parameter change since its last pull,
scaled by 1/W (so that with plain SGD and staleness 0 the update is exactly synchronous data
parallel's), and pulls the current parameters, waiting while it is more than `staleness` clocks
ahead of the slowest worker.

Servers: `servers`, else TRAINLIB_PS_ADDRS (comma-separated host:port), else colocated (one per
node, see colocated.py). Token: `token`, else TRAINLIB_PS_TOKEN / TRAINLIB_PS_TOKEN_FILE, else
(colocated only) generated and shared by the group. Timeout of every wait on a server: `timeout_s`,
else TRAINLIB_PS_TIMEOUT_S, else the job's collective timeout (trainlib.runtime.timeout_s, ps=True).
"""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist

from ... import runtime
from ...observe import step_stats
from ..base import GradSync  # noqa: F401  (the protocol this class implements)
from .client import PSClient, Request
from .colocated import colocated_servers, shared_token
from .protocol import DEFAULT_MAX_BYTES, DType, Header, Op
from .sharding import Partition, plan_partitions
from .state import WIRE_DTYPE, as_tensor, wire_bytes
from .token import read_token

log = logging.getLogger("trainlib")

ADDRS_ENV = "TRAINLIB_PS_ADDRS"
MODES = ("sync", "async")
# keys already handed out per (servers, group) in this process: a second model synced through the
# same servers gets the next keys (every rank wraps its models in the same order)
_KEYS_TAKEN: dict[tuple, int] = {}


class ParameterServer:
    """Sync backend over S parameter servers; see the module docstring."""

    def __init__(self, servers: list[str] | None = None, mode: str = "sync", staleness: int = 0,
                 partition_mb: float = 4.0, token: str | None = None, timeout_s: float | None = None,
                 bucket_mb: float = 25.0, insecure: bool = False, server_start_timeout_s: float = 60.0,
                 retry_s: float | None = None):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}: 'sync' sums gradients (same result as "
                             "all-reduce), 'async' pushes parameter deltas with bounded staleness")
        if not isinstance(staleness, int) or staleness < 0:
            raise ValueError(f"staleness={staleness!r} must be an integer >= 0 (0 = synchronous)")
        if mode == "sync" and staleness:
            raise ValueError(f"staleness={staleness} only applies to mode='async'; use mode='async' or staleness=0")
        if partition_mb <= 0 or bucket_mb <= 0:
            raise ValueError(f"partition_mb={partition_mb} and bucket_mb={bucket_mb} must be positive")
        if partition_mb * 2**20 > DEFAULT_MAX_BYTES:
            raise ValueError(f"partition_mb={partition_mb} exceeds the servers' frame cap of "
                             f"{DEFAULT_MAX_BYTES / 2**20:.0f} MB; use partition_mb <= {DEFAULT_MAX_BYTES // 2**20} "
                             "(BytePS uses about 4) or start the servers with a larger --max-mb")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be positive seconds")
        self.servers = list(servers) if servers else None
        self.mode, self.staleness, self.partition_mb = mode, staleness, partition_mb
        self.token, self.insecure = token, insecure
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self.bucket_mb = bucket_mb
        self.comm_dtype = None   # gradients go to the servers in their own dtype
        self.server_start_timeout_s = server_start_timeout_s
        self.reduces_in_backward = mode == "sync"
        self.client: PSClient | None = None
        self.partitions: list[Partition] = []
        self._by_bucket: dict[int, list[Partition]] = {}
        self._inflight: list[Request] = []
        self._t_first_push = 0.0   # perf_counter of this step's first push (the step breakdown's transfer start)
        self._staged: dict[int, torch.Tensor] = {}
        self._step = 0
        self._clock = -1   # async: -1 before the first pull
        self._server = None  # the colocated server this rank started, if any
        self._colocated = False

    # -- setup -------------------------------------------------------------------------------
    def _resolve(self) -> tuple[list[str], str | None]:
        servers = self.servers
        if not servers and os.environ.get(ADDRS_ENV):
            servers = [a.strip() for a in os.environ[ADDRS_ENV].split(",") if a.strip()]
        if servers:
            token = self.token or read_token()
            if not token and not self.insecure:
                raise ValueError(f"parameter servers {servers} given but no token: set TRAINLIB_PS_TOKEN or "
                                 "TRAINLIB_PS_TOKEN_FILE (the same Secret the servers mount), or insecure=True "
                                 "for servers started with --insecure on loopback")
            return servers, token
        token = shared_token(self.token)
        self._colocated = True
        servers, self._server = colocated_servers(token, self.server_start_timeout_s, self._timeout)
        return servers, token

    def bind(self, buckets: list, group) -> None:
        self.buckets = buckets
        worker, nworkers = dist.get_rank(group), dist.get_world_size(group)
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(nworkers))
        timeout = self._timeout = runtime.timeout_s(self.timeout_s, ps=True)
        servers, token = self._resolve()
        numels = [b.comm.numel() if self.mode == "sync" else b.numel for b in buckets]
        sizes = [(b.comm if self.mode == "sync" else b.grads).element_size() for b in buckets]
        # the group's first global rank names it: dp groups of a tp/pp mesh share the servers
        space = (tuple(servers), min(ranks))
        first = _KEYS_TAKEN.get(space, 0)
        self.partitions = plan_partitions(numels, sizes, self.partition_mb, len(servers), group=min(ranks),
                                          first_index=first)
        _KEYS_TAKEN[space] = first + len(self.partitions)
        self._by_bucket = {}
        for p in self.partitions:
            self._by_bucket.setdefault(p.bucket, []).append(p)
        names = [f"worker {w} (rank {r})" for w, r in enumerate(ranks)]
        self.client = PSClient(servers, token, worker, nworkers, group=min(ranks), timeout_s=timeout,
                               retry_s=self.retry_s, worker_names=names)
        self.client.hello(max(timeout, self.server_start_timeout_s))
        self.nworkers, self.worker = nworkers, worker
        log.info("ParameterServer(%s): worker %d/%d, %d partitions on %s", self.mode, worker, nworkers,
                 len(self.partitions), servers)

    def _host(self, b, src: torch.Tensor) -> torch.Tensor:
        """A CPU tensor with src's values: src itself on CPU, else a pinned staging buffer."""
        if src.device.type == "cpu":
            return src
        buf = self._staged.get(b.index)
        if buf is None or buf.numel() != src.numel() or buf.dtype != src.dtype:
            buf = self._staged[b.index] = torch.empty(src.numel(), dtype=src.dtype, pin_memory=True)
        buf.copy_(src)
        return buf

    # -- sync mode ------------------------------------------------------------------------------
    def start(self, bucket) -> None:
        host = self._host(bucket, bucket.comm)
        dtype = WIRE_DTYPE[host.dtype]
        obs = step_stats._active
        if obs is not None:   # the step breakdown: pushed bytes, and the first push starts the transfer
            obs.add_bytes("ps", host.numel() * host.element_size())
            if not self._inflight:
                self._t_first_push = time.perf_counter()
        with step_stats.traced("trainlib.ps_push"):
            for p in self._by_bucket.get(bucket.index, []):
                self._inflight.append(self.client.submit(p.server, Op.PUSH, p.key, self._step + 1,
                                                         wire_bytes(host[p.offset: p.offset + p.numel]), dtype,
                                                         tag=(bucket, host, p)))

    def wait(self) -> None:
        reqs, self._inflight = self._inflight, []
        if not reqs:
            return

        def got(req: Request, h: Header, payload) -> None:
            if req.op != Op.PUSH:
                return
            bucket, host, p = req.tag
            host[p.offset: p.offset + p.numel].copy_(as_tensor(payload, DType(h.dtype)))

        with step_stats.traced("trainlib.ps_pull"):
            self.client.collect(reqs, got, what="partition sums")
        obs = step_stats._active
        if obs is not None:   # in flight from the first push until the last sum is in
            obs.transfer(self._t_first_push, time.perf_counter())
        for b in {id(r.tag[0]): r.tag[0] for r in reqs}.values():
            if b.comm.device.type != "cpu":
                b.comm.copy_(self._staged[b.index])
        self._step += 1

    # -- async mode -----------------------------------------------------------------------------
    def _flat_params(self, b) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in b.params]).to("cpu", torch.float64 if b.dtype ==
                                                                          torch.float64 else torch.float32)

    def on_forward(self, module=None) -> None:
        if self.mode != "async":
            return
        self.sync_params()

    @torch.no_grad()
    def sync_params(self) -> None:
        """Async: push this worker's parameter change since its last pull, then pull (SSP-bounded)."""
        reqs: list[Request] = []
        if self._clock < 0:
            self._base = {b.index: self._flat_params(b) for b in self.buckets}
            for b in self.buckets:
                flat, dtype = self._base[b.index], WIRE_DTYPE[self._base[b.index].dtype]
                for p in self._by_bucket.get(b.index, []):
                    part = flat[p.offset: p.offset + p.numel]
                    if self.worker == 0:  # one deterministic source for the initial parameters
                        reqs.append(self.client.submit(p.server, Op.INIT, p.key, 0, wire_bytes(part), dtype))
                    reqs.append(self.client.submit(p.server, Op.PULL, p.key, 0, b"", dtype, self.staleness,
                                                   tag=(b, p)))
        else:
            for b in self.buckets:
                delta = (self._flat_params(b) - self._base[b.index]).div_(self.nworkers)
                dtype = WIRE_DTYPE[delta.dtype]
                for p in self._by_bucket.get(b.index, []):
                    reqs.append(self.client.submit(p.server, Op.DELTA, p.key, self._clock + 1,
                                                   wire_bytes(delta[p.offset: p.offset + p.numel]), dtype,
                                                   self.staleness, tag=(b, p)))

        def got(req: Request, h: Header, payload) -> None:
            if req.op not in (Op.PULL, Op.DELTA):  # INIT acks arrive here too
                return
            b, p = req.tag
            self._base[b.index][p.offset: p.offset + p.numel].copy_(as_tensor(payload, DType(h.dtype)))
            clocks.append(h.step)

        clocks: list[int] = []
        obs = step_stats._active
        if obs is not None:
            obs.add_bytes("ps", sum(memoryview(r.payload).nbytes for r in reqs))
        t0 = time.perf_counter()
        with step_stats.traced("trainlib.ps_pull"):
            self.client.collect(reqs, got, what="parameter reads")
        if obs is not None:   # async: the step waits for the whole exchange (nothing overlaps it)
            t1 = time.perf_counter()
            obs.transfer(t0, t1)
            obs.blocked_on(t0, t1)
        for b in self.buckets:
            flat = self._base[b.index]
            for param, off in zip(b.params, b.offsets):
                param.copy_(flat[off: off + param.numel()].view_as(param))
        # the server's count of this worker's deltas: 0 on a fresh server, more when resuming
        self._clock = max(clocks, default=self._clock + 1)

    @property
    def clock(self) -> int:
        return self._clock

    def save_server_state(self) -> list[str]:
        """Ask every server to write its async state to its --state-dir; returns the paths."""
        paths: list[str] = []
        reqs = [self.client.submit(i, Op.SAVE) for i in range(len(self.client.links))]
        self.client.collect(reqs, lambda r, h, p: paths.append(bytes(p).decode()), what="SAVE acks")
        return paths

    def close(self) -> None:
        if self.client is not None:
            if self.mode == "async":
                try:  # let the others run on without waiting for this worker
                    reqs = [self.client.submit(i, Op.BYE) for i in range(len(self.client.links))]
                    self.client.collect(reqs, timeout_s=5.0, what="BYE acks")
                except Exception as e:
                    log.warning("ParameterServer.close: %s", e)
            self.client.close()
            self.client = None
        if self._colocated:
            self._stop_colocated()

    def _stop_colocated(self) -> None:
        from ... import comm

        try:  # the other workers on this node may still be using it
            if runtime.get_runtime().world_size > 1:
                comm.barrier()
        except Exception as e:
            log.warning("ParameterServer.close: barrier before stopping the server failed (%s)", e)
        if self._server is not None:
            self._server.stop()
            self._server = None
        self._colocated = False
