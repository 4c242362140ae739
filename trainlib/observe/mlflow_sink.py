"""MLflow: one run per training job (`--observe.mlflow URI`, `--observe.mlflow_experiment NAME`).

    trainlib train --observe.mlflow http://mlflow.mlops:5000          # a tracking server (any MLflow)
    trainlib train --observe.mlflow sqlite:///runs/mlflow.db          # needs the full `mlflow` package
    MLFLOW_ALLOW_FILE_STORE=true trainlib train --observe.mlflow file:///abs/path/mlruns

params = the whole config flattened (`train.lr`, `mesh.dp`, ...); metrics = every numeric key of
every log window, at its step; the final summary = metrics `summary/<key>` plus the artifact
`summary.json`; each checkpoint = the tags `trainlib.checkpoint_dir` / `trainlib.checkpoint_step`
plus the artifact `checkpoint.json`. The run ends FINISHED.

Stores: mlflow-skinny (what trainlib's extra installs) talks to tracking servers and the file store
only; database URIs (sqlite, postgresql, mysql) need the full `mlflow` package (SQLAlchemy). MLflow 3
refuses the file store unless MLFLOW_ALLOW_FILE_STORE=true: we say so before training starts rather
than let MLflow fail at the first log call.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any
from urllib.parse import urlparse

from ..callbacks import Callback
from ..config import ConfigError
from .records import flatten_config, flatten_numeric

log = logging.getLogger("trainlib")

DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100


def check_tracking_uri(uri: str) -> None:
    """Raise ConfigError naming the fix when this MLflow install cannot use `uri`."""
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise ConfigError(f"observe.mlflow={uri!r} is MLflow's file store, which MLflow 3 refuses unless "
                          "MLFLOW_ALLOW_FILE_STORE=true is set in the environment; set it, or point "
                          "observe.mlflow at a tracking server (http://HOST:5000)")
    if scheme in DB_SCHEMES:
        try:
            import sqlalchemy  # noqa: F401  (MLflow's database stores are built on it)
        except ImportError:
            raise ConfigError(f"observe.mlflow={uri!r} is a database store, which needs the full `mlflow` "
                              "package (pip install mlflow; mlflow-skinny has no SQLAlchemy); or use a "
                              "tracking server (http://HOST:5000) or MLFLOW_ALLOW_FILE_STORE=true with "
                              "file:///abs/path/mlruns") from None


def _now_ms() -> int:
    return int(time.time() * 1000)


class MLflowSink(Callback):
    def __init__(self, tracking_uri: str, experiment: str = "trainlib") -> None:
        check_tracking_uri(tracking_uri)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment = experiment
        self.run_id: str | None = None
        self.last_step = 0

    def _batch(self, metrics: dict[str, float] | None = None, step: int = 0, params: dict[str, str] | None = None,
               tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = _now_ms()
        ms = [Metric(k, v, now, step) for k, v in (metrics or {}).items()]
        ps = [Param(k, v) for k, v in (params or {}).items()]
        ts = [RunTag(k, v) for k, v in (tags or {}).items()]
        for i in range(0, len(ps), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=ps[i:i + MAX_PARAMS_PER_BATCH])
        for i in range(0, len(ms), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=ms[i:i + MAX_METRICS_PER_BATCH])
        if ts:
            self.client.log_batch(self.run_id, tags=ts)

    def on_train_start(self, config: Any, info: dict[str, Any]) -> None:
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.experiment)
        self.run_id = self.client.create_run(exp_id).info.run_id
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        self._batch(params=flatten_config(cfg),
                    tags={f"trainlib.{k}": str(v) for k, v in info.items()})
        log.info("MLflow run %s in experiment %r", self.run_id, self.experiment)

    def on_log(self, record: dict[str, Any]) -> None:
        self.last_step = int(record["step"])
        self._batch(metrics=flatten_numeric(record), step=self.last_step)

    def on_checkpoint(self, step: int, directory: str) -> None:
        self._batch(tags={"trainlib.checkpoint_dir": directory, "trainlib.checkpoint_step": str(step)})
        self.client.log_dict(self.run_id, {"step": step, "directory": directory}, "checkpoint.json")

    def on_train_end(self, summary: dict[str, Any]) -> None:
        step = int(summary.get("steps", self.last_step))
        self._batch(metrics={f"summary/{k}": v for k, v in flatten_numeric(summary).items()}, step=step)
        self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_terminated(self.run_id, "FINISHED")

    def on_train_error(self, error: BaseException) -> None:
        if self.run_id is not None:   # a run left RUNNING would look alive in the MLflow UI forever
            self.client.set_tag(self.run_id, "trainlib.error", f"{type(error).__name__}: {error}"[:5000])
            self.client.set_terminated(self.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
