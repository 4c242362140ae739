"""A process SIGKILLed during a checkpoint save never leaves something that loads partially.

Real processes (forkserver children that preload torch, so each starts in ~0.1 s), real SIGKILL:
once at each phase of a save via the fault hook, and at random moments from outside.
"""
from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

import trainlib as tl
from trainlib.checkpoint import list_steps
from trainlib.testing import _context

pytestmark = pytest.mark.timeout(120)

N = 1 << 19  # 2 MiB of float32 per checkpoint: big enough that a kill often lands inside a write


def _payload(step: int) -> dict:
    return {"w": torch.full((N,), float(step)), "b": torch.arange(step, step + 7), "step": step}


def _saver(root: str, steps: int, env: dict[str, str]) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    for s in range(1, steps + 1):
        tl.checkpoint.save(root, s, _payload(s), keep=2)


def _assert_loads_whole(root: str) -> int | None:
    ck = tl.checkpoint.load(root)
    if ck is None:
        assert list_steps(root) == [], "checkpoints exist but load returned None"
        return None
    s = ck.step
    assert ck.state["step"] == s
    assert torch.equal(ck.state["w"], torch.full((N,), float(s))) and torch.equal(ck.state["b"], torch.arange(s, s + 7))
    return s


def _run(target, *args) -> int:
    p = _context().Process(target=target, args=args)
    p.start()
    p.join(60)
    assert not p.is_alive()
    return p.exitcode


@pytest.mark.parametrize("phase", ["save:shard", "save:manifest", "save:rename"])
def test_kill_at_each_phase_of_a_save(tmp_path, phase):
    root = str(tmp_path)
    code = _run(_saver, root, 3, {"TRAINLIB_FAULT_KILL_AT_STEP": f"0:2:{phase}"})
    assert code == -signal.SIGKILL
    assert _assert_loads_whole(root) == 1  # `latest` was never moved to 2
    # the restarted job saves step 2 again over whatever the killed one left
    tl.checkpoint.save(root, 2, _payload(2), keep=2)
    assert _assert_loads_whole(root) == 2
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002"]


def test_sigkill_at_random_moments(tmp_path):
    # The saver does nothing but save 2 MiB checkpoints, so a kill usually lands inside one. A save
    # cut before its rename leaves .tmp-step_N behind; one cut after the rename, a step_N newer than
    # `latest`. Either way the step before must be what loads. Trials continue (at most 12) until
    # two saves were cut: without a kill inside a save this test would prove nothing.
    from trainlib.checkpoint import latest_step

    rng = random.Random(7)
    loaded, cut = [], []
    for trial in range(12):
        if trial >= 5 and len(cut) >= 2:
            break
        root = str(tmp_path / f"t{trial}")
        p = _context().Process(target=_saver, args=(root, 10_000, {}))
        p.start()
        # from the first complete checkpoint on, the saver is always inside or between saves: a slow
        # start on a loaded machine cannot make the kill land before the first save
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(root, "latest")) and time.monotonic() < deadline and p.is_alive():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
        tmp = [n for n in os.listdir(root) if n.startswith(".tmp-step_")]
        newest, pointer = max(list_steps(root), default=None), latest_step(root)
        s = _assert_loads_whole(root)
        loaded.append(s)
        if tmp:  # cut before the rename
            assert len(tmp) == 1, tmp
            n = int(tmp[0][len(".tmp-step_"):])
            cut.append(n)
            assert s == (n - 1 if n > 1 else None), (tmp, s)  # the interrupted step never loads
        elif newest is not None and pointer is not None and newest > pointer:  # cut after the rename
            cut.append(newest)
            assert s == pointer, (newest, pointer, s)
    assert any(s is not None for s in loaded), f"no trial got as far as a checkpoint: {loaded}"
    assert cut, f"no kill landed inside a save in {len(loaded)} trials (loaded {loaded})"
    print(f"steps loaded after kill: {loaded}; saves cut: {cut}")
