"""Issue 20 item 2: `trainlib ps-server --metrics` scraped over loopback and parsed with
prometheus_client's own parser. A real server, real clients (2 sync workers push one partition; a
STATS) and three bad messages from a raw connection (one frame; a replayed PUSH; a PUSH with a
flipped MAC byte). The reference: the requests we sent, the bytes we put on and took off the
wire (every client frame tapped), and the server's own STATS drop counts."""
from __future__ import annotations

import time
import urllib.request
from collections import Counter

import pytest
import torch
import zmq

from trainlib.sync.ps.client import PSClient
from trainlib.sync.ps.connauth import secure_client
from trainlib.sync.ps.launch import spawn_server
from trainlib.sync.ps.protocol import DType, Op, decode
from trainlib.testing import free_port

pytestmark = pytest.mark.timeout(120)

TOKEN = "metrics-test-token-0123456789"


class Wire:
    """Counts the bytes a client puts on and takes off its sockets (what the server must count)."""

    def __init__(self) -> None:
        self.sent = self.received = 0
        self.captured: list[list[bytes]] = []

    def tap(self, client: PSClient) -> None:
        for link in client.links:
            sock, send, recv = link.sock, link.sock.send_multipart, link.sock.recv_multipart

            def sending(frames, *a, _send=send, **kw):
                raw = [bytes(memoryview(f).cast("B")) if len(f) else b"" for f in frames]
                self.sent += sum(map(len, raw))
                self.captured.append(raw)
                return _send(frames, *a, **kw)

            def receiving(*a, _recv=recv, **kw):
                frames = _recv(*a, **kw)
                self.received += sum(len(f) for f in frames)
                return frames

            sock.send_multipart, sock.recv_multipart = sending, receiving


def scrape(address: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples}


def test_ps_server_metrics_match_what_was_sent():
    metrics = f"127.0.0.1:{free_port()}"
    server = spawn_server(token=TOKEN, extra=("--metrics", metrics))
    raw = None
    try:
        wire = Wire()
        workers = [PSClient([server.address], TOKEN, worker=w, nworkers=2, timeout_s=10) for w in range(2)]
        for w in workers:
            wire.tap(w)
            w.hello()
        x = torch.arange(1000, dtype=torch.float32)
        reqs = [w.submit(0, Op.PUSH, 5, 1, (x * (i + 1)).numpy(), DType.FLOAT32) for i, w in enumerate(workers)]
        sums = []
        for w, r in zip(workers, reqs):
            w.collect([r], lambda req, h, p: sums.append(torch.frombuffer(bytearray(p), dtype=torch.float32)))
        assert all(torch.equal(s, 3 * x) for s in sums)
        push = next(f for f in wire.captured if len(f[1]) == x.numel() * 4)
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        secure_client(raw, "plain", TOKEN)  # passes the connection check: the drops are per message
        raw.connect(f"tcp://{server.address}")
        flipped = [push[0], push[1], push[2][:-1] + bytes([push[2][-1] ^ 1])]
        bad = [[b"just one frame"], push, flipped]
        for frames in bad:
            raw.send_multipart(frames)
        stats = workers[0].stats(0)
        deadline = time.monotonic() + 10
        while stats["dropped_total"] < 3 and time.monotonic() < deadline:  # the drops race the STATS
            time.sleep(0.05)
            stats = workers[0].stats(0)
        assert stats["dropped"] == {"bad_frames": 1, "replay": 1, "bad_mac": 1}
        expected_in = wire.sent + sum(len(f) for frames in bad for f in frames)
        while True:  # the server counts a reply's bytes just after sending it: give it a moment
            got = scrape(metrics)
            if got[("trainlib_ps_sent_bytes_total", ())] == wire.received or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        requests = dict(Counter(Op(decode(f).header.op).name for f in wire.captured))  # what the clients sent
        assert requests["HELLO"] == 2 and requests["PUSH"] == 2 and requests["STATS"] >= 1
        for op, n in requests.items():
            assert got[("trainlib_ps_requests_total", (("op", op),))] == n, op
            assert got[("trainlib_ps_request_seconds_count", (("op", op),))] == n, op
            assert got[("trainlib_ps_request_seconds_bucket", (("le", "+Inf"), ("op", op)))] == n, op
            assert 0 < got[("trainlib_ps_request_seconds_sum", (("op", op),))] < 10 * n, op
            le = sorted((float(dict(k[1])["le"]), v) for k, v in got.items()
                        if k[0] == "trainlib_ps_request_seconds_bucket" and dict(k[1])["op"] == op)
            assert [v for _, v in le] == sorted(v for _, v in le)  # cumulative buckets
        assert {k[1][0][1]: v for k, v in got.items() if k[0] == "trainlib_ps_requests_total"} == requests
        assert {k[1][0][1]: v for k, v in got.items() if k[0] == "trainlib_ps_dropped_total"} == stats["dropped"]
        assert got[("trainlib_ps_received_bytes_total", ())] == expected_in
        assert got[("trainlib_ps_sent_bytes_total", ())] == wire.received
        assert got[("trainlib_ps_pending", ())] == 0 and got[("trainlib_ps_handshakes_failed_total", ())] == 0
        for w in workers:
            w.close()
    finally:
        if raw is not None:
            raw.close(0)
        assert server.stop() == 0


def test_ps_server_metrics_flag_errors_name_the_value(capsys):
    """A bad --metrics value stops the server with exit 1 and a message naming it (no half-started server)."""
    from trainlib.sync.ps import server

    assert server.main(["--insecure", "--metrics", "host:port"]) == 1
    err = capsys.readouterr().err
    assert "--metrics='host:port'" in err and "HOST:PORT" in err, err
