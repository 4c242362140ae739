"""trainer.train(cfg, callbacks=...): rank 0 sees every log window, checkpoint and the summary.

Reference: the JSONL metrics file the trainer writes and the summary train() returns; the other
rank's callback must see nothing (callbacks are rank-0 only by contract)."""
from __future__ import annotations

import json

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
