"""A worker's connections to the parameter servers: send requests, collect replies, name failures.

One DEALER socket per server. Requests go out at once (zero-copy: the payload frame is the
tensor's own memory) and replies are matched by the echoed sequence number, so many partitions
are in flight together and the servers' sums overlap the rest of backward. Every wait has a
deadline; when it passes, the error names the server that went quiet, or, when the server is
alive, asks it which workers never pushed (STATUS) and names them. A server whose connection
drops while requests are outstanding fails the wait at once instead of at the deadline.

Requests are retried after `retry_s` with a fresh sequence number (the old one would be dropped
as a replay), after a fresh HELLO to that server (its replay window may have forgotten this
client's instance: replay.py); the server applies a retried push or delta exactly once.

A reply is taken only if it authenticates under the server->worker key, echoes an outstanding
(instance, seq) of this client, carries the server's session and the request's key, and is the
op that request expects (protocol.EXPECTED_REPLY); anything else is dropped and counted in
`drop_reasons`. So a worker's own request reflected back to it, or a reply meant for another
request, is never taken for an answer.
"""
from __future__ import annotations

import collections
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ... import runtime
from ...errors import CollectiveTimeout
from .connauth import conn_auth_mode, secure_client
from .protocol import (DEFAULT_MAX_BYTES, EXPECTED_REPLY, DType, Header, Message, Op, ProtocolError, Signer,
                       decode)
from .sharding import KEY_BITS

log = logging.getLogger("trainlib")

DISCONNECT_GRACE_S = 1.0


class PSError(RuntimeError):
    """A parameter-server request failed; the message names the server (and the workers) involved."""


class PSTimeout(PSError, CollectiveTimeout):
    """A wait on a parameter server passed its deadline, or its server dropped the connection: a
    lost peer like a collective timeout (trainlib.errors), so the trainer's retry policy covers it."""


@dataclass
class Request:
    server: int
    op: Op
    key: int
    step: int
    payload: object
    dtype: DType
    arg: int
    sent: list[tuple[int, int]] = field(default_factory=list)  # (instance, seq) of every send
    sent_at: float = 0.0
    expired: bool = False        # the server answered EXPIRED: re-handshake, then resend at once
    done: bool = False
    tag: object = None
    reply: tuple | None = None   # (header, payload) kept until the collect() that asked for it runs
    delivered: bool = False


@dataclass
class Link:
    address: str
    sock: zmq.Socket
    monitor: zmq.Socket
    session: int = 0      # the server's nonce, learnt from HELLO_OK
    instance: int = 0     # this client's id on that server, issued in HELLO_OK
    counter: int = 0      # seq of the last request sent under `instance`
    connected: bool = False
    lost_at: float | None = None


def tcp(address: str) -> str:
    return address if "://" in address else f"tcp://{address}"


class PSClient:
    """Requests to S servers on behalf of one worker (`worker` of `nworkers` in data-parallel group `group`)."""

    def __init__(self, servers: list[str], token: str | None, worker: int, nworkers: int, group: int = 0,
                 timeout_s: float | None = None, retry_s: float | None = None, worker_names: list[str] | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, conn_auth: str | None = None):
        if not servers:
            raise PSError("no parameter-server addresses; pass servers=['host:port', ...] or set TRAINLIB_PS_ADDRS")
        self.signer = Signer(token, "client")
        self.conn_auth = conn_auth_mode(conn_auth, token)
        self.worker, self.nworkers, self.group = worker, nworkers, group
        self.timeout_s = timeout_s = runtime.timeout_s(timeout_s, ps=True)
        self.retry_s = retry_s if retry_s is not None else max(10.0, timeout_s / 3)
        self.worker_names = worker_names or [f"worker {w}" for w in range(nworkers)]
        self.max_bytes = max_bytes
        self.ctx = zmq.Context.instance()
        self.links: list[Link] = []
        for addr in servers:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, max_bytes + 4096)
            secure_client(sock, self.conn_auth, token)
            mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            sock.connect(tcp(addr))
            self.links.append(Link(addr, sock, mon))
        self.poller = zmq.Poller()
        for link in self.links:
            self.poller.register(link.sock, zmq.POLLIN)
            self.poller.register(link.monitor, zmq.POLLIN)
        self.outstanding: dict[tuple[int, int, int], Request] = {}  # (server, instance, seq) -> request
        self.drop_reasons: collections.Counter[str] = collections.Counter()

    # -- sending -----------------------------------------------------------------------------
    @property
    def dropped(self) -> int:
        """Replies dropped (malformed, forged, reflected, late duplicates); 0 on a clean run."""
        return sum(self.drop_reasons.values())

    def _send(self, req: Request) -> None:
        link = self.links[req.server]
        if req.op == Op.HELLO:  # a random nonce: the reply must echo it, so an old HELLO_OK is refused
            instance, seq = 0, secrets.randbits(64) | 1
        else:
            link.counter += 1
            instance, seq = link.instance, link.counter
        nbytes = len(req.payload) if isinstance(req.payload, (bytes, bytearray)) else memoryview(req.payload).nbytes
        h = Header(op=req.op, worker=self.worker, nworkers=self.nworkers, key=req.key, step=req.step,
                   seq=seq, session=link.session, instance=instance, nbytes=nbytes, dtype=req.dtype, arg=req.arg)
        link.sock.send_multipart(self.signer.encode(h, req.payload), copy=False)
        req.sent.append((instance, seq))
        req.sent_at = time.monotonic()
        self.outstanding[(req.server, instance, seq)] = req

    def submit(self, server: int, op: Op, key: int = 0, step: int = 0, payload=b"", dtype: DType = DType.UINT8,
               arg: int = 0, tag: object = None) -> Request:
        if op in (Op.HELLO, Op.STATS, Op.BYE, Op.SAVE):
            key = self.group << KEY_BITS
        req = Request(server, op, key, step, payload, dtype, arg, tag=tag)
        self._send(req)
        return req

    # -- receiving ---------------------------------------------------------------------------
    def _receive(self, server: int) -> None:
        link = self.links[server]
        while True:
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg: Message = decode(frames, self.max_bytes)
            except ProtocolError as e:
                self.drop_reasons["malformed"] += 1
                log.warning("dropped a malformed reply from %s (%s)", link.address, e)
                continue
            reason = self._refuse(server, msg)
            if reason:
                self.drop_reasons[reason] += 1
                log.debug("dropped a reply from %s (%s)", link.address, reason)
                continue
            h = msg.header
            req = self.outstanding[(server, 0 if h.op == Op.HELLO_OK else h.instance, h.seq)]
            if h.op == Op.EXPIRED:
                req.expired = True
                continue
            for instance, seq in req.sent:
                self.outstanding.pop((server, instance, seq), None)
            req.done, req.reply = True, (h, msg.payload)

    def _refuse(self, server: int, msg: Message) -> str | None:
        """Why this reply is not an answer to an outstanding request (None: it is)."""
        h, link = msg.header, self.links[server]
        if not self.signer.verify(msg):
            return "bad_mac"  # a forgery, or a request reflected back (signed with the other direction's key)
        req = self.outstanding.get((server, 0 if h.op == Op.HELLO_OK else h.instance, h.seq))
        if req is None:
            return "unexpected"  # a late duplicate after a retry, or a replay
        if h.op not in (EXPECTED_REPLY[req.op], Op.ERROR, Op.EXPIRED) or h.key != req.key:
            return "wrong_reply"
        if req.op != Op.HELLO and h.session != link.session:
            return "bad_session"
        return None

    def _deliver(self, req: Request, on_reply: Callable[[Request, Header, memoryview], None]) -> None:
        h, payload = req.reply
        req.delivered, req.reply = True, None
        if h.op == Op.ERROR:
            raise PSError(f"parameter server {self.links[req.server].address} refused {req.op.name} (key {req.key}, "
                          f"step {req.step}): {bytes(payload).decode(errors='replace')}")
        on_reply(req, h, payload)

    def _watch(self, link: Link) -> None:
        while True:
            try:
                ev = recv_monitor_message(link.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_CONNECTED:
                link.connected, link.lost_at = True, None
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                link.connected, link.lost_at = False, time.monotonic()

    def collect(self, reqs: list[Request], on_reply: Callable[[Request, Header, memoryview], None] | None = None,
                timeout_s: float | None = None, what: str = "replies") -> None:
        """Block until every request in `reqs` has its reply (fed to on_reply), or raise naming the culprit."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        on_reply = on_reply or (lambda r, h, p: None)
        while True:
            for r in reqs:
                if r.done and not r.delivered:
                    self._deliver(r, on_reply)
            waiting = [r for r in reqs if not r.done]
            if not waiting:
                return
            now = time.monotonic()
            for link_i in {r.server for r in waiting}:
                link = self.links[link_i]
                if link.lost_at is not None and now - link.lost_at > DISCONNECT_GRACE_S:
                    n = sum(r.server == link_i for r in waiting)
                    raise PSTimeout(f"parameter server {link.address} closed the connection (it died or was stopped) "
                                  f"while {n} {what} were outstanding; restart it (and the job from a checkpoint)")
            if now >= deadline:
                raise self._diagnose(waiting, timeout_s, what)
            stale = [r for r in waiting if r.expired or now - r.sent_at > self.retry_s]
            for server in sorted({r.server for r in stale if r.op != Op.HELLO}):
                self._rehello(server, min(self.retry_s, max(0.1, deadline - now)))
            for r in stale:
                if not r.expired:
                    log.warning("no reply from parameter server %s for %s (key %d, step %d) after %.0fs; resending",
                                self.links[r.server].address, r.op.name, r.key, r.step, now - r.sent_at)
                r.expired = False
                self._send(r)  # fresh seq: the server answers it, and applies the payload at most once
            self._poll(max(1, int(min(deadline - now, 0.5) * 1000)))

    def _poll(self, timeout_ms: int) -> None:
        events = dict(self.poller.poll(timeout_ms))
        for i, link in enumerate(self.links):
            if link.monitor in events:
                self._watch(link)
            if link.sock in events:
                self._receive(i)

    def _rehello(self, server: int, timeout_s: float) -> None:
        """A fresh instance on `server` before a resend: the server said EXPIRED (its replay window
        forgot this client's instance, replay.py), or said nothing and may have restarted."""
        try:
            self._handshake([server], timeout_s)
        except PSError as e:
            log.warning("re-handshake with parameter server %s failed before a retry: %s",
                        self.links[server].address, e)

    def _diagnose(self, waiting: list[Request], timeout_s: float, what: str) -> PSTimeout:
        r = waiting[0]
        link = self.links[r.server]
        head = (f"{self.worker_names[self.worker]}: no reply from parameter server {link.address} "
                f"for {r.op.name} (key {r.key}, step {r.step}) within {timeout_s:.1f}s "
                f"({len(waiting)} {what} outstanding)")
        if r.op != Op.PUSH:
            return PSTimeout(f"{head}. The server may be down or unreachable, the workers may disagree on the "
                             "token, or a worker may be stuck; check the server's log and the other workers")
        try:
            status = self.submit(r.server, Op.STATUS, r.key, r.step)
            flags: list[int] = []
            self.collect([status], lambda q, h, p: flags.extend(bytes(p)), timeout_s=min(2.0, timeout_s),
                         what="status replies")
        except PSError:
            return PSTimeout(f"{head}; it does not answer a status query either: it died or is unreachable "
                             "(or this worker's token differs from the server's)")
        missing = [self.worker_names[w] for w, f in enumerate(flags) if not f and w < len(self.worker_names)]
        return PSTimeout(f"{head}: the server is alive but is still waiting for {', '.join(missing) or 'nobody'} "
                         f"to push step {r.step}; that worker stopped, crashed or is stuck — check its log")

    # -- simple round trips --------------------------------------------------------------------
    def hello(self, timeout_s: float | None = None) -> None:
        """Wait for every server to answer; learn each one's session and this client's instance id."""
        self._handshake(range(len(self.links)), timeout_s)

    def _handshake(self, servers, timeout_s: float | None) -> None:
        reqs = [self.submit(i, Op.HELLO) for i in servers]

        def got(req: Request, h: Header, p) -> None:
            link = self.links[req.server]
            link.session, link.instance, link.counter = h.session, h.instance, 0

        try:
            self.collect(reqs, got, timeout_s, what="HELLO replies")
        except PSTimeout:
            if any(self.links[r.server].lost_at is not None for r in reqs if not r.done):
                raise   # a server that dropped the connection: collect() said so, keep that message
            missing = [self.links[r.server].address for r in reqs if not r.done]
            raise PSTimeout(f"parameter server(s) {', '.join(missing)} did not answer within "
                            f"{self.timeout_s if timeout_s is None else timeout_s:.1f}s: not running, wrong address, "
                            f"or a different token or connection auth (this worker uses {self.conn_auth!r}; the "
                            "server refuses unauthenticated connections and silently drops unauthenticated "
                            "messages)") from None

    def stats(self, server: int, timeout_s: float | None = None) -> dict:
        import json

        out: dict = {}
        self.collect([self.submit(server, Op.STATS)], lambda r, h, p: out.update(json.loads(bytes(p))),
                     timeout_s, what="STATS replies")
        return out

    def close(self) -> None:
        for link in self.links:
            link.sock.disable_monitor()
            link.monitor.close(0)
            link.sock.close(0)
        self.links = []
