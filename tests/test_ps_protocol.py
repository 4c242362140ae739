"""Parameter-server pieces that need no sockets: wire format, fuzzed decoder, MAC, sharding, server state."""
from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainlib.sync.ps.protocol import (HEADER_FORMAT, HEADER_SIZE, MAC_SIZE, DType, Header, Message, Op,
                                       NONCE_SIZE, VERSION, ProtocolError, Signer, decode)
from trainlib.sync.ps.sharding import KEY_BITS, plan_partitions, server_loads
from trainlib.sync.ps.replay import ReplayWindow
from trainlib.sync.ps.state import ServerState, wire_bytes

TOKEN = "protocol-test-token-0123456789"


def frames_for(header: Header, payload: bytes = b"", token: str = TOKEN) -> list:
    return Signer(token, "client").encode(header, payload)


def test_round_trip_and_mac():
    payload = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    h = Header(op=Op.PUSH, worker=1, nworkers=2, key=7, step=3, seq=99, session=5, instance=11,
               nbytes=len(payload), dtype=DType.FLOAT32, arg=2)
    msg = decode(frames_for(h, payload))
    assert msg.header == h and bytes(msg.payload) == payload
    signer = Signer(TOKEN, "server")  # a request is checked under the worker->server key
    assert signer.verify(msg)
    assert not Signer(TOKEN, "client").verify(msg)  # ... not as a reply: a reflected request is refused
    assert not Signer("another-token-0123456789", "server").verify(msg)
    assert not Signer(None, "server").verify(msg)
    for i in range(0, HEADER_SIZE + len(payload), 5):  # any flipped bit breaks the MAC
        raw = bytearray(msg.raw_header + bytes(msg.payload))
        raw[i] ^= 1
        forged = Message(msg.header, memoryview(bytes(raw[HEADER_SIZE:])), msg.mac, bytes(raw[:HEADER_SIZE]))
        assert not signer.verify(forged)


@pytest.mark.parametrize("field,value,reason", [
    ("magic", b"XXXX", "bad_magic"), ("version", 9, "bad_version"), ("op", 200, "bad_op"),
    ("dtype", 77, "bad_dtype"), ("flags", 1, "bad_flags"), ("worker", 2, "bad_worker"),
    ("nworkers", 0, "bad_worker"), ("nbytes", 1 << 40, "too_large"), ("nbytes", 12, "bad_length"),
])
def test_every_header_field_is_checked(field, value, reason):
    good = dict(magic=b"TLPS", version=VERSION, op=int(Op.PUSH), dtype=int(DType.FLOAT32), flags=0, worker=1, nworkers=2,
                key=0, arg=0, step=1, seq=1, session=1, instance=1, nbytes=8)
    good[field] = value
    raw = struct.pack(HEADER_FORMAT, *good.values())
    with pytest.raises(ProtocolError) as e:
        decode([raw, b"\0" * 8, b"\0" * MAC_SIZE])
    assert e.value.reason == reason


def test_truncated_and_misshapen_frames():
    ok = frames_for(Header(op=Op.HELLO))
    for frames, reason in [(ok[:2], "bad_frames"), ([ok[0][:20], ok[1], ok[2]], "bad_header_size"),
                           ([ok[0], ok[1], ok[2][:7]], "bad_mac_size"), ([*ok, b""], "bad_frames")]:
        with pytest.raises(ProtocolError) as e:
            decode(frames)
        assert e.value.reason == reason
    h = Header(op=Op.PUSH, nbytes=6, dtype=DType.FLOAT32)  # 6 bytes is not a whole float32
    with pytest.raises(ProtocolError, match="whole number"):
        decode([h.pack(), b"\0" * 6, b"\0" * MAC_SIZE])


# 7,000 + 3,000 (below) = 10,000 fuzzed decoder cases per run
@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=96), min_size=0, max_size=5))
def test_fuzz_decoder_random_frames(frames):
    """Arbitrary frames: decode returns a checked Message or raises ProtocolError, nothing else."""
    try:
        msg = decode(frames, max_bytes=1024)
    except ProtocolError:
        return
    assert msg.header.nbytes == len(msg.payload) <= 1024 and msg.header.worker < msg.header.nworkers


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.tuples(st.sampled_from([b"TLPS", b"TLPX"]), st.integers(0, 2), st.integers(0, 255), st.integers(0, 255),
                 st.integers(0, 255), st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 2**32 - 1),
                 st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                 st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                 st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1))),
       st.binary(max_size=64), st.binary(min_size=30, max_size=34))
def test_fuzz_decoder_structured_headers(fields, payload, mac):
    """Well-formed-looking headers with random field values: accepted only when every field is valid."""
    raw = struct.pack(HEADER_FORMAT, *fields)
    try:
        msg = decode([raw, payload, mac], max_bytes=1024)
    except ProtocolError as e:
        assert e.reason.startswith("bad_") or e.reason == "too_large"
        return
    h = msg.header
    assert (h.magic, h.version, h.flags) == (b"TLPS", VERSION, 0) and h.op in set(Op) and h.dtype in set(DType)
    assert h.nbytes == len(payload) and len(mac) == MAC_SIZE and h.worker < h.nworkers


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=12), st.sampled_from([2, 4, 8]),
       st.floats(0.001, 0.02), st.integers(1, 5), st.integers(0, 4095))
def test_partitions_cover_and_balance(numels, itemsize, partition_mb, n_servers, group):
    parts = plan_partitions(numels, itemsize, partition_mb, n_servers, group)
    assert parts == plan_partitions(numels, itemsize, partition_mb, n_servers, group)  # deterministic
    cap = max(1, int(partition_mb * 2**20) // itemsize)
    for b, n in enumerate(numels):  # every element exactly once, in order, pieces within the cap
        mine = [p for p in parts if p.bucket == b]
        assert [p.offset for p in mine] == list(range(0, n, cap)) and sum(p.numel for p in mine) == n
        assert all(p.numel <= cap for p in mine)
    assert len({p.key for p in parts}) == len(parts) and all(p.key >> KEY_BITS == group for p in parts)
    loads = server_loads(parts, itemsize, n_servers)
    assert max(loads) - min(loads) <= cap * itemsize  # LPT greedy: within one partition


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="partition_mb"):
        plan_partitions([10], 4, 0, 2)
    with pytest.raises(ValueError, match="at least one parameter server"):
        plan_partitions([10], 4, 4.0, 0)


# -- server state, driven directly ------------------------------------------------------------
def _msg(op, payload=b"", **kw) -> Message:
    return decode(frames_for(Header(op=op, nbytes=len(payload), **kw), payload))


def _f32(*xs) -> bytes:
    return torch.tensor(xs, dtype=torch.float32).numpy().tobytes()


def _values(reply) -> list[float]:
    return torch.frombuffer(bytearray(bytes(reply[2])), dtype=torch.float32).tolist()


def test_sync_sum_exactly_once_and_order_independent():
    s = ServerState()
    kw = dict(nworkers=3, key=4, step=1, dtype=DType.FLOAT32)
    assert s.handle(b"w2", _msg(Op.PUSH, _f32(1, 3), worker=2, **kw)) == []
    assert s.handle(b"w2", _msg(Op.PUSH, _f32(1, 3), worker=2, **kw)) == []  # a retry: not added again
    assert s.handle(b"w0", _msg(Op.PUSH, _f32(1e8, 1), worker=0, **kw)) == []
    replies = s.handle(b"w1", _msg(Op.PUSH, _f32(-1e8, 2), worker=1, **kw))
    assert [r[0] for r in replies] == [b"w2", b"w0", b"w1"]  # the retry replaced its first copy: one reply each
    # float32 (1e8 + -1e8) + 1 = 1 in worker order; arrival order (1 + 1e8) + -1e8 would give 0
    assert _values(replies[0]) == [1.0, 6.0]
    late = s.handle(b"w0", _msg(Op.PUSH, _f32(5, 5), worker=0, **kw))  # retry after completion
    assert _values(late[0]) == _values(replies[0])
    status = s.handle(b"w0", _msg(Op.STATUS, worker=0, nworkers=3, key=4, step=1))
    assert bytes(status[0][2]) == b"\1\1\1"


def test_async_ssp_bound_exactly_once_delta_and_save_restore(tmp_path):
    s = ServerState()
    kw = dict(nworkers=2, key=1, dtype=DType.FLOAT32, arg=1)  # staleness 1
    assert s.handle(b"a", _msg(Op.PULL, worker=1, step=0, **kw)) == []  # waits for INIT
    out = s.handle(b"a", _msg(Op.INIT, _f32(0, 0), worker=0, step=0, **kw))
    assert [r[1].op for r in out] == [Op.ACK, Op.PARAMS]
    out = s.handle(b"a", _msg(Op.DELTA, _f32(1, 1), worker=0, step=1, **kw))
    assert _values(out[0]) == [1, 1]  # lead 1 <= staleness 1: granted
    assert s.handle(b"a", _msg(Op.DELTA, _f32(1, 1), worker=0, step=2, **kw)) == []  # lead 2 > 1: waits
    assert s.handle(b"a", _msg(Op.DELTA, _f32(1, 1), worker=0, step=2, **kw)) == []  # retry: applied once
    assert s.params[1].tolist() == [2, 2] and s.max_lead == 1
    out = s.handle(b"b", _msg(Op.DELTA, _f32(10, 0), worker=1, step=1, **kw))  # slowest catches up
    # worker 0's read (once: its retry replaced the first copy) and worker 1's own
    assert sorted((o[1].worker, len(o[2])) for o in out) == [(0, 8), (1, 8)] and s.max_lead == 1
    assert s.params[1].tolist() == [12, 2]
    s.state_dir = str(tmp_path)
    s.save(s.state_dir)
    t = ServerState()
    assert t.load(str(tmp_path)) and t.params[1].tolist() == [12, 2] and t.clocks == s.clocks
    assert not ServerState().load(str(tmp_path / "none"))


def test_parameter_server_arguments_are_checked():
    from trainlib.sync.ps import ParameterServer

    for kw, words in [(dict(mode="x"), "not one of"), (dict(staleness=2), "only applies to mode='async'"),
                      (dict(mode="async", staleness=-1), ">= 0"), (dict(partition_mb=100), "frame cap"),
                      (dict(partition_mb=0), "must be positive"), (dict(timeout_s=0), "positive seconds")]:
        with pytest.raises(ValueError, match=words):
            ParameterServer(**kw)
    assert ParameterServer(mode="async", staleness=3).reduces_in_backward is False
    assert ParameterServer().reduces_in_backward is True


def test_encode_many_signs_each_reply_under_its_own_key():
    signer, worker = Signer(TOKEN, "server"), Signer(TOKEN, "client")
    payload = torch.arange(8, dtype=torch.float32).numpy()
    headers = [Header(op=Op.SUM, worker=w, nworkers=3, seq=10 + w, nbytes=32, dtype=DType.FLOAT32) for w in range(3)]
    many = signer.encode_many(headers, payload)
    for h, frames in zip(headers, many):
        assert frames[0] == h.pack()
        assert worker.verify(decode(frames)) and not signer.verify(decode(frames))
    # Poly1305 keys are one-time: every message carries its own nonce, so no two share a key
    assert len({bytes(frames[2][:NONCE_SIZE]) for frames in many}) == len(many)
    # a tag is bound to its header: worker 1's mac on worker 0's header is refused
    assert not worker.verify(decode([many[0][0], many[0][1], many[1][2]]))


def test_reply_buffers_are_not_changed_by_later_updates():
    """zmq sends a reply from its buffer after handle() returns (zero-copy, MAC already computed):
    a later delta must not write into a buffer still waiting to be sent."""
    s = ServerState()
    kw = dict(nworkers=1, key=2, dtype=DType.FLOAT32, arg=0)
    s.handle(b"a", _msg(Op.INIT, _f32(1, 2), worker=0, step=0, **kw))
    first = s.handle(b"a", _msg(Op.DELTA, _f32(1, 1), worker=0, step=1, **kw))[0]
    s.handle(b"a", _msg(Op.DELTA, _f32(5, 5), worker=0, step=2, **kw))
    assert _values(first) == [2, 3] and s.params[2].tolist() == [7, 8]


# -- replay window (replay.py) against an unbounded reference ------------------------------------
class _Unbounded:
    """The reference: remembers every instance forever."""

    def __init__(self):
        self.next, self.last = 1, {}

    def issue(self) -> int:
        self.next += 1
        return self.next - 1

    def check(self, instance: int, seq: int) -> bool:
        if not 0 < instance < self.next or seq <= self.last.get(instance, 0):
            return False
        self.last[instance] = seq
        return True


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.lists(st.tuples(st.booleans(), st.integers(0, 12), st.integers(0, 6)), max_size=80))
def test_replay_window_never_accepts_what_the_unbounded_reference_refuses(cap, ops):
    window, ref, big = ReplayWindow(cap), _Unbounded(), ReplayWindow(10_000)
    for is_issue, instance, seq in ops:
        if is_issue:
            assert window.issue() == ref.issue() == big.issue()
            continue
        fresh = ref.check(instance, seq)
        assert (big.check(instance, seq) is None) == fresh  # with room for everyone: the same decisions
        if window.check(instance, seq) is None:
            assert fresh  # bounded: it may forget (and refuse), never accept a replay
        assert len(window.last) <= cap


def test_replay_window_forgets_least_recently_active_and_never_readmits():
    w = ReplayWindow(cap=2)
    a, b, c = w.issue(), w.issue(), w.issue()
    assert w.check(a, 1) is None and w.check(b, 1) is None and w.check(a, 2) is None
    assert w.check(c, 1) is None  # b was the least recently active: forgotten
    assert list(w.last) == [a, c] and w.check(b, 2) == "expired_instance" and w.check(b, 9) == "expired_instance"
    assert w.check(a, 2) == "replay" and w.check(4, 1) == "bad_instance" and w.check(0, 1) == "bad_instance"
    assert w.stats() == {"entries": 2, "cap": 2, "issued": 3, "evicted": 1, "floor": b + 1, "accepted": 4}


def test_reads_before_init_count_against_the_key_cap_and_retries_do_not_pile_up():
    s = ServerState(max_keys=2)
    kw = dict(nworkers=1, worker=0, dtype=DType.FLOAT32, arg=0)
    for _ in range(3):  # the same read, retried: one waiter
        assert s.handle(b"a", _msg(Op.PULL, key=1, step=0, **kw)) == []
    assert s.n_waiting == 1 and len(s.waiting[1]) == 1
    assert s.handle(b"a", _msg(Op.PULL, key=2, step=0, **kw)) == []
    refused = s.handle(b"a", _msg(Op.PULL, key=3, step=0, **kw))  # a third key: over the cap
    assert [r[1].op for r in refused] == [Op.ERROR] and b"--max-keys" in bytes(refused[0][2])
    out = s.handle(b"a", _msg(Op.INIT, _f32(4, 5), key=1, step=0, **kw))
    assert [r[1].op for r in out] == [Op.ACK, Op.PARAMS] and _values(out[1]) == [4, 5]  # answered once
    assert s.n_waiting == 1


def test_digest_covers_bf16_pushes():
    s = ServerState()
    kw = dict(nworkers=2, worker=0, key=1, step=1, dtype=DType.BFLOAT16)
    digests = []
    for vals in ([1.0, 2.0], [1.0, 3.0]):
        t = ServerState()
        t.handle(b"a", _msg(Op.PUSH, torch.tensor(vals, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes(), **kw))
        digests.append(t.digest())
    assert digests[0] != digests[1] != s.digest()  # the pending bf16 push is in the digest
