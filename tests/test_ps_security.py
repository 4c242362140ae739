"""A real `trainlib ps-server` process under bad input: each bad message is dropped and counted, the
server's state digest does not change, and a good client is still served correctly afterwards."""
from __future__ import annotations

import itertools
import os
import random
import socket
import time

import pytest
import torch
import zmq

from trainlib.sync.ps.client import PSClient
from trainlib.sync.ps.connauth import secure_client
from trainlib.sync.ps.launch import spawn_server
from trainlib.sync.ps.protocol import DType, Header, Op, Signer, decode
from trainlib.sync.ps.server import ParameterServerProcess, main as server_main
from trainlib.sync.ps.token import TOKEN_ENV, TOKEN_FILE_ENV, TokenError, read_token

TOKEN = "security-test-token-0123456789"
KEY = 5
STEPS = itertools.count(1)  # sync steps of the good client, increasing across cases


@pytest.fixture(scope="module")
def server():
    s = spawn_server(token=TOKEN, extra=("--max-mb", "1"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def good(server):
    c = PSClient([server.address], TOKEN, worker=0, nworkers=1, group=1, timeout_s=10)
    c.hello()
    yield c
    c.close()


def round_trip(client: PSClient, step: int) -> list[float]:
    x = torch.arange(4, dtype=torch.float32) * step
    out: list[float] = []
    req = client.submit(0, Op.PUSH, KEY | (1 << 20), step, x.numpy(), DType.FLOAT32)
    client.collect([req], lambda r, h, p: out.extend(torch.frombuffer(bytearray(p), dtype=torch.float32).tolist()))
    assert out == x.tolist()  # one worker: the sum is its own push
    return out


class Attacker:
    """A raw DEALER that speaks the wire format and signs with whatever token (or none) it is given.

    It passes the connection check (the credential comes from the real token: what a peer inside
    the job's network with a leaked connection credential, but not the message keys, could do),
    so these cases exercise the message layer; test_ps_hardening covers the connection layer."""

    def __init__(self, address: str, token: str | None):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        secure_client(self.sock, "plain", TOKEN)
        self.sock.connect(f"tcp://{address}")
        self.signer = Signer(token, "client")
        self.seq = 0
        self.instance = random.getrandbits(32) | 1

    def hello(self) -> None:
        """With the real token: learn a valid instance id, as a worker does."""
        assert self.send(self.frames(Op.HELLO, 0))
        self.instance = decode(self.sock.recv_multipart()).header.instance

    def frames(self, op: Op, session: int, payload: bytes = b"", step: int = 1, **kw) -> list:
        self.seq += 1
        h = Header(op=op, worker=0, nworkers=1, key=KEY, step=step, seq=self.seq, session=session,
                   instance=0 if op == Op.HELLO else self.instance, nbytes=len(payload),
                   dtype=DType.FLOAT32 if payload else DType.UINT8, **kw)
        return self.signer.encode(h, payload)

    def send(self, frames: list) -> bool:
        """Send; True if any reply comes back within 0.3 s."""
        self.sock.send_multipart(frames)
        return bool(self.sock.poll(300))

    def close(self):
        self.sock.close(0)


F8 = torch.ones(2).numpy().tobytes()


def _bad_cases(session: int, address: str):
    def token(tok):
        return lambda: [Attacker(address, tok).frames(Op.PUSH, session, F8)]

    def raw(fn):
        return lambda: [fn(Attacker(address, TOKEN))]

    return {
        "no_token": (token(None), "bad_mac"),
        "wrong_token": (token("not-the-right-token-000000"), "bad_mac"),
        "bad_session": (raw(lambda a: a.frames(Op.PUSH, session + 1, F8)), "bad_session"),
        "truncated_header": (raw(lambda a: [f[:20] if i == 0 else f for i, f in enumerate(a.frames(Op.PUSH, session, F8))]),
                             "bad_header_size"),
        "truncated_payload": (raw(lambda a: [f[:4] if i == 1 else f for i, f in enumerate(a.frames(Op.PUSH, session, F8))]),
                              "bad_length"),
        "length_far_beyond_frame": (raw(lambda a: [Header(op=Op.PUSH, nbytes=1 << 40, session=session).pack(), F8,
                                                   bytes(32)]), "too_large"),
        "bad_op": (raw(lambda a: [Header(op=Op.PUSH, session=session).pack()[:5] + b"\xee" +
                                  Header(op=Op.PUSH).pack()[6:], b"", bytes(32)]), "bad_op"),
    }


@pytest.mark.parametrize("case", ["no_token", "wrong_token", "bad_session", "truncated_header", "truncated_payload",
                                  "length_far_beyond_frame", "bad_op", "replay", "random_frames", "raw_tcp_garbage",
                                  "oversized_frame"])
def test_bad_input_is_dropped_without_state_change(server, good, case):
    round_trip(good, next(STEPS))
    session = good.links[0].session
    attacker = Attacker(server.address, TOKEN)
    expected: dict[str, int] = {}
    if case == "replay":  # a captured, valid message sent again
        attacker.hello()
        captured = attacker.frames(Op.PUSH, session, F8, step=7)
        assert attacker.send(captured)  # the original is answered (and applied)
        attacker.sock.recv_multipart()
    before = good.stats(0)
    if case == "replay":
        assert not attacker.send(captured)
        expected = {"replay": 1}
    elif case == "random_frames":
        rng = random.Random(0)
        for _ in range(50):
            attacker.sock.send_multipart([os.urandom(rng.choice([0, 3, 48, 52, 200])) for _ in range(rng.randint(1, 5))])
        assert not attacker.sock.poll(500)
        expected = {"*": 50}
    elif case == "raw_tcp_garbage":  # not ZMTP: libzmq drops the connection (or, read as ZMTP 1.0
        # frames, delivers garbage messages that the decoder drops and counts)
        expected = {"?": 0}
        host, port = server.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(os.urandom(65536))
            time.sleep(0.2)
    elif case == "oversized_frame":  # above --max-mb 1: libzmq cuts the peer off while reading
        attacker.sock.send_multipart([Header(op=Op.PUSH).pack(), bytes(2 << 20), bytes(32)])
        assert not attacker.sock.poll(300)
    else:
        make, reason = _bad_cases(session, server.address)[case]
        for frames in make():
            assert not Attacker(server.address, TOKEN).send(frames)  # no reply to bad input
        expected = {reason: 1}
    attacker.close()
    after = good.stats(0)
    assert after["digest"] == before["digest"], case
    # no bad message advanced a replay counter: the only fresh message in between is the second STATS
    assert after["replay"]["accepted"] - before["replay"]["accepted"] == 1, (case, after["replay"])
    if "?" in expected:
        pass
    elif "*" in expected:
        assert after["dropped_total"] - before["dropped_total"] == expected["*"]
    else:
        for reason, n in expected.items():
            assert after["dropped"].get(reason, 0) - before["dropped"].get(reason, 0) == n, (case, after["dropped"])
        assert after["dropped_total"] - before["dropped_total"] == sum(expected.values())
    round_trip(good, next(STEPS))  # still serving, correctly


def test_refuses_to_start_without_token_or_off_loopback(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    with pytest.raises(TokenError, match="without a token"):
        ParameterServerProcess("127.0.0.1:0")
    with pytest.raises(TokenError, match="only allowed on loopback"):
        ParameterServerProcess("0.0.0.0:0", insecure=True)
    assert server_main(["--bind", "127.0.0.1:0"]) == 1
    assert "refusing to start without a token" in capsys.readouterr().err
    srv = ParameterServerProcess("127.0.0.1:0", insecure=True)  # allowed: loopback, explicitly insecure
    assert srv.address.startswith("127.0.0.1:") and srv.conn_auth == "none"
    srv.close()
    secret = tmp_path / "token"
    secret.write_text("from-a-kubernetes-secret-0123\n")
    assert read_token(str(secret)) == "from-a-kubernetes-secret-0123"
    monkeypatch.setenv(TOKEN_FILE_ENV, str(secret))
    assert read_token() == "from-a-kubernetes-secret-0123"
    secret.write_text("short")
    with pytest.raises(TokenError, match="at least 16"):
        read_token()
    with pytest.raises(TokenError, match="cannot read the token file"):
        read_token(str(tmp_path / "missing"))


def test_unexpected_errors_anywhere_in_handling_are_contained():
    """Decode, MAC check, state and reply sending all run under the loop's error handler: a bug in
    any of them is counted, and the next message is served."""
    srv = ParameterServerProcess("127.0.0.1:0", token=TOKEN)
    signer = Signer(TOKEN, "client")
    try:
        hello = [zmq.Frame(b"peer"), *map(zmq.Frame, signer.encode(Header(op=Op.HELLO, seq=1)))]
        sent: list = []
        srv.sock.send_multipart = lambda frames, **kw: sent.append(frames)
        for broken in ("verify", "encode_many"):
            original = getattr(srv.signer, broken)
            setattr(srv.signer, broken, lambda *a, **kw: 1 / 0)
            srv.handle_frames(hello)  # must not raise
            setattr(srv.signer, broken, original)
        assert srv.dropped["internal_error"] == 2 and sent == []
        srv.handle_frames(hello)  # served again once the fault is gone
        assert len(sent) == 1 and decode(sent[0][1:]).header.op == Op.HELLO_OK
    finally:
        srv.close()
