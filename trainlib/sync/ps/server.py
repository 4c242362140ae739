"""One parameter server: a ZeroMQ ROUTER loop in front of `ServerState`.

    trainlib ps-server --bind 127.0.0.1:5555 --token-file /var/run/secrets/trainlib/token
    TRAINLIB_PS_TOKEN=... trainlib ps-server --bind 0.0.0.0:5555     # dedicated server pod
    trainlib ps-server --bind 127.0.0.1:0 --insecure                 # local experiments only

Every message is decoded and checked (protocol.decode), authenticated (Poly1305 with a one-time key
from the shared token), checked for its session id and for a sequence number above the sender's last one
(replay), and only then handed to the state. Anything that fails is dropped and counted under its
reason, with no reply and no state change; the loop never dies on input. libzmq's own
ZMQ_MAXMSGSIZE cuts off a peer that sends an oversized frame before Python ever sees it.
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

from .protocol import DEFAULT_MAX_BYTES, HEADER_SIZE, MAC_SIZE, SEQ_COUNTER_BITS, Op, ProtocolError, Signer, decode
from .sharding import KEY_BITS
from .state import ServerState
from .token import TokenError, is_loopback, read_token

log = logging.getLogger("trainlib")


class ParameterServerProcess:
    """The socket loop. `serve_forever()` runs until `stop()` (or SIGTERM in the CLI)."""

    def __init__(self, bind: str = "127.0.0.1:0", token: str | None = None, insecure: bool = False,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_keys: int = 1 << 20, state_dir: str | None = None,
                 worker_timeout_s: float = 300.0):
        host, _, port = bind.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--bind {bind!r} must be HOST:PORT (e.g. 127.0.0.1:5555; port 0 picks a free one)")
        if not token and not insecure:
            raise TokenError("refusing to start without a token: set TRAINLIB_PS_TOKEN, pass --token-file "
                             "(e.g. a mounted Kubernetes Secret), or --insecure for a loopback-only experiment")
        if not token and not is_loopback(host):
            raise TokenError(f"--insecure is only allowed on loopback, not on {host}; give a token to bind {host}")
        self.signer = Signer(token)
        self.max_bytes = max_bytes
        self.dropped: collections.Counter[str] = collections.Counter()
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # the frame cap, enforced by libzmq while reading: a huge length prefix costs no memory
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_bytes + HEADER_SIZE + MAC_SIZE + 1024)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if port == "0":
            port = str(self.sock.bind_to_random_port(f"tcp://{host}"))
        else:
            self.sock.bind(f"tcp://{host}:{port}")
        self.address = f"{host}:{port}"
        self.state = ServerState(max_keys=max_keys, state_dir=state_dir, name=f"ps-{port}",
                                 worker_timeout_s=worker_timeout_s)
        self.state.name = f"ps {self.address}"
        if state_dir and self.state.load(state_dir):
            log.info("%s: restored async state from %s", self.state.name, state_dir)
        self._running = True

    def stop(self) -> None:
        self._running = False

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        log.debug("%s: dropped a message (%s)", self.state.name, reason)

    def handle_frames(self, frames: list) -> None:
        """Everything one incoming multipart message can do. Never raises."""
        if len(frames) < 2:
            return self._drop("bad_frames")
        ident, body = frames[0].bytes, frames[1:]
        try:
            msg = decode(body, self.max_bytes)
        except ProtocolError as e:
            return self._drop(e.reason)
        h = msg.header
        if not self.signer.verify(msg):
            return self._drop("bad_mac")
        if h.op != Op.HELLO and h.session != self.state.session:
            return self._drop("bad_session")
        who = (h.key >> KEY_BITS, h.worker, h.seq >> SEQ_COUNTER_BITS)
        if h.seq <= self.state.last_seq.get(who, 0):
            return self._drop("replay")
        self.state.last_seq[who] = h.seq
        try:
            if h.op == Op.STATS:
                body = json.dumps(self.state.stats(self.dropped)).encode()
                replies = [self.state.reply(ident, h, Op.STATS_OK, body)]
            else:
                replies = self.state.handle(ident, msg)
        except Exception as e:  # a bug must not take the server (and the job) down
            log.exception("%s: internal error on %s", self.state.name, Op(h.op).name)
            self.dropped["internal_error"] += 1
            replies = [self.state.reply(ident, h, Op.ERROR, f"internal server error: {e}".encode())]
        self._send(replies)

    def _send(self, replies: list) -> None:
        # replies that share a payload (one sum for W workers) are signed with one pass over it
        groups: dict[int, list] = {}
        for reply in replies:
            groups.setdefault(id(reply[2]), []).append(reply)
        for group in groups.values():
            frames = self.signer.encode_many([h for _, h, _ in group], group[0][2])
            for (peer, _, _), f in zip(group, frames):
                try:
                    self.sock.send_multipart([peer, *f], copy=False)
                except zmq.ZMQError:  # the peer went away; nothing to do
                    self.dropped["unroutable_reply"] += 1

    def serve_forever(self, poll_ms: int = 200, parent_pid: int | None = None) -> None:
        """Serve until stop(); with parent_pid, also stop when that process is gone (colocated mode:
        a worker killed with SIGKILL must not leave an orphan server holding a port)."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        last_expire = time.monotonic()
        while self._running:
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("%s: parent process %d is gone; stopping", self.state.name, parent_pid)
                break
            if time.monotonic() - last_expire > poll_ms / 1000:
                self._send(self.state.expire())
                last_expire = time.monotonic()
            if not poller.poll(poll_ms):
                continue
            while True:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.handle_frames(frames)
        self.sock.close(0)


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
    p.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process exits "
                   "(colocated servers started by a worker)")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("TRAINLIB_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s ps-server %(levelname)s %(message)s")
    try:
        token = read_token(args.token_file)
        server = ParameterServerProcess(args.bind, token, args.insecure, int(args.max_mb * 2 ** 20), args.max_keys,
                                        args.state_dir, args.worker_timeout)
    except (TokenError, ValueError, OSError, zmq.ZMQError) as e:
        print(f"trainlib ps-server: {e}", file=sys.stderr)
        return 1

    def _term(signum, frame):
        server.stop()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    # the parent (colocated mode, tests) reads this line to learn the port
    print(f"trainlib ps-server listening on {server.address}", flush=True)
    server.serve_forever(parent_pid=os.getppid() if args.exit_with_parent else None)
    if args.state_dir and server.state.params:
        server.state.save(args.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
