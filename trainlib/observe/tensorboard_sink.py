"""TensorBoard event files: one scalar per numeric key of every log window (`--observe.tensorboard DIR`).

    trainlib train --observe.tensorboard runs/tb/gpt-dp2 ; tensorboard --logdir runs/tb

Written with torch.utils.tensorboard.SummaryWriter (needs the `tensorboard` package). Per-rank
values land as `per_rank/<key>/<rank>`, so TensorBoard's regex filter `per_rank/t_step_s` shows all
ranks of one quantity side by side.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from ..callbacks import Callback
from .records import flatten_numeric

log = logging.getLogger("trainlib")


class TensorBoardSink(Callback):
    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer imports tensorboard's protobufs
            raise ImportError(f"--observe.tensorboard={log_dir!r} needs the tensorboard package ({e}); "
                              "pip install 'trainlib[observe]' or drop the flag") from e
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)
        self.last_step = 0

    def on_train_start(self, config: Any, info: dict[str, Any]) -> None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else config
        # markdown code block: TensorBoard's text tab renders the run's configuration verbatim
        self.writer.add_text("config", "```\n" + json.dumps(cfg, indent=2, default=str) + "\n```", 0)
        self.writer.add_text("run_info", "```\n" + json.dumps(info, indent=2, default=str) + "\n```", 0)

    def on_log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in flatten_numeric(record).items():
            self.writer.add_scalar(key, value, step)
        # a window is seconds apart: flushing each one keeps a live TensorBoard current at little cost
        self.writer.flush()
        self.last_step = step

    def on_checkpoint(self, step: int, directory: str) -> None:
        self.writer.add_text("checkpoint", f"step {step}: `{directory}`", step)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        step = int(summary.get("steps", self.last_step))
        for key, value in flatten_numeric(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, step)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2, default=str) + "\n```", step)
        self.writer.close()
        log.info("TensorBoard events in %s", self.log_dir)

    def on_train_error(self, error: BaseException) -> None:
        self.writer.close()   # what was logged before the failure stays readable
