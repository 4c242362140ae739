"""One parameter server: a ZeroMQ ROUTER loop in front of `ServerState`.

    trainlib ps-server --bind 127.0.0.1:5555 --token-file /var/run/secrets/trainlib/token
    TRAINLIB_PS_TOKEN=... trainlib ps-server --bind 0.0.0.0:5555     # dedicated server pod
    trainlib ps-server --bind 127.0.0.1:0 --insecure                 # local experiments only

Three gates, in order, before a message reaches the state:
  1. the connection: a peer must pass the ZeroMQ handshake with a token-derived credential
     (connauth.py, PLAIN or CURVE checked by a ZAP handler) before libzmq accepts one frame from
     it, so a peer with no token cannot make the server buffer anything; libzmq's ZMQ_MAXMSGSIZE
     cuts off a peer that sends an oversized frame, and ZMQ_RCVHWM caps the complete messages
     queued per connection (beyond it libzmq stops reading that connection: back-pressure);
  2. the message: decoded and checked (protocol.decode), authenticated (Poly1305 under the
     worker->server key);
  3. freshness: HELLO is answered here without touching any state (a fresh client instance id
     and the session); every other request must carry this run's session and a fresh
     (instance, seq) (replay.py).
Anything that fails is dropped and counted under its reason, with no reply and no state change.
Every step of handling one message, from decode to sending the replies, runs under one error
handler: the loop never dies on input.

`--metrics HOST:PORT` (PORT alone = 127.0.0.1) serves Prometheus metrics: requests by op, drops by
reason, bytes in and out, per-op handling-time histograms (trainlib/observe/ps_metrics.py). Off by
default, and then the loop does not even read the clock for it.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import sys
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from .connauth import CONN_AUTH_ENV, MODES, ZapHandler, conn_auth_mode, secure_server
from .protocol import DEFAULT_MAX_BYTES, HEADER_SIZE, MAC_SIZE, Op, ProtocolError, Signer, decode
from .replay import DEFAULT_MAX_CLIENTS, ReplayWindow
from .state import ServerState
from .token import TokenError, is_loopback, read_token

log = logging.getLogger("trainlib")

# complete messages libzmq may queue per connection before it stops reading from it; a worker
# rarely has more than a bucket's partitions (25 MB / 4 MB) in flight to one server
MAX_QUEUED_PER_CONNECTION = 64
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL |
                    zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class ParameterServerProcess:
    """The socket loop. `serve_forever()` runs until `stop()` (or SIGTERM in the CLI)."""

    def __init__(self, bind: str = "127.0.0.1:0", token: str | None = None, insecure: bool = False,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_keys: int = 1 << 20, state_dir: str | None = None,
                 worker_timeout_s: float = 300.0, conn_auth: str | None = None,
                 max_clients: int = DEFAULT_MAX_CLIENTS):
        host, _, port = bind.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--bind {bind!r} must be HOST:PORT (e.g. 127.0.0.1:5555; port 0 picks a free one)")
        if not token and not insecure:
            raise TokenError("refusing to start without a token: set TRAINLIB_PS_TOKEN, pass --token-file "
                             "(e.g. a mounted Kubernetes Secret), or --insecure for a loopback-only experiment")
        if not token and not is_loopback(host):
            raise TokenError(f"--insecure is only allowed on loopback, not on {host}; give a token to bind {host}")
        self.conn_auth = conn_auth_mode(conn_auth, token)
        self.signer = Signer(token, "server")
        self.max_bytes = max_bytes
        self.replay = ReplayWindow(max_clients)
        self.dropped: collections.Counter[str] = collections.Counter()
        self.hellos = 0
        self.handshakes_failed = 0  # connections, not messages: kept apart from `dropped`
        self.metrics = None  # a trainlib.observe.ps_metrics.PSMetrics when --metrics serves them
        self._op: int | None = None  # the op of the message being handled, once it passed every check
        # a context of its own: the ZAP endpoint is one per context, and tests run servers in-process
        self.ctx = zmq.Context()
        self.zap = ZapHandler(self.ctx, self.conn_auth, token) if self.conn_auth != "none" else None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # the frame cap, enforced by libzmq while reading: a huge length prefix costs no memory
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_bytes + HEADER_SIZE + MAC_SIZE + 1024)
        self.sock.setsockopt(zmq.RCVHWM, MAX_QUEUED_PER_CONNECTION)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        secure_server(self.sock, self.conn_auth, token)
        self.monitor = self.sock.get_monitor_socket(HANDSHAKE_FAILED)
        if port == "0":
            port = str(self.sock.bind_to_random_port(f"tcp://{host}"))
        else:
            self.sock.bind(f"tcp://{host}:{port}")
        self.address = f"{host}:{port}"
        self.state = ServerState(max_keys=max_keys, state_dir=state_dir, name=f"ps {self.address}",
                                 worker_timeout_s=worker_timeout_s)
        if state_dir and self.state.load(state_dir):
            log.info("%s: restored async state from %s", self.state.name, state_dir)
        self._running = True

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        self.sock.disable_monitor()
        for s in (self.monitor, self.sock):
            s.close(0)
        if self.zap is not None:
            self.zap.close()
        self.ctx.term()

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        log.debug("%s: dropped a message (%s)", self.state.name, reason)

    def handle_frames(self, frames: list) -> None:
        """Everything one incoming multipart message can do, replies included. Never raises."""
        m = self.metrics
        t0 = time.perf_counter() if m is not None else 0.0
        self._op = None
        try:
            replies = self._replies(frames)
            if replies:
                self._send(replies)
        except Exception:  # a bug must not take the server (and the job) down
            log.exception("%s: internal error handling a message", self.state.name)
            self.dropped["internal_error"] += 1
        if m is not None:
            m.received(frames)
            if self._op is not None:  # None: dropped, and counted under its reason
                m.observe(self._op, time.perf_counter() - t0)

    def _replies(self, frames: list) -> list:
        """The replies to one message; sets self._op once the message has passed every check."""
        if len(frames) < 2:
            self._drop("bad_frames")
            return []
        ident, body = frames[0].bytes, frames[1:]
        try:
            msg = decode(body, self.max_bytes)
        except ProtocolError as e:
            self._drop(e.reason)
            return []
        h = msg.header
        if not self.signer.verify(msg):
            self._drop("bad_mac")
            return []
        if h.op == Op.HELLO:  # stateless: a replayed HELLO gets an unused instance id and changes nothing
            self.hellos += 1
            self._op = h.op
            return [self.state.reply(ident, h, Op.HELLO_OK, instance=self.replay.issue())]
        if h.session != self.state.session:
            self._drop("bad_session")
            return []
        stale = self.replay.check(h.instance, h.seq)
        if stale:
            self._drop(stale)
            # a live worker whose instance was forgotten must learn it now, not at its retry timeout;
            # a replayed message gets the same empty notice, and nothing changes
            return [self.state.reply(ident, h, Op.EXPIRED)] if stale == "expired_instance" else []
        self._op = h.op
        try:
            if h.op == Op.STATS:
                return [self.state.reply(ident, h, Op.STATS_OK, json.dumps(self.stats()).encode())]
            return self.state.handle(ident, msg)
        except Exception as e:  # answer the worker, so it fails with the reason instead of a timeout
            log.exception("%s: internal error on %s", self.state.name, Op(h.op).name)
            self.dropped["internal_error"] += 1
            return [self.state.reply(ident, h, Op.ERROR, f"internal server error: {e}".encode())]

    def stats(self) -> dict:
        conn = {"mode": self.conn_auth, "hellos": self.hellos, "handshakes_failed": self.handshakes_failed}
        if self.zap is not None:
            conn.update(accepted=self.zap.accepted, refused=self.zap.refused)
        return {**self.state.stats(self.dropped), "replay": self.replay.stats(), "connections": conn}

    def _send(self, replies: list) -> None:
        m = self.metrics
        # replies that share a payload (one sum for W workers) are signed with one pass over it
        groups: dict[int, list] = {}
        for reply in replies:
            groups.setdefault(id(reply[2]), []).append(reply)
        for group in groups.values():
            frames = self.signer.encode_many([h for _, h, _ in group], group[0][2])
            for (peer, h, _), f in zip(group, frames):
                try:
                    self.sock.send_multipart([peer, *f], copy=False)
                except zmq.ZMQError:  # the peer went away; nothing to do
                    self.dropped["unroutable_reply"] += 1
                    continue
                if m is not None:
                    m.sent(h)

    def _watch(self) -> None:
        while True:
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] & HANDSHAKE_FAILED:
                self.handshakes_failed += 1

    def _tick(self, poller: zmq.Poller, poll_ms: int) -> None:
        events = dict(poller.poll(poll_ms))
        if self.zap is not None and self.zap.sock in events:
            self.zap.handle()
        if self.monitor in events:
            self._watch()
        if self.sock not in events:
            return
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.handle_frames(frames)

    def serve_forever(self, poll_ms: int = 200, parent_pid: int | None = None) -> None:
        """Serve until stop(); with parent_pid, also stop when that process is gone (colocated mode:
        a worker killed with SIGKILL must not leave an orphan server holding a port)."""
        poller = zmq.Poller()
        for s in (self.sock, self.monitor) + ((self.zap.sock,) if self.zap else ()):
            poller.register(s, zmq.POLLIN)
        last_expire = time.monotonic()
        while self._running:
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("%s: parent process %d is gone; stopping", self.state.name, parent_pid)
                break
            try:
                if time.monotonic() - last_expire > poll_ms / 1000:
                    last_expire = time.monotonic()
                    self._send(self.state.expire())
                self._tick(poller, poll_ms)
            except zmq.ContextTerminated:
                break
            except Exception:  # e.g. a ZAP or monitor hiccup: log it and keep serving
                log.exception("%s: error in the server loop", self.state.name)
                self.dropped["internal_error"] += 1
        self.close()


def _bad_flag(args) -> str | None:
    """The first flag a server must not start with, as a sentence naming the value and the fix."""
    host, _, port = args.bind.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"--bind={args.bind!r} is not HOST:PORT with a port in 0..65535 (0 picks a free one), e.g. 127.0.0.1:0"
    if not args.max_mb > 0:
        return f"--max-mb={args.max_mb} must be > 0 (the largest frame accepted, in MB; default {DEFAULT_MAX_BYTES / 2 ** 20:g})"
    if args.max_keys < 1:
        return f"--max-keys={args.max_keys} must be >= 1 (how many partitions the server may hold)"
    if args.max_clients < 1:
        return f"--max-clients={args.max_clients} must be >= 1 (client instances kept for replay checks)"
    if not args.worker_timeout > 0:
        return f"--worker-timeout={args.worker_timeout} must be > 0 seconds (default 300)"
    if args.state_dir and args.state_dir.startswith(("/proc", "/sys")):
        return f"--state-dir={args.state_dir!r} is not a place to write state; use a writable directory (a volume)"
    return None


def _serve_metrics(server: ParameterServerProcess, address: str):
    """Start counting and serve the counts; prometheus-client is imported only here (an optional extra)."""
    from ...observe.prometheus import MetricsServer, parse_address
    from ...observe.ps_metrics import PSCollector, PSMetrics

    host, port = parse_address(address, "--metrics")
    server.metrics = PSMetrics()  # before the endpoint: a scrape must find it
    return MetricsServer(PSCollector(server), host, port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trainlib ps-server", description="Run one parameter server (ZeroMQ, authenticated).")
    p.add_argument("--bind", default="127.0.0.1:0", help="HOST:PORT to listen on (default 127.0.0.1:0 = a free port)")
    p.add_argument("--token-file", help="file holding the shared token (default: env TRAINLIB_PS_TOKEN, "
                                        "or the file named by TRAINLIB_PS_TOKEN_FILE)")
    p.add_argument("--insecure", action="store_true", help="no authentication; allowed on loopback only")
    p.add_argument("--max-mb", type=float, default=DEFAULT_MAX_BYTES / 2 ** 20, help="frame size cap in MB")
    p.add_argument("--max-keys", type=int, default=1 << 20, help="cap on the number of partitions held")
    p.add_argument("--state-dir", help="where SAVE writes the async state (and where it is restored from)")
    p.add_argument("--worker-timeout", type=float, default=300.0, help="async: seconds of silence after which "
                   "a worker is presumed gone and no longer holds the others back (default 300)")
    p.add_argument("--conn-auth", choices=MODES, default=os.environ.get(CONN_AUTH_ENV) or "plain",
                   help=f"connection check at the ZeroMQ handshake, from the token: plain (default; no per-byte "
                        f"cost) or curve (also encrypts; several times slower); default ${CONN_AUTH_ENV}")
    p.add_argument("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS, help="client instances whose replay "
                   f"counters are kept (least recently active forgotten first; default {DEFAULT_MAX_CLIENTS})")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics on http://HOST:PORT/metrics "
                   "(PORT alone binds 127.0.0.1; 0.0.0.0:PORT for a pod's scrape); off by default")
    p.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process exits "
                   "(colocated servers started by a worker)")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("TRAINLIB_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s ps-server %(levelname)s %(message)s")
    bad = _bad_flag(args)
    if bad:
        print(f"trainlib ps-server: {bad}", file=sys.stderr)
        return 1
    try:
        token = read_token(args.token_file)
        server = ParameterServerProcess(args.bind, token, args.insecure, int(args.max_mb * 2 ** 20), args.max_keys,
                                        args.state_dir, args.worker_timeout, args.conn_auth, args.max_clients)
    except (TokenError, ValueError, OSError, zmq.ZMQError) as e:
        print(f"trainlib ps-server: {e}", file=sys.stderr)
        return 1
    metrics = None
    if args.metrics:
        try:
            metrics = _serve_metrics(server, args.metrics)
        except (ImportError, ValueError, OSError) as e:
            server.close()
            print(f"trainlib ps-server: --metrics={args.metrics!r}: {e}", file=sys.stderr)
            return 1

    def _term(signum, frame):
        server.stop()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    # the parent (colocated mode, tests) reads this line to learn the port
    print(f"trainlib ps-server listening on {server.address}", flush=True)
    if metrics is not None:
        print(f"trainlib ps-server metrics on http://{metrics.address}/metrics", flush=True)
    server.serve_forever(parent_pid=os.getppid() if args.exit_with_parent else None)
    if metrics is not None:
        metrics.close()
    if args.state_dir and server.state.params:
        server.state.save(args.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
