"""Issue 17, each weakness against a real `trainlib ps-server` on loopback: a HELLO replayed from an
earlier run of the server, a request reflected back to its sender, an unauthenticated endless
multipart message, STATS with a bf16 push pending, and the replay table across 1,000 client restarts."""
from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest
import torch
import zmq

from trainlib.sync.ps.client import PSClient
from trainlib.sync.ps.connauth import ZapHandler, secure_client, secure_server
from trainlib.sync.ps.launch import spawn_server
from trainlib.sync.ps.protocol import DType, Header, Op, Signer, decode
from trainlib.sync.ps.sharding import KEY_BITS

pytestmark = pytest.mark.timeout(120)

TOKEN = "hardening-test-token-0123456789"


@pytest.fixture(scope="module")
def server():
    """One default server (token, PLAIN connection check) for the tests that need nothing else."""
    s = spawn_server(token=TOKEN)
    yield s
    s.stop()


def _floats(p) -> list[float]:
    return torch.frombuffer(bytearray(p), dtype=torch.float32).tolist()


def _send(client: PSClient, op: Op, key: int, step: int, payload=b"", dtype=DType.FLOAT32, arg: int = 0,
          timeout_s: float | None = None) -> tuple[Header, bytes]:
    out = []
    client.collect([client.submit(0, op, key, step, payload, dtype, arg)], lambda r, h, p: out.append((h, bytes(p))),
                   timeout_s=timeout_s)
    return out[0]


def _tap(client: PSClient) -> list[list[bytes]]:
    """Record every message `client` sends (what an on-path observer sees), as bytes."""
    seen: list[list[bytes]] = []
    sock = client.links[0].sock
    send = sock.send_multipart

    def recording(frames, *a, **kw):
        seen.append([bytes(memoryview(f)) if len(f) else b"" for f in frames])
        return send(frames, *a, **kw)

    sock.send_multipart = recording
    return seen


def _raw_dealer(address: str, conn_credentials: bool = True) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if conn_credentials:
        secure_client(sock, "plain", TOKEN)
    sock.connect(f"tcp://{address}")
    return sock


# -- 1. a HELLO captured from an earlier run, replayed to the restarted server ------------------
def test_replayed_hello_from_an_earlier_run_changes_nothing(tmp_path):
    """Async, staleness 0: worker 1 says BYE, the server is restarted from its saved state; a replay of
    worker 1's HELLO from the first run must not re-admit it (worker 0 would then wait for it)."""
    key, x = 7, torch.ones(4)
    first = spawn_server(token=TOKEN, state_dir=str(tmp_path), extra=("--worker-timeout", "120"))
    workers = [PSClient([first.address], TOKEN, worker=w, nworkers=2, timeout_s=10) for w in range(2)]
    captured = _tap(workers[1])
    for w in workers:
        w.hello()
    hello = next(f for f in captured if decode(f).header.op == Op.HELLO)
    _send(workers[0], Op.INIT, key, 0, x.numpy())
    params = x.clone()  # the reference: INIT, then every applied delta added once
    for step in (1, 2):  # both workers in lockstep: at staleness 0 each read waits for the other
        reqs = [w.submit(0, Op.DELTA, key, step, x.numpy(), DType.FLOAT32, 0) for w in workers]
        for w, r in zip(workers, reqs):
            w.collect([r])
        params += 2 * x
    _send(workers[1], Op.BYE, 0, 0, dtype=DType.UINT8)
    for w in workers:
        w.close()
    first.stop()  # SIGTERM: the server saves its async state (worker 1 has left) on the way out

    second = spawn_server(token=TOKEN, state_dir=str(tmp_path), extra=("--worker-timeout", "120"))
    try:
        w0 = PSClient([second.address], TOKEN, worker=0, nworkers=2, timeout_s=5)
        w0.hello()
        h, p = _send(w0, Op.DELTA, key, 3, x.numpy())  # worker 1 left: worker 0 goes on alone
        params += x
        assert h.step == 3 and _floats(p) == params.tolist()
        before = w0.stats(0)
        replayer = _raw_dealer(second.address)  # the replayer even passes the connection check
        replayer.send_multipart(hello)
        assert replayer.poll(2000)  # answered (HELLO is stateless), with an instance nobody will use
        reply = decode(replayer.recv_multipart())
        assert reply.header.op == Op.HELLO_OK and reply.header.session == before["session"]
        replayer.close(0)
        after = w0.stats(0)
        assert after["digest"] == before["digest"]  # `left`, clocks and parameters untouched
        assert after["replay"]["entries"] == before["replay"]["entries"] == 1  # w0 only: no entry for the HELLO
        t0 = time.monotonic()
        h, p = _send(w0, Op.DELTA, key, 4, x.numpy(), timeout_s=5)  # not held back by a re-admitted worker 1
        params += x
        assert h.step == 4 and _floats(p) == params.tolist() and time.monotonic() - t0 < 2
        w0.close()
    finally:
        second.stop()


# -- 2. a request reflected back to its sender ---------------------------------------------------
class Reflector(threading.Thread):
    """An on-path relay between one worker and the server. It holds the connection credential (so
    it can sit in the path at all) but not the message keys. It bounces every PUSH back to its sender
    before forwarding it; with `forge`, it also answers the PUSH itself under the *server's* key
    but with the wrong op (what only a token holder could do: it checks the client's op check)."""

    def __init__(self, server: str, forge: bool = False):
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.zap = ZapHandler(self.ctx, "plain", TOKEN)
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        secure_server(self.front, "plain", TOKEN)
        self.address = f"127.0.0.1:{self.front.bind_to_random_port('tcp://127.0.0.1')}"
        self.back = self.ctx.socket(zmq.DEALER)
        self.back.setsockopt(zmq.LINGER, 0)
        secure_client(self.back, "plain", TOKEN)
        self.back.connect(f"tcp://{server}")
        self.forger = Signer(TOKEN, "server") if forge else None
        self.reflected = 0
        self.running = True

    def run(self) -> None:
        poller = zmq.Poller()
        for s in (self.front, self.back, self.zap.sock):
            poller.register(s, zmq.POLLIN)
        peer = None
        while self.running:
            events = dict(poller.poll(50))
            if self.zap.sock in events:
                self.zap.handle()
            if self.front in events:
                peer, *frames = self.front.recv_multipart()
                h = decode(frames).header
                if h.op == Op.PUSH:
                    self.front.send_multipart([peer, *frames])
                    self.reflected += 1
                    if self.forger is not None:
                        fake = Header(op=Op.PARAMS, worker=h.worker, nworkers=h.nworkers, key=h.key, step=h.step,
                                      seq=h.seq, session=h.session, instance=h.instance, nbytes=len(frames[1]),
                                      dtype=h.dtype)
                        self.front.send_multipart([peer, *self.forger.encode(fake, frames[1])])
                self.back.send_multipart(frames)
            if self.back in events:
                self.front.send_multipart([peer, *self.back.recv_multipart()])

    def close(self) -> None:
        self.running = False
        self.join(5)
        for s in (self.front, self.back):
            s.close(0)
        self.zap.close()
        self.ctx.term()


@pytest.mark.parametrize("forge", [False, True], ids=["reflected", "wrong_op"])
def test_reflected_push_is_rejected_by_the_client(server, forge):
    key = 3 + forge  # a key of its own per case: the server is shared
    relay = Reflector(server.address, forge)
    relay.start()
    try:
        a = PSClient([relay.address], TOKEN, worker=0, nworkers=2, timeout_s=10)
        b = PSClient([server.address], TOKEN, worker=1, nworkers=2, timeout_s=10)
        a.hello()
        b.hello()
        xa, xb = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
        ra = a.submit(0, Op.PUSH, key, 1, xa.numpy(), DType.FLOAT32)
        time.sleep(0.3)  # the reflection (and forgery) reach worker 0 long before the sum can exist
        got: list[float] = []
        rb = b.submit(0, Op.PUSH, key, 1, xb.numpy(), DType.FLOAT32)
        a.collect([ra], lambda r, h, p: got.extend(_floats(p)))
        b.collect([rb])
        assert got == (xa + xb).tolist()  # the server's sum, not worker 0's own gradient
        assert relay.reflected == 1
        assert a.drop_reasons["bad_mac"] == 1  # the request, signed worker->server, is no reply
        assert a.drop_reasons["wrong_reply"] == (1 if forge else 0)
        a.close()
        b.close()
    finally:
        relay.close()


# -- 3. an unauthenticated endless multipart message ----------------------------------------------
def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _zmtp_greeting(mechanism: bytes) -> bytes:
    """ZMTP 3.0 greeting (RFC 23): signature, version 3.0, mechanism, as-server 0, filler."""
    return b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\0") + b"\x00" + bytes(31)


def _zmtp_command(body: bytes) -> bytes:
    return b"\x04" + bytes([len(body)]) + body


def _endless_multipart(address: str, mechanism: bytes, budget: int, seconds: float) -> int:
    """Speak ZMTP over raw TCP: a handshake with no valid credential, then 1 MiB frames with MORE set
    and never a last frame, reconnecting whenever the server hangs up. Returns the bytes accepted by
    the kernel (the socket keeps nothing of its own beyond its buffers)."""
    if mechanism == b"NULL":
        name, value = b"Socket-Type", b"DEALER"
        first = _zmtp_command(b"\x05READY" + bytes([len(name)]) + name + struct.pack(">I", len(value)) + value)
    else:  # PLAIN with a credential that is not derived from the token
        first = _zmtp_command(b"\x05HELLO\x0btrainlib-ps" + bytes([40]) + b"x" * 40)
    frame = b"\x03" + struct.pack(">Q", 1 << 20) + bytes(1 << 20)  # MORE | LONG, 8-byte size
    host, port = address.rsplit(":", 1)
    sent, deadline = 0, time.monotonic() + seconds
    while sent < budget and time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=1) as s:
                s.sendall(_zmtp_greeting(mechanism) + first)
                while sent < budget and time.monotonic() < deadline:
                    s.sendall(frame)
                    sent += len(frame)
        except OSError:  # refused at the handshake: the server closed the connection
            time.sleep(0.01)
    return sent


def test_unauthenticated_endless_multipart_stops_at_the_handshake(server):
    """Reference: a server with no connection check (--insecure) holds what the peer streams; the
    default server refuses the peer at the handshake and its RSS stays within a small bound."""
    budget = 64 << 20
    servers = {"insecure": spawn_server(insecure=True), "plain": server}
    try:
        growth = {}
        for name, srv in servers.items():
            good = PSClient([srv.address], None if name == "insecure" else TOKEN, 0, 1, timeout_s=10)
            good.hello()
            _send(good, Op.PUSH, 1, 1, torch.ones(4).numpy())  # warm: allocations of a served request
            before = good.stats(0)["connections"]
            base = _rss(srv.proc.pid)
            mechanisms = [b"NULL"] if name == "insecure" else [b"NULL", b"PLAIN"]
            for mech in mechanisms:
                _endless_multipart(srv.address, mech, budget, seconds=2.0)
            growth[name] = _rss(srv.proc.pid) - base
            h, p = _send(good, Op.PUSH, 1, 2, torch.full((4,), 2.0).numpy())  # still serving, correctly
            assert _floats(p) == [2.0] * 4
            if name == "plain":
                conn = good.stats(0)["connections"]
                assert conn["refused"] > before["refused"] and conn["handshakes_failed"] >= before["handshakes_failed"] + 2, conn
            good.close()
        assert growth["insecure"] > budget // 2, growth  # the attack is real, and RSS shows it
        assert growth["plain"] < 16 << 20, growth        # ... and stops at the handshake
    finally:
        servers["insecure"].stop()


# -- 4. smaller faults ------------------------------------------------------------------------------
def test_stats_works_with_a_pending_bf16_push(server):
    a = PSClient([server.address], TOKEN, worker=0, nworkers=2, timeout_s=10)
    b = PSClient([server.address], TOKEN, worker=1, nworkers=2, timeout_s=10)
    a.hello()
    b.hello()
    xa = torch.tensor([1.5, -2.25, 3.0, 1e-3], dtype=torch.bfloat16)
    xb = torch.tensor([0.5, 4.0, -1.0, 7.0], dtype=torch.bfloat16)
    empty = a.stats(0)
    ra = a.submit(0, Op.PUSH, 9, 1, xa.view(torch.uint8).numpy(), DType.BFLOAT16)
    pending = [a.stats(0) for _ in range(2)]  # worker 0 pushed, worker 1 not yet: a bf16 sum pending
    assert pending[0]["pending"] == empty["pending"] + 1 and pending[0]["digest"] == pending[1]["digest"] != empty["digest"]
    assert pending[0]["dropped"].get("internal_error", 0) == 0
    rb = b.submit(0, Op.PUSH, 9, 1, xb.view(torch.uint8).numpy(), DType.BFLOAT16)
    sums = []
    for c, r in ((a, ra), (b, rb)):
        c.collect([r], lambda q, h, p: sums.append(torch.frombuffer(bytearray(p), dtype=torch.bfloat16)))
    want = (xa.float() + xb.float()).bfloat16()  # the server sums bf16 in fp32
    assert all(torch.equal(s, want) for s in sums)
    a.close()
    b.close()


def test_replay_table_stays_bounded_across_1000_client_restarts():
    cap, restarts = 64, 1000
    server = spawn_server(token=TOKEN, extra=("--max-clients", str(cap)))
    try:
        worker = PSClient([server.address], TOKEN, worker=0, nworkers=1, group=1, timeout_s=10)
        worker_sends = _tap(worker)
        worker.hello()
        key = (1 << KEY_BITS) | 3
        early: list[list[bytes]] = []
        sizes = []
        for i in range(restarts):
            c = PSClient([server.address], TOKEN, worker=0, nworkers=1, timeout_s=10)
            seen = _tap(c) if i == 0 else None
            c.hello()
            _send(c, Op.PUSH, 5, i + 1, torch.full((2,), float(i)).numpy())
            if seen is not None:
                early = [f for f in seen if decode(f).header.op == Op.PUSH]
            if i % 100 == 99:
                sizes.append(len(json.dumps(c.stats(0))))
                _, p = _send(worker, Op.PUSH, key, i + 1, torch.full((2,), float(i)).numpy())  # the long-lived one
                assert _floats(p) == [float(i)] * 2
            c.close()
        stats = worker.stats(0)
        replay = stats["replay"]
        # the long-lived worker, idle while 100 others came and went, was forgotten each time: told
        # EXPIRED, it said HELLO again and resent at once (no retry timeout: the pushes above passed)
        rehellos = sum(decode(f).header.op == Op.HELLO for f in worker_sends) - 1
        assert rehellos == restarts // 100, rehellos
        assert replay["entries"] <= cap and replay["issued"] == restarts + 1 + rehellos, replay
        assert replay["evicted"] >= restarts - cap, replay
        assert max(sizes) - min(sizes) < 64, sizes  # STATS reports sizes, not the table
        # the first client's entry is long forgotten: its captured push is still not fresh. The only
        # answer is the empty EXPIRED notice (what tells a live worker to say HELLO again)
        attacker = _raw_dealer(server.address)
        attacker.send_multipart(early[0])
        assert attacker.poll(2000)
        notice = decode(attacker.recv_multipart())
        assert notice.header.op == Op.EXPIRED and notice.header.nbytes == 0
        attacker.close(0)
        after = worker.stats(0)
        assert after["digest"] == stats["digest"]
        assert after["dropped"]["expired_instance"] == stats["dropped"].get("expired_instance", 0) + 1
        _, p = _send(worker, Op.PUSH, key, restarts + 1, torch.ones(2).numpy())
        assert _floats(p) == [1.0, 1.0]
        worker.close()
    finally:
        server.stop()
