"""What a parameter server holds and how each authenticated request changes it (no sockets here).

Sync mode, a summation service (BytePS): per key, the pushes of one step are kept per worker and,
once all `nworkers` have pushed, summed in worker order (so the result does not depend on arrival
order) and sent to every pusher. A second push of the same (key, step, worker) — a client retry —
is answered but not added again (exactly once). The last completed sum per key is kept so a retry
that arrives after completion is still answered.

Async mode, stale synchronous parallel (SSP; Ho et al., NIPS 2013): the server holds the
parameters (set by the first INIT), applies each worker's delta exactly once (DELTA at clock c is
applied only if the worker's clock is c - 1), and answers a read at clock c only when the slowest
worker's clock is >= c - staleness. `max_lead` records the largest c - min_clock at which a read
was granted: the SSP bound says it is <= staleness.

Bounds: the keys held (sums pending or done, parameters, and keys that only have reads waiting
for their INIT) are capped by `max_keys`; a waiting push or read is kept once per (connection,
worker), so client retries replace their earlier copy instead of piling up; at most `max_waiters`
reads wait in all. HELLO and STATS never reach this class (the server loop answers them).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
import warnings
from dataclasses import dataclass, field

import torch

from .protocol import DType, Header, Message, Op
from .sharding import KEY_BITS

log = logging.getLogger("trainlib")

TORCH_DTYPE = {DType.UINT8: torch.uint8, DType.FLOAT32: torch.float32, DType.FLOAT64: torch.float64,
               DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}
WIRE_DTYPE = {v: k for k, v in TORCH_DTYPE.items()}
STATE_FORMAT = "trainlib-ps-state-1"
DEFAULT_MAX_WAITERS = 1 << 16

Reply = tuple[bytes, Header, object]  # (peer identity, header, payload buffer)


def as_tensor(payload: memoryview, dtype: DType) -> torch.Tensor:
    """A read-only view of the payload as a tensor (no copy); callers copy before keeping it."""
    if len(payload) == 0:
        return torch.empty(0, dtype=TORCH_DTYPE[dtype])
    with warnings.catch_warnings():  # zmq frames are read-only; we never write through this view
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(payload, dtype=TORCH_DTYPE[dtype])


def wire_bytes(t: torch.Tensor):
    """The raw bytes of a contiguous CPU tensor, as a buffer zmq can send without copying."""
    return t.contiguous().view(torch.uint8).numpy() if t.numel() else b""


@dataclass
class SyncEntry:
    step: int
    nworkers: int
    dtype: DType
    nbytes: int
    parts: dict[int, torch.Tensor] = field(default_factory=dict)   # worker -> its push (a copy)
    waiters: list[tuple[bytes, Header]] = field(default_factory=list)


def _add_waiter(waiters: list[tuple[bytes, Header]], ident: bytes, h: Header) -> None:
    """Keep one waiter per (connection, worker): a retry (fresh seq) replaces the request it repeats."""
    waiters[:] = [(i, w) for i, w in waiters if (i, w.worker) != (ident, h.worker)]
    waiters.append((ident, h))


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes for hashing, whatever its dtype (numpy has no bfloat16)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


class ServerState:
    """All the state of one server; `handle` is called only with decoded, authenticated, fresh messages."""

    def __init__(self, max_keys: int = 1 << 20, state_dir: str | None = None, name: str = "ps",
                 worker_timeout_s: float = 300.0, max_waiters: int = DEFAULT_MAX_WAITERS):
        self.session = secrets.randbits(63) | 1  # the server nonce: every request must carry it
        self.max_keys = max_keys
        self.max_waiters = max_waiters
        self.state_dir = state_dir
        self.name = name
        self.pending: dict[int, SyncEntry] = {}
        self.done: dict[int, tuple[int, torch.Tensor]] = {}          # key -> (step, sum)
        self.params: dict[int, torch.Tensor] = {}                     # async: key -> master copy
        self.param_dtype: dict[int, DType] = {}
        self.clocks: dict[int, dict[int, int]] = {}                   # async: key -> worker -> clock
        self.nworkers: dict[int, int] = {}
        self.left: set[tuple[int, int]] = set()                       # (group, worker) that said BYE
        self.waiting: dict[int, list[tuple[bytes, Header]]] = {}      # async reads not yet allowed
        self.n_waiting = 0                                            # their total count
        self.max_lead = 0      # largest (read clock - slowest clock) at which a read was granted
        self.max_spread = 0    # largest (fastest - slowest clock) right after a delta was applied
        self.served = 0
        self.worker_timeout_s = worker_timeout_s
        self.last_seen: dict[tuple[int, int], float] = {}            # async liveness, monotonic seconds

    # -- entry point -------------------------------------------------------------------------
    def handle(self, ident: bytes, msg: Message) -> list[Reply]:
        h = msg.header
        self.served += 1
        who = (h.key >> KEY_BITS, h.worker)
        self.last_seen[who] = time.monotonic()
        if h.op != Op.BYE and who in self.left:  # a worker presumed gone is back: it counts again
            self.left.discard(who)
        fn = {Op.PUSH: self._push, Op.STATUS: self._status, Op.INIT: self._init, Op.PULL: self._pull,
              Op.DELTA: self._delta, Op.BYE: self._bye, Op.SAVE: self._save}.get(h.op)
        if fn is None:
            return [self._error(ident, h, f"op {Op(h.op).name} is not a request this state handles")]
        return fn(ident, h, msg.payload)

    def reply(self, ident: bytes, req: Header, op: Op, payload=b"", dtype: DType = DType.UINT8,
              step: int | None = None, arg: int = 0, instance: int | None = None) -> Reply:
        n = payload.nbytes if hasattr(payload, "nbytes") else len(payload)
        return ident, Header(op=op, worker=req.worker, nworkers=req.nworkers, key=req.key,
                             step=req.step if step is None else step, seq=req.seq, session=self.session,
                             instance=req.instance if instance is None else instance, nbytes=n, dtype=dtype,
                             arg=arg), payload

    def _error(self, ident: bytes, req: Header, text: str) -> Reply:
        log.warning("%s: refusing %s from worker %d: %s", self.name, Op(req.op).name, req.worker, text)
        return self.reply(ident, req, Op.ERROR, text.encode())

    def _keys(self) -> int:
        # a key with only reads waiting for its INIT holds memory too (its waiters)
        unborn = sum(1 for k, w in self.waiting.items() if w and k not in self.params)
        return len(self.pending) + len(self.done) + len(self.params) + unborn

    def _room_for(self, key: int) -> bool:
        return (key in self.pending or key in self.done or key in self.params or bool(self.waiting.get(key))
                or self._keys() < self.max_keys)

    def _wait(self, ident: bytes, h: Header) -> list[Reply]:
        """Queue an async read until the SSP bound (or INIT) allows it; bounded, one per (connection, worker)."""
        if not self._room_for(h.key):
            return [self._error(ident, h, f"server holds {self._keys()} keys, the cap (--max-keys)")]
        queue = self.waiting.setdefault(h.key, [])
        before = len(queue)
        if self.n_waiting >= self.max_waiters and all((i, w.worker) != (ident, h.worker) for i, w in queue):
            return [self._error(ident, h, f"{self.max_waiters} reads already wait on this server; retry later")]
        _add_waiter(queue, ident, h)
        self.n_waiting += len(queue) - before
        return []

    # -- sync ---------------------------------------------------------------------------------

    def _push(self, ident, h, payload):
        key, step = h.key, h.step
        if key in self.done and step <= self.done[key][0]:
            done_step, total = self.done[key]
            if step == done_step:  # a retry after completion: answer again, add nothing
                return [self.reply(ident, h, Op.SUM, wire_bytes(total), h.dtype)]
            # within a run no worker can be two steps behind a completed one: this is a new run of the
            # job (restarted against long-lived dedicated servers), which starts its steps again
            log.info("%s: key %d restarts at step %d (was %d): a new run", self.name, key, step, done_step)
            del self.done[key]
        e = self.pending.get(key)
        if e is not None and step < e.step:  # likewise: a new run replaces a crashed run's half-summed step
            log.info("%s: key %d restarts at step %d (step %d was pending)", self.name, key, step, e.step)
            del self.pending[key]
            e = None
        if e is None:
            if not self._room_for(key):
                return [self._error(ident, h, f"server holds {self._keys()} keys, the cap (--max-keys)")]
            e = self.pending[key] = SyncEntry(step, h.nworkers, h.dtype, h.nbytes)
        problem = None
        if e.step != step:
            problem = f"step {step} while step {e.step} of this key still waits for workers {self._missing(e)}"
        elif (e.nworkers, e.dtype, e.nbytes) != (h.nworkers, h.dtype, h.nbytes):
            problem = (f"(nworkers, dtype, nbytes) = {(h.nworkers, DType(h.dtype).name, h.nbytes)} but the first "
                       f"push of this step said {(e.nworkers, e.dtype.name, e.nbytes)}; workers disagree on the model")
        if problem:
            if not e.parts:
                del self.pending[key]
            return [self._error(ident, h, f"push for key {key}: {problem}")]
        if h.worker not in e.parts:
            e.parts[h.worker] = as_tensor(payload, h.dtype).clone()
        _add_waiter(e.waiters, ident, h)
        if len(e.parts) < e.nworkers:
            return []
        acc = e.parts[0].to(torch.float32 if e.dtype in (DType.FLOAT16, DType.BFLOAT16) else e.parts[0].dtype)
        for w in range(1, e.nworkers):
            acc = acc + e.parts[w]  # worker order: the sum is the same whatever the arrival order
        total = acc.to(TORCH_DTYPE[e.dtype])
        del self.pending[key]
        self.done[key] = (step, total)
        buf = wire_bytes(total)
        return [self.reply(i, wh, Op.SUM, buf, e.dtype) for i, wh in e.waiters]

    @staticmethod
    def _missing(e: SyncEntry) -> list[int]:
        return [w for w in range(e.nworkers) if w not in e.parts]

    def _status(self, ident, h, payload):
        flags = torch.zeros(h.nworkers, dtype=torch.uint8)
        if h.key in self.done and self.done[h.key][0] >= h.step:
            flags.fill_(1)
        elif h.key in self.pending and self.pending[h.key].step == h.step:
            for w in self.pending[h.key].parts:
                if w < h.nworkers:
                    flags[w] = 1
        return [self.reply(ident, h, Op.STATUS_OK, wire_bytes(flags))]

    # -- async (SSP) --------------------------------------------------------------------------
    def _init(self, ident, h, payload):
        if h.key not in self.params:
            if not self._room_for(h.key):
                return [self._error(ident, h, f"server holds {self._keys()} keys, the cap (--max-keys)")]
            self.params[h.key] = as_tensor(payload, h.dtype).to(torch.float64 if h.dtype == DType.FLOAT64
                                                                 else torch.float32, copy=True)
            self.param_dtype[h.key] = DType(h.dtype)
            self.clocks[h.key] = {}
            self.nworkers[h.key] = h.nworkers
        return [self.reply(ident, h, Op.ACK)] + self._release(h.key)  # reads that arrived before INIT

    def _min_clock(self, key: int) -> float:
        group, clocks = key >> KEY_BITS, self.clocks[key]
        live = [clocks.get(w, 0) for w in range(self.nworkers[key]) if (group, w) not in self.left]
        return min(live) if live else float("inf")

    def _delta(self, ident, h, payload):
        key = h.key
        if key not in self.params:
            return [self._error(ident, h, f"delta for key {key} before any INIT; the first worker must push "
                                          "the initial parameters")]
        p = self.params[key]
        if h.nbytes != p.numel() * TORCH_DTYPE[h.dtype].itemsize or h.nworkers != self.nworkers[key]:
            return [self._error(ident, h, f"delta for key {key} has {h.nbytes} bytes / {h.nworkers} workers; the "
                                          f"parameters have {p.numel()} elements / {self.nworkers[key]} workers")]
        clock = self.clocks[key].get(h.worker, 0)
        if h.step == clock + 1:
            p.add_(as_tensor(payload, h.dtype).to(p.dtype))
            self.clocks[key][h.worker] = h.step
            live = [self.clocks[key].get(w, 0) for w in range(self.nworkers[key])
                    if (key >> KEY_BITS, w) not in self.left]
            self.max_spread = max(self.max_spread, max(live) - min(live)) if live else self.max_spread
        elif h.step > clock + 1:
            return [self._error(ident, h, f"delta for key {key} at clock {h.step} but worker {h.worker} is at "
                                          f"clock {clock}; clocks must advance by one")]
        # h.step <= clock: a retried delta, already applied once: answer, do not add again
        return self._read(ident, h) + self._release(key)

    def _pull(self, ident, h, payload):
        if h.key not in self.params:
            return self._wait(ident, h)  # INIT may still be on its way
        return self._read(ident, h)

    def _read(self, ident, h) -> list[Reply]:
        lo = self._min_clock(h.key)
        if h.step - lo > h.arg:
            return self._wait(ident, h)
        self.max_lead = max(self.max_lead, int(h.step - min(lo, h.step)))
        p = self.params[h.key].clone()  # zmq sends from this memory after we return: no in-place updates
        # step = the reader's own clock here: a worker (re)joining with PULL learns where it stands, so
        # a job restarted against restored server state continues its clocks instead of repeating them
        return [self.reply(ident, h, Op.PARAMS, wire_bytes(p.to(TORCH_DTYPE[self.param_dtype[h.key]])),
                           self.param_dtype[h.key], step=self.clocks[h.key].get(h.worker, 0),
                           arg=int(min(lo, 2 ** 32 - 1)))]

    def _release(self, key: int) -> list[Reply]:
        if key not in self.params or not self.waiting.get(key):
            return []
        waiting = self.waiting.pop(key)
        self.n_waiting -= len(waiting)
        out: list[Reply] = []
        for ident, h in waiting:
            out += self._read(ident, h)  # re-queues itself if still too far ahead
        return out

    def _bye(self, ident, h, payload):
        group = h.key >> KEY_BITS
        self.left.add((group, h.worker))
        out = [self.reply(ident, h, Op.ACK)]
        for key in list(self.waiting):
            if key >> KEY_BITS == group:
                out += self._release(key)
        return out

    def expire(self, now: float | None = None) -> list[Reply]:
        """Async: a worker silent for worker_timeout_s is presumed gone, so it stops holding the others
        back (SSP would otherwise wait for a crashed worker forever); it counts again when it returns."""
        now = time.monotonic() if now is None else now
        gone = {who for who, t in self.last_seen.items() if now - t > self.worker_timeout_s and who not in self.left}
        out: list[Reply] = []
        if not gone or not self.params:
            return out
        for who in sorted(gone):
            log.warning("%s: worker %d of group %d silent for %.0fs; no longer waiting for it", self.name, who[1],
                        who[0], self.worker_timeout_s)
        self.left |= gone
        for key in list(self.waiting):
            if any(g == key >> KEY_BITS for g, _ in gone):
                out += self._release(key)
        return out

    # -- introspection and persistence -----------------------------------------------------------
    def digest(self) -> str:
        """A hash of the training state (sums, parameters, clocks); equal digests = no change.

        The replay window is reported beside it by the server's STATS, since asking for the stats
        is itself a message that advances the asker's counter."""
        d = hashlib.sha256(f"{self.session}|{sorted(self.left)}".encode())
        for key in sorted(self.pending):
            e = self.pending[key]
            d.update(f"p{key}:{e.step}:{e.nworkers}:{sorted(e.parts)}:{len(e.waiters)}".encode())
            for w in sorted(e.parts):
                d.update(_raw(e.parts[w]))
        for key in sorted(self.done):
            d.update(f"d{key}:{self.done[key][0]}".encode())
            d.update(_raw(self.done[key][1]))
        for key in sorted(self.params):
            d.update(f"a{key}:{sorted(self.clocks[key].items())}".encode())
            d.update(_raw(self.params[key]))
        for key in sorted(self.waiting):
            d.update(f"w{key}:{sorted((w.worker, w.step) for _, w in self.waiting[key])}".encode())
        return d.hexdigest()

    def stats(self, dropped: dict[str, int]) -> dict:
        """Counters and the digest; sizes only, so the reply stays small whatever the server holds."""
        worker_clock: dict[str, int] = {}
        for key, clocks in self.clocks.items():
            for w, c in clocks.items():
                name = f"{key >> KEY_BITS}:{w}"
                worker_clock[name] = min(worker_clock.get(name, c), c)
        return {"session": self.session, "served": self.served, "dropped": dict(dropped),
                "dropped_total": sum(dropped.values()), "keys": self._keys(), "pending": len(self.pending),
                "max_lead": self.max_lead, "max_spread": self.max_spread, "worker_clock": worker_clock,
                "waiting_reads": self.n_waiting, "digest": self.digest()}

    def _save(self, ident, h, payload):
        if not self.state_dir:
            return [self._error(ident, h, "this server was started without --state-dir; nowhere to save")]
        path = self.save(self.state_dir)
        return [self.reply(ident, h, Op.ACK, path.encode())]

    @staticmethod
    def state_path(state_dir: str) -> str:
        """One state file per directory: give each server its own --state-dir (its port may change)."""
        return os.path.join(state_dir, "ps-state.safetensors")

    def save(self, state_dir: str) -> str:
        """Async state -> safetensors (tensors) + JSON metadata (clocks); atomic via rename. No pickle."""
        from safetensors.torch import save_file

        os.makedirs(state_dir, exist_ok=True)
        path = self.state_path(state_dir)
        meta = {"format": STATE_FORMAT, "clocks": json.dumps({str(k): {str(w): c for w, c in v.items()}
                                                                for k, v in self.clocks.items()}),
                "nworkers": json.dumps({str(k): v for k, v in self.nworkers.items()}),
                "dtypes": json.dumps({str(k): int(v) for k, v in self.param_dtype.items()}),
                "left": json.dumps(sorted(self.left))}
        tmp = path + ".tmp"
        save_file({f"k{k}": v.contiguous() for k, v in self.params.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
        return path

    def load(self, state_dir: str) -> bool:
        """Restore the async state saved by `save`; False if there is none."""
        from safetensors import safe_open

        path = self.state_path(state_dir)
        if not os.path.exists(path):
            return False
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"{path} is not a trainlib parameter-server state (format {meta.get('format')!r})")
            self.params = {int(name[1:]): f.get_tensor(name) for name in f.keys()}
        self.clocks = {int(k): {int(w): int(c) for w, c in v.items()} for k, v in json.loads(meta["clocks"]).items()}
        self.nworkers = {int(k): int(v) for k, v in json.loads(meta["nworkers"]).items()}
        self.param_dtype = {int(k): DType(v) for k, v in json.loads(meta["dtypes"]).items()}
        self.left = {(int(g), int(w)) for g, w in json.loads(meta["left"])}
        if set(self.params) != set(self.clocks):
            raise ValueError(f"{path}: tensors and clocks disagree on the keys; the file is damaged")
        return True
