"""The trainer's Prometheus endpoint (`--observe.prometheus HOST:PORT`, PORT alone = 127.0.0.1).

    trainlib train --observe.prometheus 9100 ; curl -s 127.0.0.1:9100/metrics | grep trainlib_

Gauges hold the last log window's values (`trainlib_loss`, `trainlib_tokens_per_s`,
`trainlib_t_step_s`, ..., every numeric key of the record; per-rank lists as
`trainlib_per_rank_<key>{rank="R"}`); counters count what the run has done
(`trainlib_steps_total`, `trainlib_tokens_total`, `trainlib_checkpoints_total`). The endpoint lives
from the first step to the end of train() on rank 0. In a pod, bind 0.0.0.0:PORT so the cluster's
Prometheus can reach it (the k8s generator's scrape annotations name the port).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..callbacks import Callback
from .prometheus import MetricsServer, gauge_families, parse_address
from .records import flatten_numeric

PREFIX = "trainlib_"


class _TrainerCollector:
    """Reads the sink's last window at scrape time; the sink swaps whole objects, so a scrape sees
    one window or the next, never half of each."""

    def __init__(self, sink: PrometheusSink) -> None:
        self.sink = sink

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        step, values = self.sink.last
        steps, tokens, checkpoints = self.sink.totals
        yield CounterMetricFamily(PREFIX + "steps", "training steps done by this run", value=steps)
        yield CounterMetricFamily(PREFIX + "tokens", "tokens trained on by this run (train.batch_size x "
                                  "model.seq_len per step, as tokens_per_s counts them)", value=tokens)
        yield CounterMetricFamily(PREFIX + "checkpoints", "checkpoints written", value=checkpoints)
        if values:
            yield from gauge_families(PREFIX, {"step": step, **values}, "last log window")


class PrometheusSink(Callback):
    def __init__(self, address: str, tokens_per_step: int) -> None:
        host, port = parse_address(address, "--observe.prometheus")
        self.tokens_per_step = tokens_per_step
        self.last: tuple[float, dict[str, float]] = (0.0, {})
        self.totals: tuple[int, int, int] = (0, 0, 0)
        self._prev_step = 0
        self.server = MetricsServer(_TrainerCollector(self), host, port)
        self.address = self.server.address

    def on_train_start(self, config: Any, info: dict[str, Any]) -> None:
        # a resumed run counts from its restored step: counters are this process's work only
        self._prev_step = int(info.get("start_step", 0))

    def on_log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        done = max(step - self._prev_step, 0)
        self._prev_step = step
        steps, tokens, ckpts = self.totals
        self.totals = (steps + done, tokens + done * self.tokens_per_step, ckpts)
        self.last = (float(step), flatten_numeric(record))

    def on_checkpoint(self, step: int, directory: str) -> None:
        steps, tokens, ckpts = self.totals
        self.totals = (steps, tokens, ckpts + 1)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self.server.close()

    def on_train_error(self, error: BaseException) -> None:
        self.server.close()   # free the port: a restarted rank 0 in this pod binds it again
