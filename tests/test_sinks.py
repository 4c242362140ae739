"""Issue 20 item 2: a real 2-rank training run with every sink on (--observe.tensorboard, .mlflow,
.prometheus), each read back by its own project's reader and compared with the reference, the JSONL
metrics file the trainer writes (and the summary train() returns):

- TensorBoard: tensorboard's EventAccumulator;
- MLflow: mlflow.MlflowClient on a real local file store (MLFLOW_ALLOW_FILE_STORE=true: mlflow-skinny
  has no database store);
- Prometheus: scraped over loopback by a rank-0 callback at every log window (the sinks run before
  user callbacks), parsed with prometheus_client's own parser;
- and `trainlib report` on the run's directory (issue 20 item 3; one run serves both).

Rank 1 must build no sink: its Prometheus endpoint would collide with rank 0's port.
"""
from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from trainlib.callbacks import Callback
from trainlib.observe.records import flatten_config, flatten_numeric
from trainlib.testing import free_port, run_ranks

pytestmark = pytest.mark.timeout(240)


class Scraper(Callback):
    """Scrapes the trainer's endpoint right after the Prometheus sink saw the same record."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.scrapes: list[tuple[dict, str]] = []

    def on_log(self, record):
        with urllib.request.urlopen(f"http://{self.address}/metrics", timeout=10) as r:
            self.scrapes.append((record, r.read().decode()))


def train_scraped(argv: list[str], prom: str) -> tuple[dict, list]:
    from trainlib import trainer
    from trainlib.config import load_config

    scraper = Scraper(prom)
    summary = trainer.train(load_config(None, argv), callbacks=[scraper])
    return summary, scraper.scrapes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sinks")
    prom = f"127.0.0.1:{free_port()}"
    argv = ["--train.steps=4", "--train.log_every=2", "--model.n_layer=1", f"--train.metrics={d / 'metrics.jsonl'}",
            f"--checkpoint.dir={d / 'ck'}", "--checkpoint.every=3", f"--observe.tensorboard={d / 'tb'}",
            f"--observe.mlflow={(d / 'mlruns').as_uri()}", "--observe.mlflow_experiment=sinks-test",
            f"--observe.prometheus={prom}"]
    (s0, scrapes0), (s1, scrapes1) = run_ranks(train_scraped, 2, argv, prom, timeout_s=200,
                                               env={"MLFLOW_ALLOW_FILE_STORE": "true", "OMP_NUM_THREADS": "1"})
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert scrapes1 == [] and s0["weights_sha256"] == s1["weights_sha256"] and [r["step"] for r in records] == [1, 2, 4]
    return {"dir": d, "argv": argv, "prom": prom, "summary": s0, "scrapes": scrapes0, "records": records}


def test_tensorboard_events_read_back(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run["dir"] / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in run["records"]:
        for k, v in flatten_numeric(r).items():
            expected.setdefault(k, []).append((r["step"], v))
    for k, v in flatten_numeric(run["summary"]).items():
        expected[f"summary/{k}"] = [(run["summary"]["steps"], v)]
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag  # stored as float32


def test_mlflow_run_reads_back(run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    from trainlib.config import load_config

    client = MlflowClient(tracking_uri=(run["dir"] / "mlruns").as_uri())
    exp = client.get_experiment_by_name("sinks-test")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"
    assert r.data.params == flatten_config(load_config(None, run["argv"]).to_dict())
    keys = {k for rec in run["records"] for k in flatten_numeric(rec)}
    for k in keys:
        hist = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k))
        assert hist == [(rec["step"], flatten_numeric(rec)[k]) for rec in run["records"]
                        if k in flatten_numeric(rec)], k
    s = run["summary"]
    assert r.data.metrics["summary/loss_last"] == s["loss_last"] and r.data.metrics["summary/wall_s"] == s["wall_s"]
    assert r.data.tags["trainlib.checkpoint_dir"] == str(run["dir"] / "ck")
    assert r.data.tags["trainlib.checkpoint_step"] == "4" and r.data.tags["trainlib.world_size"] == "2"
    assert {a.path for a in client.list_artifacts(r.info.run_id)} == {"summary.json", "checkpoint.json"}
    local = client.download_artifacts(r.info.run_id, "summary.json", str(run["dir"] / "dl"))
    assert json.loads(open(local).read()) == s
    ck = json.loads(open(client.download_artifacts(r.info.run_id, "checkpoint.json", str(run["dir"] / "dl"))).read())
    assert ck == {"step": 4, "directory": str(run["dir"] / "ck")}


def test_prometheus_endpoint_scraped_at_every_window(run):
    from prometheus_client.parser import text_string_to_metric_families

    from trainlib.config import load_config

    cfg = load_config(None, run["argv"])
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    assert [rec for rec, _ in run["scrapes"]] == run["records"]
    checkpoints_before = {1: 0, 2: 0, 4: 1}  # --checkpoint.every=3: step 3's save precedes step 4's window
    for rec, text in run["scrapes"]:
        samples = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if not s.labels}
        for k, v in flatten_numeric(rec).items():
            if not k.startswith("per_rank/"):
                assert samples[f"trainlib_{k}"] == pytest.approx(v, rel=1e-12), k
        assert samples["trainlib_step"] == rec["step"]
        assert samples["trainlib_steps_total"] == rec["step"]
        assert samples["trainlib_tokens_total"] == rec["step"] * tokens_per_step
        assert samples["trainlib_checkpoints_total"] == checkpoints_before[rec["step"]]
        for key, values in (rec.get("per_rank") or {}).items():
            fam = {s.labels["rank"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == f"trainlib_per_rank_{key}"}
            assert fam == {str(i): pytest.approx(v) for i, v in enumerate(values)}, key
    # the endpoint is closed when train() returns (a second run in the process may take the port)
    host, port = run["prom"].rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass


def test_report_of_this_run(run):
    """`trainlib report RUN_DIR` on this run's directory (issue 20 item 3): the PNG decodes at the page's
    fixed size and is drawn on, the HTML shows it with the run's numbers, the panels hold the records."""
    from collections import Counter

    from PIL import Image

    from trainlib import cli
    from trainlib.observe.report_figure import DPI, FIGSIZE, build_figure

    d, records, s0 = run["dir"], run["records"], run["summary"]
    (d / "summary.json").write_text(json.dumps(s0))  # what `trainlib train` prints as its last line
    assert cli.main(["report", str(d)]) == 0
    with Image.open(d / "report.png") as img:
        img.load()  # decodes every pixel
        assert img.format == "PNG" and img.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
        assert len(img.convert("L").getcolors(1 << 16)) > 50  # drawn on, not a blank page
    page = (d / "report.html").read_text()
    assert "<img src='report.png'" in page and s0["weights_sha256"] in page
    assert f"last log window (step {records[-1]['step']})" in page
    fig = build_figure(records, s0, "t")
    loss = fig.axes[0].lines[0]
    assert list(loss.get_xdata()) == [1, 2, 4] and list(loss.get_ydata()) == [r["loss"] for r in records]
    # the trainer's breakdown (observe.breakdown, on by default): one band per part, a line per rank
    assert len(fig.axes[2].collections) >= 5 and len(fig.axes[3].lines) == 2
    rank, n = Counter(r["straggler_rank"] for r in records).most_common(1)[0]
    assert f"straggler: rank {rank} ({n} of {len(records)} windows)" in fig.axes[3].get_title()
