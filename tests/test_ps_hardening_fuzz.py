"""A flood of hostile messages at a real `trainlib ps-server`: every one is dropped and counted, none
is answered, the state digest does not change, and the good client is served correctly after it.

The default suite sends 20,000; `pytest -m long tests/test_ps_hardening_fuzz.py` sends 1,000,000.
The attacker holds the connection credential (so its messages reach the message layer; without it
they stop at the handshake, see test_ps_hardening) but not the message keys, except where a case
needs a message a token holder made: ones captured from this server (replays, bit flips,
reflected replies) or from another run or another client (stale session, never-issued instance).
"""
from __future__ import annotations

import random
import time

import pytest
import torch
import zmq

from trainlib.sync.ps.client import PSClient
from trainlib.sync.ps.connauth import secure_client
from trainlib.sync.ps.launch import spawn_server
from trainlib.sync.ps.protocol import DType, Header, Op, Signer, decode

TOKEN = "fuzz-test-token-0123456789abcdef"
KEY = 11
MAX_MB = 1


def _capture(client: PSClient) -> tuple[list[list[bytes]], list[list[bytes]]]:
    """Requests the client sends and replies it receives, as bytes (an on-path recording)."""
    sent, received = [], []
    sock = client.links[0].sock
    send, recv = sock.send_multipart, sock.recv_multipart

    def send_rec(frames, *a, **kw):
        sent.append([bytes(memoryview(f)) if len(f) else b"" for f in frames])
        return send(frames, *a, **kw)

    def recv_rec(*a, **kw):
        frames = recv(*a, **kw)
        received.append([f.bytes if hasattr(f, "bytes") else bytes(f) for f in frames])
        return frames

    sock.send_multipart, sock.recv_multipart = send_rec, recv_rec
    return sent, received


def _round_trip(client: PSClient, step: int) -> None:
    x = torch.arange(4, dtype=torch.float32) * step
    out: list[float] = []
    req = client.submit(0, Op.PUSH, KEY, step, x.numpy(), DType.FLOAT32)
    client.collect([req], lambda r, h, p: out.extend(torch.frombuffer(bytearray(p), dtype=torch.float32).tolist()))
    assert out == x.tolist()  # one worker: the sum is its own push


def _hostile_pool(rng: random.Random, session: int, instance: int, issued: int, captured: list,
                  replies: list) -> list[list[bytes]]:
    f8 = torch.ones(2).numpy().tobytes()
    wrong, token_holder = Signer("not-the-right-token-000000000", "client"), Signer(TOKEN, "client")

    def header(**kw) -> Header:
        base = dict(op=Op.PUSH, worker=0, nworkers=1, key=KEY, step=rng.randrange(1, 1 << 20),
                    seq=rng.randrange(1, 1 << 40), session=session, instance=instance, nbytes=8, dtype=DType.FLOAT32)
        return Header(**{**base, **kw})

    makers = [
        lambda: [rng.randbytes(rng.choice([0, 3, 44, 68, 200])) for _ in range(rng.randint(1, 5))],
        lambda: wrong.encode(header(), f8),
        lambda: [header().pack(), f8, bytes(28)],                                     # no token: zero tag
        lambda: list(rng.choice(captured)),                                            # replay, verbatim
        lambda: token_holder.encode(header(session=session ^ rng.randrange(1, 1 << 63)), f8),  # stale session
        lambda: token_holder.encode(header(instance=issued + rng.randrange(1, 1 << 30)), f8),  # never issued
        lambda: [header(nbytes=1 << 40).pack(), f8, bytes(28)],                        # length far beyond
        lambda: wrong.encode(header(nbytes=6), f8[:6]),                                # misaligned float32
        lambda: [header(nbytes=16).pack(), f8, bytes(28)],                             # length != frame
        lambda: list(rng.choice(replies)),                                             # a reply, reflected
        lambda: [header().pack()[:30], f8, bytes(28)],                                 # truncated header
    ]
    return [rng.choice(makers)() for _ in range(3000)]


def _flip(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    i = rng.randrange(len(frames))
    if not frames[i]:
        return frames
    b = bytearray(frames[i])
    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return frames[:i] + [bytes(b)] + frames[i + 1:]


def _fuzz(n_messages: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    server = spawn_server(token=TOKEN, extra=("--max-mb", str(MAX_MB)))
    good = PSClient([server.address], TOKEN, worker=0, nworkers=1, timeout_s=30)
    sent, received = _capture(good)
    attackers = []
    try:
        good.hello()
        for step in range(1, 4):
            _round_trip(good, step)
        captured = [f for f in sent if decode(f).header.op == Op.PUSH]
        replies = received[:]
        before = good.stats(0)
        stats_calls = 0
        pool = _hostile_pool(rng, before["session"], good.links[0].instance, before["replay"]["issued"],
                             captured, replies)
        for _ in range(4):
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            secure_client(sock, "plain", TOKEN)
            sock.connect(f"tcp://{server.address}")
            attackers.append(sock)
        t0 = time.monotonic()
        for i in range(n_messages):
            frames = pool[rng.randrange(len(pool))]
            attackers[i % len(attackers)].send_multipart(_flip(rng, frames) if rng.random() < 0.5 else frames)
        deadline = time.monotonic() + 60 + n_messages / 2000
        while True:  # the flood travels on other connections than STATS: wait until all is counted
            after = good.stats(0)
            stats_calls += 1
            if after["dropped_total"] - before["dropped_total"] >= n_messages or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        assert after["dropped_total"] - before["dropped_total"] == n_messages, (after["dropped"], before["dropped"])
        assert after["digest"] == before["digest"]
        assert after["replay"]["accepted"] - before["replay"]["accepted"] == stats_calls  # only the STATS were fresh
        assert after["dropped"].get("internal_error", 0) == 0
        answered = sum(1 for s in attackers if s.poll(200))
        assert answered == 0  # no hostile message was answered
        _round_trip(good, 4)
        print(f"fuzz: {n_messages} hostile messages dropped in {elapsed:.1f}s; reasons "
              f"{ {k: v - before['dropped'].get(k, 0) for k, v in after['dropped'].items()} }")
    finally:
        for s in attackers:
            s.close(0)
        good.close()
        server.stop()


@pytest.mark.timeout(180)
def test_fuzz_server_short():
    _fuzz(20_000)


@pytest.mark.long
@pytest.mark.timeout(3600)
def test_fuzz_server_one_million():
    _fuzz(1_000_000, seed=1)
