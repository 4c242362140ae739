"""The trainer on the ranks of a run_ranks group: the uninterrupted reference runs the fault, resume and
multi-node tests compare against (a `trainlib train` job costs ~13 s of CPU in imports and torchrun)."""
from __future__ import annotations


def train_each(argvs: list[list[str]]) -> list[dict]:
    """trainer.train of each argv in turn, on every rank of the group; this rank's summaries."""
    from trainlib import trainer
    from trainlib.config import load_config

    return [trainer.train(load_config(None, argv)) for argv in argvs]


def train_one(argv: list[str]) -> dict:
    return train_each([argv])[0]
