"""checkpoint.hooks: a registered function sees every phase of a real save, in order, and no more once removed."""
from __future__ import annotations

import pytest
import torch

import trainlib as tl
from trainlib.checkpoint import hooks


def test_hook_sees_the_phases_of_a_save_in_order(tmp_path):
    seen: list[tuple[str, int, int]] = []
    remove = hooks.register(lambda phase, *, rank, step: seen.append((phase, rank, step)))
    try:
        tl.checkpoint.save(str(tmp_path), 4, {"w": torch.arange(3.0)})
    finally:
        remove()
    assert seen == [("save:shard", 0, 4), ("save:manifest", 0, 4), ("save:rename", 0, 4)]
    assert tuple(p for p, _, _ in seen) == hooks.PHASES[1:]  # PHASES documents them in firing order
    tl.checkpoint.save(str(tmp_path), 5, {"w": torch.arange(3.0)})
    assert len(seen) == 3 and tl.checkpoint.load(str(tmp_path)).step == 5


def test_unknown_phase_names_the_known_ones():
    with pytest.raises(ValueError, match="'save:oops' is not one of step, save:shard"):
        hooks.fire("save:oops", rank=0, step=1)
