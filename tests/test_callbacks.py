"""trainer.train(cfg, callbacks=...): rank 0 sees every log window, checkpoint and the summary.

Reference: the JSONL metrics file the trainer writes and the summary train() returns; the other
rank's callback must see nothing (callbacks are rank-0 only by contract)."""
from __future__ import annotations

import json

import pytest

from trainlib.callbacks import Callback
from trainlib.testing import run_ranks


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list = []

    def on_train_start(self, config, info):
        self.events.append(("start", info["world_size"], info["start_step"]))

    def on_log(self, record):
        self.events.append(("log", record))

    def on_checkpoint(self, step, directory):
        self.events.append(("ckpt", step, directory))

    def on_train_end(self, summary):
        self.events.append(("end", summary))

    def on_train_error(self, error):
        self.events.append(("error", error))


def recorded_run(argv: list[str]) -> tuple[dict, list]:
    from trainlib import trainer
    from trainlib.config import load_config

    rec = Recorder()
    summary = trainer.train(load_config(None, argv), callbacks=[rec])
    return summary, rec.events


def test_callbacks_on_rank0_match_metrics_file_and_summary(tmp_path):
    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    argv = ["--train.steps=4", "--train.log_every=2", "--model.n_layer=1", f"--train.metrics={metrics}",
            f"--checkpoint.dir={ck}", "--checkpoint.every=3"]
    (s0, ev0), (s1, ev1) = run_ranks(recorded_run, 2, argv, timeout_s=180)
    assert ev1 == [] and s0["weights_sha256"] == s1["weights_sha256"]
    assert ev0[0] == ("start", 2, 0)
    logs = [e[1] for e in ev0 if e[0] == "log"]
    assert logs == [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 4]
    assert [e[1:] for e in ev0 if e[0] == "ckpt"] == [(3, str(ck)), (4, str(ck))]
    assert ev0[-1] == ("end", s0) and logs[-1]["loss"] == round(s0["loss_last"], 5)


class Boom(Callback):
    def on_log(self, record):
        if record["step"] == 2:
            raise RuntimeError("sink down at step 2")


def failing_run(argv: list[str], mlflow_uri: str) -> dict:
    """train() raising on rank 0: every started callback (a real MLflow sink among them) sees the error."""
    from trainlib import trainer
    from trainlib.config import load_config
    from trainlib.observe.mlflow_sink import MLflowSink

    rec, sink = Recorder(), MLflowSink(mlflow_uri, "errors")
    try:
        trainer.train(load_config(None, argv), callbacks=[rec, Boom(), sink])
    except RuntimeError as e:
        errors = [ev for ev in rec.events if ev[0] == "error"]
        return {"raised": str(e), "seen": [str(ev[1]) for ev in errors], "run_id": sink.run_id,
                "logs": [ev[1]["step"] for ev in rec.events if ev[0] == "log"]}
    return {"raised": None}


def test_an_error_reaches_every_callback_and_marks_the_mlflow_run_failed(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = tmp_path.joinpath("mlruns").as_uri()
    argv = ["--train.steps=4", "--train.log_every=1", "--model.n_layer=1", f"--train.metrics={tmp_path / 'm.jsonl'}"]
    out, = run_ranks(failing_run, 1, argv, uri, env={"MLFLOW_ALLOW_FILE_STORE": "true"}, timeout_s=120)
    assert out["raised"] == "sink down at step 2" and out["seen"] == ["sink down at step 2"]
    assert out["logs"] == [1, 2]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = mlflow.MlflowClient(uri).get_run(out["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["trainlib.error"] == "RuntimeError: sink down at step 2"
    assert not (tmp_path / "summary.json").exists()   # a failed run writes no summary


def test_rank0_writes_the_summary_beside_the_metrics(tmp_path):
    argv = ["--train.steps=2", "--model.n_layer=1", f"--train.metrics={tmp_path / 'm.jsonl'}"]
    (s0, _), (s1, _) = run_ranks(recorded_run, 2, argv, timeout_s=180)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(s0, default=str))


def test_summary_writers_sharing_a_directory_never_collide(tmp_path):
    # two jobs pointed at one metrics directory (CI's concurrent resume runs did this): each
    # process's temporary file is its own, so neither rename finds the file gone
    import multiprocessing as mp

    from trainlib.config import load_config

    cfg = load_config(None, [f"--train.metrics={tmp_path / 'm.jsonl'}"])
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_summaries, args=(cfg, k)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.loads((tmp_path / "summary.json").read_text())["writer"] in (0, 1)
    assert not list(tmp_path.glob(".summary.json*"))


def _write_summaries(cfg, k: int) -> None:
    from trainlib.trainer import _write_summary

    for i in range(300):
        _write_summary(cfg, {"writer": k, "i": i})
