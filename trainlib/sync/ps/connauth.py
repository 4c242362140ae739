"""Connection-level authentication: an unauthenticated peer stops at the ZeroMQ handshake.

The per-message MAC (protocol.py) decides what a message may do, but libzmq buffers a message in
full before the server sees any of it, and ZMQ_MAXMSGSIZE caps a frame, not a message: a peer
with no token could stream frames with MORE set and never a last one, and the server's memory
would grow without bound (issue 17). So the server also authenticates the connection, before
libzmq accepts a single message frame from it:

    plain  (default)  ZeroMQ PLAIN: the worker presents a credential derived from the token,
                      the server's ZAP handler (below) compares it in constant time. No per-byte
                      cost. The credential crosses the wire in clear, so an on-path observer who
                      records a handshake could reuse it to connect (not to forge messages: those
                      keys never leave the hosts). Measured auth cost at 4 MB: benchmarks/bench_ps.py.
    curve             ZeroMQ CURVE (CurveZMQ, Curve25519 + XSalsa20-Poly1305) with key pairs
                      derived from the token: nothing reusable crosses the wire and gradients are
                      encrypted, but every byte is encrypted and decrypted by libzmq's I/O thread,
                      several times the cost of the transport here (bench_ps.py); for untrusted networks.
                      The per-message MAC stays on under CURVE. CURVE alone already stops forgery,
                      reflection (each direction has its own nonce prefix) and replay of recorded
                      traffic (ephemeral session keys), but libzmq admits any CURVE client when no
                      ZAP handler answers: the MAC is what still demands the token then. It costs
                      4 Poly1305 passes per round trip beside CURVE's 4 crypto_box passes, each
                      about 4x slower (bench_ps.py), so dropping it would not make CURVE cheap.
    none              no connection check: only with --insecure servers (loopback only).

Both sides must use the same mode: servers read `--conn-auth`, workers `TRAINLIB_PS_CONN_AUTH`,
and the server's flag defaults to that same variable, so setting it for the job sets both.
"""
from __future__ import annotations

import hmac
import logging
import os

import zmq

from .keys import PLAIN_USERNAME, ConnKeys, conn_keys

log = logging.getLogger("trainlib")

CONN_AUTH_ENV = "TRAINLIB_PS_CONN_AUTH"
MODES = ("plain", "curve")
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP spec (RFC 27)


def conn_auth_mode(mode: str | None, token: str | None) -> str:
    """The effective mode: 'none' without a token, else `mode`, else $TRAINLIB_PS_CONN_AUTH, else 'plain'."""
    if not token:
        return "none"
    mode = mode or os.environ.get(CONN_AUTH_ENV) or "plain"
    if mode not in MODES:
        raise ValueError(f"connection auth {mode!r} (from the argument or ${CONN_AUTH_ENV}) is not one of {MODES}; "
                         "'plain' checks a token-derived credential at the handshake, 'curve' also encrypts")
    return mode


def secure_client(sock: zmq.Socket, mode: str, token: str | None) -> None:
    """Set a worker's DEALER socket up for `mode` (before connect)."""
    if mode == "none":
        return
    keys = conn_keys(token)
    if mode == "plain":
        sock.plain_username, sock.plain_password = PLAIN_USERNAME, keys.plain_password
    else:
        sock.curve_serverkey = keys.curve_server_public
        sock.curve_publickey, sock.curve_secretkey = keys.curve_client_public, keys.curve_client_secret


def secure_server(sock: zmq.Socket, mode: str, token: str | None) -> None:
    """Set the server's ROUTER socket up for `mode` (before bind); ZAP decides who gets in."""
    if mode == "none":
        return
    sock.zap_domain = b"trainlib-ps"
    if mode == "plain":
        sock.plain_server = True
    else:
        keys = conn_keys(token)
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = keys.curve_server_public, keys.curve_server_secret


class ZapHandler:
    """The server's ZAP handler (RFC 27), served from the server loop: no thread.

    Accepts a PLAIN peer whose username and password are the token-derived ones, or a CURVE peer
    whose long-term public key is the token-derived worker key; refuses everything else (libzmq
    then closes the connection before any message frame is accepted)."""

    def __init__(self, ctx: zmq.Context, mode: str, token: str):
        self.mode = mode
        self.keys: ConnKeys = conn_keys(token)
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.accepted = 0
        self.refused = 0

    def _allowed(self, mechanism: bytes, credentials: list[bytes]) -> bool:
        if self.mode == "plain" and mechanism == b"PLAIN" and len(credentials) == 2:
            user, password = credentials
            return hmac.compare_digest(user, PLAIN_USERNAME) & hmac.compare_digest(password, self.keys.plain_password)
        if self.mode == "curve" and mechanism == b"CURVE" and len(credentials) == 1:
            return hmac.compare_digest(credentials[0], self.keys.curve_client_public_raw)
        return False

    def handle(self) -> None:
        """Answer every pending ZAP request (non-blocking)."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # version, request id, domain, address, routing id, mechanism, credentials...
            if len(frames) < 6:
                log.warning("malformed ZAP request (%d frames)", len(frames))
                self.sock.send_multipart([b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"bad request",
                                          b"", b""])
                continue
            version, request_id, _, address, _, mechanism, *credentials = frames
            ok = version == b"1.0" and self._allowed(mechanism, credentials)
            if ok:
                self.accepted += 1
            else:
                self.refused += 1
                log.info("refused a %s connection from %s at the handshake", mechanism.decode(errors="replace"),
                         address.decode(errors="replace"))
            self.sock.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                      b"OK" if ok else b"not a trainlib worker", b"worker" if ok else b"", b""])

    def close(self) -> None:
        self.sock.close(0)
