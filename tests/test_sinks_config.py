"""The sinks without a training run: settings this install cannot serve stop with the fix, records
flatten to the series every sink logs, and a key that appears or disappears between windows flows
through (Prometheus shows the last window only). Records are fed to the callbacks directly."""
from __future__ import annotations

import socket
import urllib.request

import pytest

from trainlib.config import ConfigError, load_config
from trainlib.observe.records import flatten_config, flatten_numeric
from trainlib.observe.sinks import sinks_from_config


def test_flatten_numeric_and_config():
    record = {"step": 10, "loss": 2.5, "straggler_rank": 1, "note": "x", "ok": True, "mem": None,
              "per_rank": {"t_step_s": [0.1, 0.2], "mem_peak_bytes": [5, 6]}}
    assert flatten_numeric(record) == {"loss": 2.5, "straggler_rank": 1.0, "per_rank/t_step_s/0": 0.1,
                                       "per_rank/t_step_s/1": 0.2, "per_rank/mem_peak_bytes/0": 5.0,
                                       "per_rank/mem_peak_bytes/1": 6.0}
    assert flatten_config({"train": {"lr": 0.001, "steps": 3}, "mesh": {"dp": -1}}) == \
        {"train.lr": "0.001", "train.steps": "3", "mesh.dp": "-1"}


def test_mlflow_file_store_needs_the_opt_in(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in (tmp_path.as_uri(), str(tmp_path)):
        with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=true"):
            sinks_from_config(load_config(None, [f"--observe.mlflow={uri}"]))


def test_mlflow_database_store_needs_full_mlflow(tmp_path):
    try:
        import sqlalchemy  # noqa: F401
        pytest.skip("SQLAlchemy is installed here: database stores are served")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"needs the full `mlflow` package"):
        sinks_from_config(load_config(None, [f"--observe.mlflow=sqlite:///{tmp_path}/m.db"]))


def test_prometheus_address_errors_name_the_value():
    with pytest.raises(ConfigError, match=r"--observe.prometheus='host:port' is not HOST:PORT or PORT"):
        sinks_from_config(load_config(None, ["--observe.prometheus=host:port"]))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"observe.prometheus='{port}': cannot listen there"):
            sinks_from_config(load_config(None, [f"--observe.prometheus={port}"]))


def test_prometheus_gauges_follow_the_keys_of_each_window():
    from prometheus_client.parser import text_string_to_metric_families

    cfg = load_config(None, ["--observe.prometheus=127.0.0.1:0"])
    (sink,) = sinks_from_config(cfg)
    assert sink.address.startswith("127.0.0.1:")  # loopback, as PORT alone promises

    def scrape() -> dict:
        with urllib.request.urlopen(f"http://{sink.address}/metrics", timeout=10) as r:
            return {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}

    sink.on_train_start(cfg, {"start_step": 100})  # a resumed run: its counters start at its own work
    sink.on_log({"step": 110, "loss": 3.0, "a_new_key_s": 0.25})
    got = scrape()
    assert got["trainlib_a_new_key_s"] == 0.25 and got["trainlib_loss"] == 3.0 and got["trainlib_step"] == 110
    assert got["trainlib_steps_total"] == 10
    assert got["trainlib_tokens_total"] == 10 * cfg.train.batch_size * cfg.model.seq_len
    sink.on_log({"step": 120, "loss": 2.0})
    got = scrape()
    assert "trainlib_a_new_key_s" not in got and got["trainlib_loss"] == 2.0 and got["trainlib_steps_total"] == 20
    sink.on_train_end({})
