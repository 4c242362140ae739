"""A Prometheus /metrics endpoint with a registry of its own (never prometheus_client's global one).

Both users (the trainer's sink and `trainlib ps-server --metrics`) keep plain Python counters in
their hot path and hand the endpoint a Collector that turns them into metric families only when
Prometheus scrapes: the training step or the server loop takes no lock and builds no object per
event for the sake of metrics.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("trainlib")

LOOPBACK = "127.0.0.1"


def parse_address(value: str, flag: str) -> tuple[str, int]:
    """"HOST:PORT" or "PORT" (-> 127.0.0.1) -> (host, port); ValueError naming `flag` and the fix."""
    host, sep, port = value.strip().rpartition(":")
    if not sep:
        host, port = LOOPBACK, value.strip()
    host = host.strip("[]")  # [::1]:9100
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag}={value!r} is not HOST:PORT or PORT with a port in 0..65535 "
                         f"(e.g. {flag}=9100 for 127.0.0.1:9100, or 0.0.0.0:9100 for a pod's Prometheus scrape)")
    return host, int(port)


class MetricsServer:
    """/metrics for `collector` on host:port (port 0 picks a free one: see `.address`), in a daemon thread."""

    def __init__(self, collector: Any, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.address = f"{host}:{self._httpd.server_address[1]}"
        log.info("Prometheus metrics on http://%s/metrics", self.address)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def gauge_families(prefix: str, values: dict[str, float], help_: str) -> Iterable[Any]:
    """One gauge per flat key; `per_rank/<key>/<rank>` keys become one gauge `<prefix>per_rank_<key>`
    labelled by rank (Prometheus wants a label, not a metric per rank)."""
    from prometheus_client.core import GaugeMetricFamily

    per_rank: dict[str, list[tuple[str, float]]] = {}
    for key, value in values.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "per_rank" and parts[2].isdigit():
            per_rank.setdefault(parts[1], []).append((parts[2], value))
            continue
        yield GaugeMetricFamily(prefix + metric_name(key), f"{help_}: {key}", value=value)
    for key, series in per_rank.items():
        g = GaugeMetricFamily(f"{prefix}per_rank_{metric_name(key)}", f"{help_}: {key} on each rank", labels=["rank"])
        for rank, value in series:
            g.add_metric([rank], value)
        yield g


def metric_name(key: str) -> str:
    """A record key as a valid Prometheus metric name part ([a-zA-Z0-9_])."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in key)
