"""The metric sinks `--observe.*` asks for, as trainer callbacks (rank 0 only).

    --observe.tensorboard DIR      TensorBoard event files        (tensorboard_sink.py)
    --observe.mlflow URI           an MLflow run                   (mlflow_sink.py)
    --observe.prometheus HOST:PORT a /metrics endpoint             (prometheus_sink.py)

The JSONL file (train.metrics) is written by the trainer itself. Each sink is imported only when
asked for, so a run without them needs none of the observe extra's packages.
"""
from __future__ import annotations

from ..callbacks import Callback
from ..config import Config, ConfigError


def sinks_from_config(cfg: Config) -> list[Callback]:
    """One callback per sink set in cfg.observe; a setting this install cannot serve raises
    ConfigError (naming the value and the fix) before the first step."""
    o = cfg.observe
    sinks: list[Callback] = []
    if o.prometheus:
        from .prometheus_sink import PrometheusSink

        try:
            sinks.append(PrometheusSink(o.prometheus, cfg.train.batch_size * cfg.model.seq_len))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        except OSError as e:  # the port is taken, or the host is not ours
            raise ConfigError(f"observe.prometheus={o.prometheus!r}: cannot listen there ({e}); pick another "
                              "port, or 0 for a free one (the log names it)") from None
    if o.tensorboard:
        from .tensorboard_sink import TensorBoardSink

        sinks.append(TensorBoardSink(o.tensorboard))
    if o.mlflow:
        from .mlflow_sink import MLflowSink

        sinks.append(MLflowSink(o.mlflow, o.mlflow_experiment))
    return sinks
