"""A parameter server's Prometheus metrics (`trainlib ps-server --metrics HOST:PORT`).

    trainlib_ps_requests_total{op}          requests that passed every check and reached the server, by op
    trainlib_ps_dropped_total{reason}       messages dropped unanswered, by reason (bad_mac, stale_seq, ...)
    trainlib_ps_received_bytes_total        bytes of every message received (header + payload + MAC frames)
    trainlib_ps_sent_bytes_total            bytes of every reply sent
    trainlib_ps_request_seconds{op}         histogram: the server's time on one message, from its decode to
                                            its replies sent (a PUSH that completes a sum includes the sum and
                                            the W replies; the wait for the other workers is not in it)
    trainlib_ps_handshakes_failed_total     connections refused at the ZeroMQ handshake
    trainlib_ps_pending, _waiting_reads     sums being gathered, reads held back by staleness (gauges)

The server loop counts into plain ints and lists (`PSMetrics.observe`: two clock reads, a bisect,
two increments — no lock, no object); the collector builds the metric families only at scrape time.
A scrape runs in another thread and may see one message's count without its latency: harmless.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

from ..sync.ps.protocol import HEADER_SIZE, MAC_SIZE, Op

PREFIX = "trainlib_ps_"
# seconds; a loopback request is tens of microseconds, a 4 MB partition's sum a few milliseconds
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
                   1.0, 2.5)


class PSMetrics:
    """What the server loop counts for Prometheus, beyond the drops it already counts."""

    def __init__(self) -> None:
        self.received_bytes = 0
        self.sent_bytes = 0
        # op -> [per-bucket counts (last = +Inf)], op -> total seconds
        self.latency: dict[int, list[int]] = {}
        self.latency_sum: dict[int, float] = {}

    def observe(self, op: int, seconds: float) -> None:
        counts = self.latency.get(op)
        if counts is None:
            counts = self.latency[op] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.latency_sum[op] = 0.0
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum[op] += seconds

    def received(self, frames: list) -> None:
        self.received_bytes += sum(len(f) for f in frames[1:])  # frames[0] is the ROUTER's peer identity

    def sent(self, header: Any) -> None:
        self.sent_bytes += HEADER_SIZE + header.nbytes + MAC_SIZE


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return str(op)


class PSCollector:
    """Metric families for one ParameterServerProcess, built when Prometheus scrapes."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        srv, m = self.server, self.server.metrics
        latency = {op: list(c) for op, c in list(m.latency.items())}  # copies: the loop keeps counting
        sums = dict(m.latency_sum)
        req = CounterMetricFamily(PREFIX + "requests", "requests that reached the server, by op", labels=["op"])
        hist = HistogramMetricFamily(PREFIX + "request_seconds", "server time per message, decode to replies sent",
                                     labels=["op"])
        for op in sorted(latency):
            counts, cumulative, buckets = latency[op], 0, []
            for le, n in zip((*map(repr, LATENCY_BUCKETS), "+Inf"), counts):
                cumulative += n
                buckets.append((le, cumulative))
            req.add_metric([_op_name(op)], cumulative)
            hist.add_metric([_op_name(op)], buckets, sum_value=sums.get(op, 0.0))
        yield req
        yield hist
        dropped = CounterMetricFamily(PREFIX + "dropped", "messages dropped unanswered, by reason", labels=["reason"])
        for reason, n in sorted(dict(srv.dropped).items()):
            dropped.add_metric([reason], n)
        yield dropped
        yield CounterMetricFamily(PREFIX + "received_bytes", "bytes received (all frames but the peer id)",
                                  value=m.received_bytes)
        yield CounterMetricFamily(PREFIX + "sent_bytes", "bytes of replies sent", value=m.sent_bytes)
        yield CounterMetricFamily(PREFIX + "handshakes_failed", "connections refused at the ZeroMQ handshake",
                                  value=srv.handshakes_failed)
        yield GaugeMetricFamily(PREFIX + "pending", "sums being gathered", value=len(srv.state.pending))
        yield GaugeMetricFamily(PREFIX + "waiting_reads", "reads held back by the staleness bound",
                                value=srv.state.n_waiting)
