"""Shared-memory all-reduce for the ranks of one node (`tl.AllReduce(transport="shm")`).

gloo moves bytes through TCP on loopback and MPI's large-message path copies through a bounded
shared buffer; on one node both reach about 1% of memcpy bandwidth here
(benchmarks/results/allreduce*.json). This transport puts each bucket's flat buffer itself in
shared memory (a file in /dev/shm mapped by every rank of the group), so nothing is copied in or out:

    barrier                       every rank's bucket holds its (pre-scaled) gradients
    rank r owns chunk r:  buf_r[c_r] += sum_{k != r} buf_k[c_r];  buf_k[c_r] = buf_r[c_r]  for k != r
    barrier                       every chunk has been written back to every buffer

Per rank that is about 1.5 S bytes read and S written for an S-byte bucket (n = 2), memcpy-class
work. Chunks are disjoint, so the in-place writes never race. Barriers are bytes written to the
peers' FIFOs (a blocking read with a timeout: no spinning on a shared 2-core machine). The files
are unlinked as soon as every rank has mapped them, so a crash leaves nothing in /dev/shm.

Reduce-scatter and all-gather (sharded data parallel) are the two halves of that, on the chunks
flat.view(dp, -1)[i] of the data-parallel group:

    reduce_scatter   barrier; rank i: buf_i[c_i] += sum_{k != i} buf_k[c_i]; barrier
    all_gather       barrier; rank i: buf_k[c_i] = buf_i[c_i] for k != i;     barrier
    gather_out       barrier; rank i: out[c_k] = chunk_k for every k;          barrier
                     (each rank's chunk is a whole shared buffer, `out` private memory: ZeRO-3
                     keeps its parameter shards in shared memory and gathers a unit with one copy)

(the exit barrier of reduce_scatter keeps a rank from reusing its buffer while a peer still reads it).

The same chunked reduction serves the hierarchical transport (sync/hierarchical.py): there the
members are one node's ranks, each owns the chunks of its cross-node peers, and between the reduce
and the write-back each owner reduces them across nodes (`cross`), so barriers and chunking live here.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import select
import socket
import time
from typing import Protocol

import torch
import torch.distributed as dist

from .. import comm
from ..comm import CollectiveTimeout
from ..observe import step_stats

SHM_ROOT = "/dev/shm"
ALIGN = 16  # elements: chunk boundaries on cache-line multiples
# For tests and emulated clusters only: a string that replaces the node identity, so ranks on one
# machine can pretend to be on different nodes (each "node" then gets its own shm segment names).
NODE_ID_ENV = "TRAINLIB_NODE_ID"

log = logging.getLogger("trainlib")


def _token(group) -> str:
    """A random name shared by the group (rank 0 draws it, broadcast as int64)."""
    t = torch.tensor([secrets.randbits(62) if dist.get_rank() == dist.get_process_group_ranks(group)[0] else 0])
    comm.broadcast(t, src=dist.get_process_group_ranks(group)[0], group=group)
    return f"trainlib-{int(t):x}"


def _node_id() -> int:
    """Same on every process of this machine (and boot), different across machines. Not hash():
    str hashes are salted per process. $TRAINLIB_NODE_ID, when set, replaces hostname and boot."""
    override = os.environ.get(NODE_ID_ENV, "")
    if override:
        digest = hashlib.sha256(f"override|{override}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    digest = hashlib.sha256(f"{socket.gethostname()}|{boot}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def _free_bytes() -> int:
    try:
        st = os.statvfs(SHM_ROOT)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def gather_node_facts(group, need_bytes: int) -> list[tuple[int, bool, int, int]]:
    """(node id, /dev/shm writable, its free bytes, bytes this rank will put there) of every rank in
    the group; one all_gather, so all ranks reach the same decision."""
    mine = torch.tensor([_node_id(), int(os.access(SHM_ROOT, os.W_OK)), _free_bytes(), need_bytes], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    comm.all_gather(everyone, mine, group=group)
    return [(int(t[0]), bool(t[1]), int(t[2]), int(t[3])) for t in everyone]


def why_not(facts: list[tuple[int, bool, int, int]]) -> str | None:
    """Why the shm transport cannot serve a group with these node facts (None: it can)."""
    if len({node for node, *_ in facts}) != 1:
        return "needs every rank of the data-parallel group on one node (across nodes: transport='hierarchical')"
    return why_not_on_each_node(facts)


def why_not_on_each_node(facts: list[tuple[int, bool, int, int]]) -> str | None:
    """Why some node cannot hold its ranks' buffers in shared memory (None: every node can).

    The buffers of every rank of a node live in one tmpfs, so their sum must fit in its free space:
    a write to a tmpfs page beyond its size is SIGBUS, not an error (Docker's and Kubernetes' default
    /dev/shm is 64 MB)."""
    if not all(ok for _, ok, _, _ in facts):
        return f"needs a writable {SHM_ROOT} on every rank"
    by_node: dict[int, list[tuple[int, bool, int, int]]] = {}
    for f in facts:
        by_node.setdefault(f[0], []).append(f)
    for node in by_node.values():
        need, free = sum(n for *_, n in node), min(f for _, _, f, _ in node)
        if need * 1.05 + (16 << 20) > free:  # headroom for other users of /dev/shm (NCCL, dataloaders)
            return (f"needs {need / 2**20:.0f} MiB of {SHM_ROOT} for the gradient buckets of {len(node)} ranks but "
                    f"{free / 2**20:.0f} MiB are free; enlarge it (Kubernetes: an emptyDir with medium: Memory and a "
                    "sizeLimit; docker run --shm-size)")
    return None


def usable_for(facts: list[tuple[int, bool, int, int]]) -> bool:
    """Whether transport='auto' may pick shm: >1 rank, all on this node, room in a writable /dev/shm."""
    if len(facts) < 2:
        return False
    reason = why_not(facts)
    if reason is not None:
        log.info("AllReduce(transport='auto'): not using shared memory: it %s", reason)
    return reason is None


def check_usable(facts: list[tuple[int, bool, int, int]]) -> None:
    """For an explicit transport='shm' (auto asks usable_for instead): raise naming what is missing."""
    reason = why_not(facts)
    if reason is not None:
        raise ValueError(f"transport='shm' {reason}; or use transport='torch' (or 'auto', which falls back to it)")


class CrossStep(Protocol):
    """What the hierarchical transport does across nodes between the in-node reduce and write-back."""

    def all_reduce(self, chunk: torch.Tensor, what: str) -> None: ...

    def reduce_scatter(self, parts: list[torch.Tensor], mine: int, what: str) -> None: ...

    def all_gather(self, parts: list[torch.Tensor], mine: int, what: str) -> None: ...


class ShmGroup:
    """Buffers in /dev/shm mapped by `members` (default: every rank of `group`), and FIFO barriers
    between them. Setting up is collective over all of `group`; `tag` keeps the names of several
    member sets apart when they share one /dev/shm (emulated nodes). `cross`, if given, reduces each
    owned chunk further between the reduce and the write-back (hierarchical); `owners` (global ranks,
    default this rank) are the ranks whose dp chunks this rank reduces in the node, in cross order."""

    def __init__(self, group, timeout_s: float, members: list[int] | None = None, tag: str = "",
                 cross: CrossStep | None = None, owners: list[int] | None = None):
        self.group, self.timeout_s, self.cross = group, timeout_s, cross
        dp_ranks, rank = dist.get_process_group_ranks(group), dist.get_rank()
        self.ranks = list(members) if members is not None else dp_ranks
        self.n, self.me = len(self.ranks), self.ranks.index(rank)
        self.dp = len(dp_ranks)
        owners = list(owners) if owners is not None else [rank]
        self.owned = [dp_ranks.index(r) for r in owners]  # dp chunk indices, in cross order
        self.mine = owners.index(rank)                     # which of them is this rank's own
        self.prefix = os.path.join(SHM_ROOT, _token(group) + tag)
        self._own: dict[int, torch.Tensor] = {}
        self.buffers: dict[int, list[torch.Tensor]] = {}
        self._arrived = [0] * self.n
        self._barriers = 0
        self._open_fifos()

    def _path(self, what: str, rank: int) -> str:
        return f"{self.prefix}-{what}-{rank}"

    def _open_fifos(self) -> None:
        os.mkfifo(self._path("fifo", self.me), 0o600)
        self._rx = os.open(self._path("fifo", self.me), os.O_RDONLY | os.O_NONBLOCK)
        comm.barrier(self.group)  # every reader is open before anyone opens a writer
        self._tx = {k: os.open(self._path("fifo", k), os.O_WRONLY | os.O_NONBLOCK) for k in range(self.n) if k != self.me}
        comm.barrier(self.group)
        os.unlink(self._path("fifo", self.me))

    def alloc(self, key: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """This rank's zeroed buffer `key` in shared memory (call map_peers() once all are allocated)."""
        path = self._path(f"buf{key}", self.me)
        t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        t.zero_()
        self._own[key] = t
        return t

    def map_peers(self) -> None:
        """Map the peers' buffers allocated since the last call (collective over the group)."""
        new = {key: own for key, own in self._own.items() if key not in self.buffers}
        comm.barrier(self.group)
        for key, own in new.items():
            self.buffers[key] = [own if k == self.me else
                                 torch.from_file(self._path(f"buf{key}", k), shared=True, size=own.numel(), dtype=own.dtype)
                                 for k in range(self.n)]
        comm.barrier(self.group)  # everyone has mapped everything: the names can go
        for key in new:
            os.unlink(self._path(f"buf{key}", self.me))

    def barrier(self, what: str) -> None:
        if self.n == 1:  # one rank on this node (hierarchical): nobody to wait for
            return
        self._barriers += 1
        target = self._barriers
        msg = bytes([self.me])
        for fd in self._tx.values():
            os.write(fd, msg)
        deadline = time.monotonic() + self.timeout_s
        # poll, not select: select() cannot watch a descriptor numbered 1024 or above, which a process
        # with many sockets (or a long-lived one that built many groups) reaches
        poller = select.poll()
        poller.register(self._rx, select.POLLIN)
        while min(c for k, c in enumerate(self._arrived) if k != self.me) < target:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                late = [self.ranks[k] for k, c in enumerate(self._arrived) if k != self.me and c < target]
                raise CollectiveTimeout(f"rank {dist.get_rank()}: shm {what} barrier #{target} did not complete within "
                                        f"{self.timeout_s:.0f}s; waiting for rank(s) {late} (died, stopped or "
                                        "skipped the collective)")
            data = os.read(self._rx, 4096)
            if not data:  # every writer closed its end: the peers are gone
                raise CollectiveTimeout(f"rank {dist.get_rank()}: shm {what} barrier #{target}: the peer processes "
                                        "closed their end (they exited or were killed)")
            for b in data:
                self._arrived[b] += 1

    def allreduce(self, key: int) -> None:
        """Sum buffer `key` over the members, in place in every member's buffer (with `cross`: also
        over the other nodes, each owned chunk between the reduce and the write-back)."""
        bufs = self.buffers[key]
        numel = bufs[0].numel()
        per = -(-numel // self.n)
        per = -(-per // ALIGN) * ALIGN
        lo, hi = min(self.me * per, numel), min((self.me + 1) * per, numel)
        self.barrier(f"all_reduce[bucket {key}] enter")
        if hi > lo:  # an empty chunk is empty on every node alike, so skipping `cross` stays in step
            mine = bufs[self.me][lo:hi]
            for k in range(self.n):
                if k != self.me:
                    mine.add_(bufs[k][lo:hi])
            if self.cross is not None:
                self.cross.all_reduce(mine, f"bucket {key}")
            for k in range(self.n):
                if k != self.me:
                    bufs[k][lo:hi].copy_(mine)
        self.barrier(f"all_reduce[bucket {key}] exit")

    def _chunks(self, key: int, numel: int | None = None) -> list[torch.Tensor]:
        """Every member's buffer `key` (its first `numel` elements) as (dp, numel/dp) rows: row i is
        dp rank i's chunk."""
        return [(b if numel is None else b[:numel]).view(self.dp, -1) for b in self.buffers[key]]

    def reduce_scatter(self, key: int, numel: int | None = None) -> None:
        """Row i of dp rank i's buffer `key` := the sum of row i over the dp group; other rows unspecified.
        numel: only the buffer's first numel elements (a smaller bucket in a reused buffer)."""
        self.barrier(f"reduce_scatter[buffer {key}] enter")
        rows = self._chunks(key, numel)
        for d in self.owned:
            acc = rows[self.me][d]
            for k in range(self.n):
                if k != self.me:
                    acc.add_(rows[k][d])
        if self.cross is not None:
            self.cross.reduce_scatter([rows[self.me][d] for d in self.owned], self.mine, f"buffer {key}")
        self.barrier(f"reduce_scatter[buffer {key}] exit")  # nobody reuses a buffer a peer still reads

    def all_gather(self, key: int, numel: int | None = None) -> None:
        """Row i of every member's buffer `key` := row i of dp rank i's buffer, for every i."""
        self.barrier(f"all_gather[buffer {key}] enter")  # the peers are done with the rows we overwrite
        rows = self._chunks(key, numel)
        if self.cross is not None:
            self.cross.all_gather([rows[self.me][d] for d in self.owned], self.mine, f"buffer {key}")
        for d in self.owned:
            for k in range(self.n):
                if k != self.me:
                    rows[k][d].copy_(rows[self.me][d])
        self.barrier(f"all_gather[buffer {key}] exit")

    def gather_out(self, key: int, out: torch.Tensor) -> None:
        """out.view(n, -1)[k] := member k's whole buffer `key`, for every k (plain shm only: one
        member per dp rank). The entry barrier: every member's buffer holds its value for this
        collective (no optimizer step still writing it); the exit barrier: nobody changes its buffer
        while a peer still reads it."""
        if self.cross is not None or self.n != self.dp:
            raise RuntimeError("gather_out needs every dp rank in this shared-memory group (transport='shm')")
        self.barrier(f"gather_out[buffer {key}] enter")
        self.read_out(key, out)
        self.barrier(f"gather_out[buffer {key}] exit")

    def read_out(self, key: int, out: torch.Tensor) -> None:
        """gather_out without its barriers, in the calling thread: only for buffers that no member writes
        until every member has passed a barrier after this call, and that every member finished writing
        before a barrier this member passed (the caller's contract: sharded DP's settled shards)."""
        rows = out.view(self.n, -1)
        for k, buf in enumerate(self.buffers[key]):
            rows[k].copy_(buf)

    def close(self) -> None:
        for fd in [self._rx, *self._tx.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._tx = {}


class ShmHandle:
    def __init__(self, worker: "ShmWorker", key: int, seq: int):
        self.worker, self.key, self.seq = worker, key, seq

    def wait(self, timeout_s: float | None = None) -> None:
        obs = step_stats._active
        if obs is None:
            self.worker.wait_for(self.seq)
            return
        t0 = time.perf_counter()   # the step breakdown: a wait outside sync_wait (ZeRO-3's gathers) is exposed
        self.worker.wait_for(self.seq)
        obs.blocked_on(t0, time.perf_counter())


class ShmWorker:
    """One background thread per rank runs submitted collectives in order, so the reduction of a full
    bucket overlaps the rest of backward (torch ops and the FIFO wait release the GIL)."""

    def __init__(self, shm: ShmGroup):
        import queue
        import threading

        self.shm = shm
        self._ops = {"all_reduce": shm.allreduce, "reduce_scatter": shm.reduce_scatter, "all_gather": shm.all_gather,
                     "gather_out": shm.gather_out, "barrier": lambda key: shm.barrier(f"barrier #{key}")}
        self._q: "queue.Queue[tuple[str, int] | None]" = queue.Queue()
        self._done = 0
        self._submitted = 0
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="trainlib-shm", daemon=True)
        self._thread.start()

    def submit(self, key: int, op: str = "all_reduce", arg: "int | torch.Tensor | None" = None) -> ShmHandle:
        """Queue collective `op` (all_reduce | reduce_scatter | all_gather | gather_out) on buffer `key`
        (reduce-scatter and all-gather: on its first `arg` elements if given; gather_out: into `arg`)."""
        self._submitted += 1
        self._q.put((op, key, arg, step_stats._active))
        return ShmHandle(self, key, self._submitted)

    def _run(self) -> None:
        step_stats.register_background_thread()
        while (item := self._q.get()) is not None:
            op, key, arg, obs = item
            try:
                if self._error is None:
                    t0 = time.perf_counter()
                    self._ops[op](key) if arg is None else self._ops[op](key, arg)
                    if obs is not None:   # the step being measured when it was submitted
                        obs.transfer(t0, time.perf_counter())
            except BaseException as e:  # handed to the training thread by wait_for
                self._error = e
            with self._cv:
                self._done += 1
                self._cv.notify_all()

    def wait_for(self, seq: int) -> None:
        with self._cv:
            # the barrier inside allreduce has its own timeout, so this wait ends
            self._cv.wait_for(lambda: self._done >= seq)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)
