"""Hooks into the training loop for code that watches a run: metric sinks, Ray Tune, profilers.

    class Printer(tl.Callback):
        def on_log(self, record):            # every --train.log_every steps, rank 0 only
            print(record["step"], record["loss"])
    trainlib.trainer.train(cfg, callbacks=[Printer()])

Every method is called on rank 0 only (the main process), after the values it receives have been
reduced over the ranks that hold them, so a callback never needs a collective of its own. Methods
run inline in the loop: a slow one slows training, so keep them cheap or hand work to a thread.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("trainlib")


class Callback:
    """Base class: override what you need; every method is a no-op here."""

    def on_train_start(self, config: Any, info: dict[str, Any]) -> None:
        """Before the first step. `config` is the run's Config; `info` has world_size, mesh, params, start_step."""

    def on_log(self, record: dict[str, Any]) -> None:
        """One log window: the same record the JSONL metrics file gets (step, loss, lr, tokens_per_s, ...)."""

    def on_checkpoint(self, step: int, directory: str) -> None:
        """A checkpoint of `step` was written (or, with --checkpoint.async, handed to the writer) under `directory`."""

    def on_train_end(self, summary: dict[str, Any]) -> None:
        """After the last step, with the run's summary (the JSON `trainlib train` prints)."""

    def on_train_error(self, error: BaseException) -> None:
        """train() is raising `error` (a lost peer, a bad step, Ctrl-C): mark the run failed, release
        what you hold. The error is re-raised after every callback has seen it."""


def fire(callbacks: list[Callback] | tuple[Callback, ...], event: str, *args: Any) -> None:
    for cb in callbacks:
        getattr(cb, event)(*args)


def fire_error(callbacks: list[Callback] | tuple[Callback, ...], error: BaseException) -> None:
    """on_train_error on every callback; one that fails is logged, so the others and the original
    error still get through."""
    for cb in callbacks:
        try:
            cb.on_train_error(error)
        except Exception:  # noqa: BLE001 - the run's own error is the one to raise
            log.exception("%s.on_train_error failed", type(cb).__name__)
