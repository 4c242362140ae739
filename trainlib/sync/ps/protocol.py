"""The parameter-server wire format: a fixed binary header, raw tensor bytes, a MAC. No pickle.

Every message is three ZeroMQ frames (a ROUTER socket puts the peer's identity in front):

    [header (HEADER_SIZE bytes)] [payload (header.nbytes raw bytes, may be empty)] [mac (28 bytes)]

header, little-endian (struct HEADER_FORMAT):

    magic b"TLPS" | version u8 | op u8 | dtype u8 | flags u8 (0) | worker u16 | nworkers u16 |
    key u32 | arg u32 | step u64 | seq u64 | session u64 | instance u64 | nbytes u64

mac = nonce (12 random bytes) || Poly1305(one-time key, payload || header) (RFC 8439: the one-time
key is ChaCha20(K, nonce)'s first 32 bytes; see Signer). K depends on the direction (keys.py):
requests are signed with the worker->server key and replies with the server->worker key, so a
request bounced back to its sender is not a valid reply. The fixed-size header last makes the
split unambiguous. Version 1 used HMAC-SHA256 (~1.8 GB/s on one core here); version 2 had one
key for both directions and no instance field.

Freshness (replay.py): a HELLO carries a random client nonce in `seq` and changes nothing on the
server; its reply carries the server's `session` (random per server run) and a fresh `instance`
id issued by the server. Every other request carries that (session, instance) and a per-instance
counter in `seq`, all under the MAC, so a captured message can be replayed neither to the same
server (seq) nor to another or a restarted one (session). Replies echo the request's seq and
instance, and a client takes a reply only if it is the op its request expects (EXPECTED_REPLY).

`decode` is pure (bytes in, a Message or ProtocolError out) and checks every field; the server
calls it before touching any state, and the hypothesis fuzz test drives it directly.
"""
from __future__ import annotations

import enum
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20
from cryptography.hazmat.primitives.poly1305 import Poly1305

from .keys import mac_keys

MAGIC = b"TLPS"
VERSION = 3  # 3: per-direction keys, server-issued instances; 2: Poly1305; 1: HMAC-SHA256
HEADER_FORMAT = "<4sBBBBHHIIQQQQQ"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)
NONCE_SIZE = 12
TAG_SIZE = 16
MAC_SIZE = NONCE_SIZE + TAG_SIZE  # the mac frame: nonce || Poly1305 tag
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # one frame's payload; partitions are ~4 MB, so 16x headroom
MAX_WORKERS = 65535


class Op(enum.IntEnum):
    HELLO = 1        # -> HELLO_OK carrying the server's session id and a fresh client instance id
    PUSH = 2         # sync: add payload to the (key, step) sum; reply SUM once all nworkers pushed
    STATUS = 3       # sync: which workers pushed (key, step)? reply STATUS, payload = uint8 flags per worker
    INIT = 4         # async: set the parameters of key (first INIT wins); reply ACK
    PULL = 5         # async: reply PARAMS once min worker clock >= step - arg (arg = staleness)
    DELTA = 6        # async: params += payload if step == clock + 1 (else a retry: not applied); then as PULL
    BYE = 7          # async: this worker leaves; it no longer holds the others back
    STATS = 8        # reply STATS, payload = JSON (uint8): counters, clocks, state digest
    SAVE = 9         # async: write the state to the server's --state-dir; reply ACK
    # replies
    ACK = 64
    SUM = 65
    PARAMS = 66
    ERROR = 67       # payload = UTF-8 text naming the problem
    HELLO_OK = 68
    STATUS_OK = 69
    STATS_OK = 70
    EXPIRED = 71     # the server forgot this client instance (replay.py): say HELLO again, then resend


REQUESTS = {Op.HELLO, Op.PUSH, Op.STATUS, Op.INIT, Op.PULL, Op.DELTA, Op.BYE, Op.STATS, Op.SAVE}
# the one reply each request may get (besides ERROR): anything else is a forgery or a reflection
EXPECTED_REPLY = {Op.HELLO: Op.HELLO_OK, Op.PUSH: Op.SUM, Op.STATUS: Op.STATUS_OK, Op.INIT: Op.ACK,
                  Op.PULL: Op.PARAMS, Op.DELTA: Op.PARAMS, Op.BYE: Op.ACK, Op.STATS: Op.STATS_OK, Op.SAVE: Op.ACK}


class DType(enum.IntEnum):
    """Element types on the wire; the server sums float16/bfloat16 in float32."""

    UINT8 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    FLOAT16 = 3
    BFLOAT16 = 4


ITEMSIZE = {DType.UINT8: 1, DType.FLOAT32: 4, DType.FLOAT64: 8, DType.FLOAT16: 2, DType.BFLOAT16: 2}


class ProtocolError(ValueError):
    """A message that is not well formed; `reason` is a short counter name (e.g. "bad_magic")."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Header:
    op: int
    worker: int = 0
    nworkers: int = 1
    key: int = 0
    step: int = 0
    seq: int = 0
    session: int = 0
    instance: int = 0
    nbytes: int = 0
    dtype: int = DType.UINT8
    arg: int = 0
    flags: int = 0
    version: int = VERSION
    magic: bytes = MAGIC

    def pack(self) -> bytes:
        return struct.pack(HEADER_FORMAT, self.magic, self.version, self.op, self.dtype, self.flags, self.worker,
                           self.nworkers, self.key, self.arg, self.step, self.seq, self.session, self.instance,
                           self.nbytes)


@dataclass(frozen=True)
class Message:
    header: Header
    payload: memoryview  # raw bytes, zero-copy view of the received frame
    mac: bytes
    raw_header: bytes    # the exact bytes the MAC covers


def _buf(frame) -> memoryview:
    """bytes, bytearray, memoryview or a zmq.Frame -> a flat byte memoryview (no copy)."""
    b = getattr(frame, "buffer", frame)
    m = memoryview(b)
    return m if m.format == "B" and m.ndim == 1 else m.cast("B")


def decode(frames: list, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Parse and validate [header, payload, mac]; raise ProtocolError naming the first bad field.

    Checks, in order: frame count, header size, magic, version, op, dtype, flags, worker <
    nworkers, nbytes against the cap, the actual payload length and the dtype's item size, MAC size.
    Pure: no state, no I/O, no MAC check (that needs the token: see `Signer.verify`)."""
    if len(frames) != 3:
        raise ProtocolError("bad_frames", f"expected 3 frames [header, payload, mac], got {len(frames)}")
    head, payload, mac = (_buf(f) for f in frames)
    if len(head) != HEADER_SIZE:
        raise ProtocolError("bad_header_size", f"header is {len(head)} bytes, expected {HEADER_SIZE}")
    raw = bytes(head)
    (magic, version, op, dtype, flags, worker, nworkers, key, arg, step, seq, session, instance,
     nbytes) = struct.unpack(HEADER_FORMAT, raw)
    if magic != MAGIC:
        raise ProtocolError("bad_magic", f"magic {magic!r} is not {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError("bad_version", f"protocol version {version}, this side speaks {VERSION}")
    try:
        op = Op(op)
    except ValueError:
        raise ProtocolError("bad_op", f"unknown op {op}") from None
    try:
        dtype = DType(dtype)
    except ValueError:
        raise ProtocolError("bad_dtype", f"unknown dtype code {dtype}") from None
    if flags != 0:
        raise ProtocolError("bad_flags", f"flags {flags:#x} must be 0 in version {VERSION}")
    if nworkers < 1 or worker >= nworkers:
        raise ProtocolError("bad_worker", f"worker {worker} is not in [0, nworkers={nworkers})")
    if nbytes > max_bytes:
        raise ProtocolError("too_large", f"nbytes {nbytes} exceeds the frame cap {max_bytes}")
    if nbytes != len(payload):
        raise ProtocolError("bad_length", f"header says {nbytes} payload bytes, frame has {len(payload)}")
    if nbytes % ITEMSIZE[dtype]:
        raise ProtocolError("bad_length", f"{nbytes} bytes is not a whole number of {dtype.name} elements")
    if len(mac) != MAC_SIZE:
        raise ProtocolError("bad_mac_size", f"mac is {len(mac)} bytes, expected {MAC_SIZE}")
    header = Header(op=op, worker=worker, nworkers=nworkers, key=key, step=step, seq=seq, session=session,
                    instance=instance, nbytes=nbytes, dtype=dtype, arg=arg, flags=flags, version=version, magic=magic)
    return Message(header, payload, bytes(mac), raw)


SIDES = ("client", "server")


class Signer:
    """Poly1305 with a one-time key per message, under the key of the direction a message travels.

    `side="client"` signs requests (worker->server key) and verifies replies (server->worker key);
    `side="server"` the opposite. A `None` token is insecure mode: an all-zero tag, still checked.

    The one-time key is RFC 8439's poly1305_key_gen: the first 32 bytes of the ChaCha20 keystream
    for (K, counter 0, a random 96-bit nonce), K = the direction's key from keys.mac_keys. The
    nonce travels in the mac frame (nonce || tag), so every message is MACed under its own key
    (Poly1305 must never see two messages under one key), whatever the sender's state. Poly1305
    runs at about memcpy speed on one core here (~9 GB/s on bytes in cache, ~4.5 GB/s on a frame
    just received; HMAC-SHA256 ~1.5 GB/s), and a push/pull round trip makes four passes (sign and
    verify, each way): what that costs against the transport is measured in benchmarks/bench_ps.py.
    `cryptography` holds the GIL while it MACs, so a MAC thread would not overlap anything."""

    def __init__(self, token: str | bytes | None, side: str):
        if side not in SIDES:
            raise ValueError(f"side={side!r} must be one of {SIDES}")
        self.secure = bool(token)
        self.side = side
        self._send_key = self._recv_key = None
        if token:
            c2s, s2c = mac_keys(token)
            self._send_key, self._recv_key = (c2s, s2c) if side == "client" else (s2c, c2s)

    @staticmethod
    def _tag(key: bytes, nonce: bytes, header: bytes, payload) -> bytes:
        block = Cipher(ChaCha20(key, b"\0\0\0\0" + nonce), mode=None).encryptor().update(bytes(32))
        mac = Poly1305(block)
        if len(payload):
            mac.update(_buf(payload))  # numpy arrays, zmq frames: any flat buffer, never copied
        mac.update(header)
        return mac.finalize()

    def sign(self, header: bytes, payload) -> bytes:
        if self._send_key is None:
            return bytes(MAC_SIZE)
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._tag(self._send_key, nonce, header, payload)

    def verify(self, msg: Message) -> bool:
        """Is msg's tag valid for a message travelling towards this side?"""
        if self._recv_key is None:
            return hmac.compare_digest(msg.mac, bytes(MAC_SIZE))
        nonce = msg.mac[:NONCE_SIZE]
        return hmac.compare_digest(self._tag(self._recv_key, nonce, msg.raw_header, msg.payload),
                                   msg.mac[NONCE_SIZE:])

    def encode(self, header: Header, payload=b"") -> list:
        """-> the three frames to send (the payload frame is the caller's buffer: zero-copy)."""
        raw = header.pack()
        return [raw, payload, self.sign(raw, _buf(payload) if len(payload) else b"")]

    def encode_many(self, headers: list[Header], payload=b"") -> list[list]:
        """Frames for several messages with one payload (each MACed under its own one-time key)."""
        return [self.encode(h, payload) for h in headers]
