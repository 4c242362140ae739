"""Which peer did a timed-out collective lose? Heartbeats through the job's rendezvous store.

gloo's timeout says "Timed out waiting 20000ms for recv operation" and nothing about who is
missing. Every rank therefore publishes a small heartbeat every H seconds (H = timeout/8 clamped
to [0.5, 2] s: one ~150-byte store set, nothing else) under `trainlib/hb/<run>/attempt<n>/<rank>`:
a beat counter, hostname, its address on the route to MASTER_ADDR, and the newest and oldest
unfinished collective it entered. When a collective times out, `probe()` reads the group's
heartbeats, re-reads them for up to ~2H (stopping early once everyone has advanced) and sorts the
peers: stopped (counter frozen), exited, never published, alive but not inside this collective, or
alive and waiting in it too. The restart attempt is part of the key, so an earlier attempt's
frozen heartbeats are never read as this one's.

Every store operation runs in a helper thread joined with a deadline: a TCPStore client blocks
without bound on a stopped or unreachable server (its get and connect ignore their own timeout
there, seen with torch 2.13), and a probe must add seconds, not minutes, to a failure.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

log = logging.getLogger("trainlib")

MIN_EVERY_S, MAX_EVERY_S = 0.5, 2.0
READ_DEADLINE_S = 2.0        # one bounded read of the group's heartbeats (connect included)
POLL_S = 0.2                 # re-read period while watching for counters to advance
MARGIN_S = 0.25              # scheduling slack on a loaded machine
MAX_VALUE_BYTES = 1024       # a heartbeat is ~150 bytes; anything larger is not ours

Kind = Literal["stopped", "exited", "silent", "elsewhere", "unknown"]
Progress = Callable[[], dict[str, Any]]   # comm.progress: newest and oldest unfinished collective


def interval_s(timeout_s: float) -> float:
    """Heartbeat period H for a collective timeout: 8 beats per timeout, between 0.5 and 2 s, so a
    probe (~2H) adds at most ~4 s to a failure while costing one store set per H."""
    return min(MAX_EVERY_S, max(MIN_EVERY_S, timeout_s / 8))


@dataclass(frozen=True)
class Beat:
    """One rank's heartbeat as stored (JSON, never pickle: peers' bytes come from the network)."""

    boot: str                 # pid and start time: tells a restarted heartbeat from a frozen one
    beat: int
    host: str
    addr: str
    every_s: float
    time: float               # the sender's wall clock, for "last heartbeat N s ago"
    seq: int                  # newest collective entered (comm's sequence number), 0 before any
    op: str
    pending_seq: int | None   # oldest collective entered but not finished, if any
    pending_op: str | None
    state: str = "alive"      # "alive" | "exited" (runtime.shutdown ran)

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @staticmethod
    def decode(raw: bytes | None) -> Beat | None:
        if not raw or len(raw) > MAX_VALUE_BYTES:
            return None
        try:
            return Beat(**json.loads(raw))
        except (ValueError, TypeError):
            return None

    def last_collective(self) -> str:
        """Where this rank was at this beat, e.g. "inside all_reduce[sum] #36"."""
        if self.pending_seq is not None:
            return f"inside {self.pending_op} #{self.pending_seq}"
        return f"past {self.op} #{self.seq}, in no collective" if self.seq else "before its first collective"


@dataclass(frozen=True)
class Suspect:
    """A peer that explains (or may explain) a timed-out collective."""

    rank: int
    kind: Kind
    beat: Beat | None         # the latest heartbeat read, None if it never published one
    watched_s: float          # how long its heartbeat was watched
    seq: int | None = None    # the collective that timed out, if any

    def describe(self) -> str:
        b = self.beat
        who = f"rank {self.rank}" + (f" ({b.host}, {b.addr})" if b else "")
        if self.kind == "silent":
            return (f"{who} never published a heartbeat (it died before trainlib.init() finished, "
                    "or is not using trainlib's runtime)")
        assert b is not None
        last = b.last_collective()
        if self.kind == "stopped":
            return (f"{who} stopped answering: last heartbeat ~{max(0.0, time.time() - b.time):.0f} s ago "
                    f"(none in the {self.watched_s:.1f} s watched), when it was {last}")
        if self.kind == "exited":
            return f"{who} has exited; it was {last}"
        if self.kind == "unknown":
            return f"{who}: no verdict (the store went away after {self.watched_s:.1f} s); it was {last}"
        return (f"{who} is alive but has not entered #{self.seq}: it is {last} (it skipped this collective "
                "or is busy or stuck elsewhere)") if b.seq < self.seq else \
            f"{who} is alive but not inside #{self.seq}: it is {last} (the ranks disagree on the order of collectives)"


@dataclass(frozen=True)
class Probe:
    """What the store said about a group's members (`comm.probe_peers`, CollectiveTimeout)."""

    store: str                       # "the job's store at 10.0.0.1:29500"
    store_answered: bool
    suspects: list[Suspect]          # stopped, exited, silent, not inside the collective; worst first
    waiting: list[int]               # alive and inside the same collective
    alive: list[int]                 # alive (no collective given to compare with: point-to-point)
    beats: dict[int, Beat | None]    # every peer's latest heartbeat
    watched_s: float
    error: str = ""                  # why the store did not answer (or went away while watched)

    def describe(self) -> str:
        if not self.store_answered:
            return (f"Heartbeats: {self.store} did not answer either ({self.error}): this node may be cut off "
                    "from node 0, or node 0 (which hosts the store) is down.")
        parts = [s.describe() for s in self.suspects]
        for r in self.alive:
            b = self.beats[r]
            parts.append(f"rank {r} ({b.host}, {b.addr}) is alive, {b.last_collective()}" if b else f"rank {r} is alive")
        if self.waiting and not self.suspects:
            parts.append(f"every other member (ranks {self.waiting}) is alive and waiting in it too: the data "
                         "path between ranks is broken (a network fault that spares the store) or they disagree "
                         "on shape/dtype (TRAINLIB_DEBUG_COLLECTIVES=1 checks)")
        elif self.waiting:
            parts.append(f"alive and waiting in it too: ranks {self.waiting}")
        return f"Heartbeats ({self.store}, watched {self.watched_s:.1f} s): " + "; ".join(parts) + "."


def tcp_store(addr: str, port: int) -> Callable[[float], Any]:
    """connect(timeout_s) -> a new TCPStore client of the store at addr:port.

    A plain TCP connect goes first: it fails fast and quietly when nothing listens (the store's host
    exited) or when the host is unreachable, where the TCPStore constructor would retry until its
    timeout and print a C++ stack trace per attempt."""
    def connect(timeout_s: float) -> Any:
        import torch.distributed as dist

        try:
            socket.create_connection((addr, port), timeout=timeout_s).close()
        except ConnectionRefusedError:
            raise ConnectionRefusedError(f"connection to {addr}:{port} refused: nothing listens there any more") from None
        except OSError as e:
            raise TimeoutError(f"cannot connect to {addr}:{port} within {timeout_s:.0f} s ({e})") from None
        return dist.TCPStore(addr, port, None, False, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    return connect


_ABANDONED: list[threading.Thread] = []   # store reads given up on, maybe still inside the store client


def _bounded(fn: Callable[[], Any], deadline_s: float) -> tuple[str, Any]:
    """("ok", result) | ("error", exception) | ("timeout", None); the helper thread is abandoned
    on timeout (a daemon, blocked in the store client: it cannot be interrupted)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["ok"] = fn()
        except Exception as e:  # reported to the caller, which names it
            box["error"] = e

    t = threading.Thread(target=run, name="trainlib-store-read", daemon=True)
    t.start()
    t.join(deadline_s)
    if t.is_alive():
        _ABANDONED.append(t)   # stop() outwaits it: see Heartbeat.stop
        return "timeout", None
    return ("ok", box["ok"]) if "ok" in box else ("error", box.get("error"))


class Heartbeat:
    """The daemon thread that publishes this rank's Beat, and the reader used by probe()."""

    def __init__(self, rank: int, every_s: float, connect: Callable[[float], Any], store_name: str,
                 progress: Progress, master_addr: str | None, key_prefix: str):
        self.rank, self.every_s, self.store_name = rank, every_s, store_name
        self._connect, self._progress, self._master_addr = connect, progress, master_addr
        self._prefix = key_prefix
        self.store_timeout_s = max(5.0, 4 * every_s)   # the beat client's timeout: bounds each store call
        self._stop = threading.Event()
        self._first = threading.Event()   # set once the first beat is out (or cannot be)
        self._reader: Any = None     # a second store client: a read stuck on a dead store never blocks a beat
        self._boot = f"{os.getpid()}-{time.monotonic_ns()}"
        self._thread = threading.Thread(target=self._run, name="trainlib-heartbeat", daemon=True)

    def key(self, rank: int) -> str:
        return f"{self._prefix}/{rank}"

    def start(self, wait_s: float = READ_DEADLINE_S) -> None:
        """Start beating; wait (bounded) for the first beat, so a rank that dies right after init()
        is reported "stopped", not "never published"."""
        self._thread.start()
        self._first.wait(wait_s)

    def stop(self, deadline_s: float | None = None) -> None:
        """Publish state "exited" and end the thread. Waits as long as one store call can take (the
        client's timeout, plus slack) by default: a thread still inside the store's C++ call when the
        interpreter finalizes is killed by pthread_exit on its way back to the GIL, and that forced
        unwind through pybind11's noexcept guard aborts the process ("terminate called without an
        active exception") after a run that succeeded. Bounded: the call times out on a dead store."""
        wait = self.store_timeout_s + 2.0 if deadline_s is None else deadline_s
        self._stop.set()
        self._thread.join(wait)
        if self._thread.is_alive():
            log.warning("rank %d: the heartbeat thread did not end within %.0f s of stop (%s does not answer)",
                        self.rank, wait, self.store_name)

    def _address(self) -> str:
        from .netif import RouteError, source_address, resolve

        if not self._master_addr:
            return "?"
        try:
            return source_address(resolve(self._master_addr))
        except (RouteError, OSError):
            return "?"

    def _beat(self, n: int, host: str, addr: str, state: str) -> bytes:
        p = self._progress()
        return Beat(self._boot, n, host, addr, self.every_s, round(time.time(), 2), p["seq"], p["op"],
                    p["pending_seq"], p["pending_op"], state).encode()

    def _run(self) -> None:
        host, addr = socket.gethostname(), self._address()
        store = None
        for _ in range(3):      # the store answered init a moment ago; allow a slow start
            try:
                store = self._connect(self.store_timeout_s)
                break
            except Exception as e:  # DistStoreError, DistNetworkError, RuntimeError: any means "not now"
                log.debug("rank %d: heartbeat cannot reach %s (%s)", self.rank, self.store_name, e)
                if self._stop.wait(self.every_s):
                    return
        if store is None:
            self._first.set()
            return
        n = 0
        while True:
            stopping = self._stop.is_set()
            n += 1
            try:
                store.set(self.key(self.rank), self._beat(n, host, addr, "exited" if stopping else "alive"))
            except Exception as e:
                self._first.set()
                # the connection broke: the store's host is gone (it does not come back within an
                # attempt), so stop rather than reconnect in a loop; peers notice the silence
                log.debug("rank %d: heartbeat to %s stopped: %s", self.rank, self.store_name, e)
                return
            self._first.set()
            if stopping:
                return
            self._stop.wait(self.every_s)

    def read(self, ranks: list[int]) -> dict[int, Beat | None]:
        """Every rank's latest Beat (None if it never published), or raise TimeoutError/OSError."""
        keys = [self.key(r) for r in ranks]

        def query() -> tuple[Any, list[bytes | None]]:
            store = self._reader if self._reader is not None else self._connect(READ_DEADLINE_S)
            if store.check(keys):      # the usual case: one round trip for all of them
                try:
                    return store, list(store.multi_get(keys))
                except (AttributeError, RuntimeError):   # multi_get is missing on some torch/store kinds
                    pass
            # get() waits for a missing key, so look first
            return store, [store.get(k) if store.check([k]) else None for k in keys]

        status, out = _bounded(query, READ_DEADLINE_S)
        if status == "timeout":
            self._reader = None          # that client is stuck in the abandoned thread
            raise TimeoutError(f"no answer within {READ_DEADLINE_S:.0f} s")
        if status == "error":
            self._reader = None
            raise OSError(str(out).splitlines()[0][:200] if str(out) else type(out).__name__)
        self._reader, values = out
        return {r: Beat.decode(v) for r, v in zip(ranks, values)}


_HEARTBEAT: Heartbeat | None = None


def start(rank: int, timeout_s: float, connect: Callable[[float], Any], store_name: str, progress: Progress,
          master_addr: str | None) -> Heartbeat:
    """Start publishing this rank's heartbeat (runtime.init calls this). `connect(timeout_s)` returns a
    store client; it is called from the heartbeat and reader threads only, never blocking init."""
    global _HEARTBEAT
    stop()
    run = os.environ.get("TORCHELASTIC_RUN_ID") or "job"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _HEARTBEAT = Heartbeat(rank, interval_s(timeout_s), connect, store_name, progress, master_addr,
                           f"trainlib/hb/{run}/attempt{attempt}")
    _HEARTBEAT.start()
    return _HEARTBEAT


def stop() -> None:
    """Stop the heartbeat (runtime.shutdown calls this); bounded, never raises."""
    global _HEARTBEAT
    hb, _HEARTBEAT = _HEARTBEAT, None
    if hb is not None:
        hb.stop()
    # an abandoned read ends within its client's timeout (READ_DEADLINE_S, the connect included)
    deadline = time.monotonic() + 2 * READ_DEADLINE_S + 1.0
    while _ABANDONED:
        _ABANDONED.pop().join(max(0.0, deadline - time.monotonic()))


def probe(ranks: list[int], me: int, seq: int | None = None) -> Probe | None:
    """Watch the heartbeats of `ranks` (minus `me`) for up to ~2H and sort them; None when this
    process publishes no heartbeat (single process, or init() did not start one). `seq` is the
    collective that timed out (omit it for point-to-point: sequence numbers differ per stage)."""
    hb = _HEARTBEAT
    peers = [r for r in ranks if r != me]
    if hb is None or not peers:
        return None
    t0 = time.monotonic()
    try:
        first = hb.read(peers)
    except (TimeoutError, OSError) as e:
        return Probe(hb.store_name, False, [], [], [], {}, time.monotonic() - t0, str(e))
    every = max([b.every_s for b in first.values() if b] + [hb.every_s])
    window = 2 * min(every, MAX_EVERY_S) + MARGIN_S
    latest, advanced, lost = dict(first), set(), ""
    settled = {r for r, b in first.items() if b and b.state == "exited"}
    while len(advanced | settled) < len(peers) and time.monotonic() - t0 < window:
        time.sleep(POLL_S)
        try:
            now = hb.read(peers)
        except (TimeoutError, OSError) as e:   # the store's host ended meanwhile (it is often rank 0)
            lost = str(e)
            break
        for r, b in now.items():
            if b is not None and (first[r] is None or (b.boot, b.beat) != (first[r].boot, first[r].beat)):
                advanced.add(r)
                latest[r] = b
                if b.state == "exited":
                    settled.add(r)
    watched = time.monotonic() - t0
    suspects, waiting, alive = [], [], []
    for r in peers:
        b = latest[r]
        if b is not None and b.state == "exited":
            suspects.append(Suspect(r, "exited", b, watched, seq))
        elif r not in advanced:
            conclusive = watched >= (b.every_s if b else every) + 2 * POLL_S + MARGIN_S
            kind: Kind = ("silent" if b is None else "stopped") if conclusive or not lost else "unknown"
            suspects.append(Suspect(r, kind, b, watched, seq))
        elif seq is None:    # point-to-point: a peer's sequence numbers are its own
            alive.append(r)
        elif b.seq < seq or b.pending_seq is None or b.pending_seq > seq:
            suspects.append(Suspect(r, "elsewhere", b, watched, seq))
        else:
            waiting.append(r)
    order = {"stopped": 0, "silent": 1, "unknown": 2, "elsewhere": 3, "exited": 4}
    suspects.sort(key=lambda x: (order[x.kind], x.rank))
    return Probe(hb.store_name, True, suspects, waiting, alive, latest, watched, lost)
