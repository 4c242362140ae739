"""Asynchronous checkpoint saves: a snapshot at call time, the same files as a synchronous save,
one save in flight, failures raised later (never lost), and a SIGKILL during the background write
leaves the previous checkpoint as `latest` (real processes, the fault hook's save phases)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time

import pytest
import torch

import trainlib as tl
from trainlib.checkpoint import CheckpointError, latest_step, list_steps, step_dir
from trainlib.checkpoint.async_save import CheckpointWriter
from trainlib.testing import _context, run_ranks

pytestmark = pytest.mark.timeout(120)

N = 1 << 19  # 2 MiB of float32: a background write long enough for a kill to land inside it


def _payload(step: int) -> dict:
    return {"w": torch.full((N,), float(step)), "b": torch.arange(step, step + 7), "step": step}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_async_save_is_a_snapshot_with_the_sync_files(tmp_path):
    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(1000), "b": torch.randn(7, dtype=torch.bfloat16)}, "sampler": {"step": 3}}
    expect = {k: v.clone() for k, v in state["model"].items()}
    tl.checkpoint.save(tmp_path / "sync", 3, state, save_rng=False, layout={"coords": {"dp": 0}})
    with CheckpointWriter(tmp_path / "async", save_rng=False) as writer:
        writer.save(3, state, layout={"coords": {"dp": 0}})
        for v in state["model"].values():  # training goes on right away and changes the live state
            v.add_(1)
    ck = tl.checkpoint.load(tmp_path / "async")
    assert ck.step == 3 and latest_step(tmp_path / "async") == 3 and ck.state["sampler"] == {"step": 3}
    for k, v in expect.items():
        assert torch.equal(ck.state["model"][k], v), k
    # the same recipe: byte-identical shard files, a manifest that differs only in its time stamp
    a, s = step_dir(tmp_path / "async", 3), step_dir(tmp_path / "sync", 3)
    for name in ("rank0.safetensors", "rank0.json"):
        assert _sha(a / name) == _sha(s / name), name
    ma, ms = (json.loads((d / "MANIFEST.json").read_text())["body"] for d in (a, s))
    ma.pop("saved_unix"), ms.pop("saved_unix")
    assert ma == ms and ma["layouts"] == {"0": {"coords": {"dp": 0}}}


def test_one_save_in_flight_and_keep(tmp_path):
    writer = CheckpointWriter(tmp_path, keep=2)
    for s in (1, 2, 3):
        writer.save(s, _payload(s))
        # save(s) waited for save(s - 1): it is complete and named by `latest` before s starts
        assert s == 1 or (latest_step(tmp_path) == s - 1 and s - 1 in list_steps(tmp_path))
    writer.close()
    assert list_steps(tmp_path) == [2, 3] and latest_step(tmp_path) == 3
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000002", "step_00000003"]
    with pytest.raises(CheckpointError, match="closed"):
        writer.save(4, _payload(4))


def test_background_failure_is_raised_at_next_save_and_at_wait(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    writer = CheckpointWriter(blocker / "ckpt")
    writer.save(1, _payload(1))  # returns: the failure happens in the background
    with pytest.raises(CheckpointError, match=r"background save of step 1 .* failed"):
        writer.save(2, _payload(2))
    writer.save(3, _payload(3))
    with pytest.raises(CheckpointError, match=r"background save of step 3 .* failed"):
        writer.wait()
    writer.wait()  # reported once, not again
    with pytest.raises(CheckpointError, match="keep=0"):
        CheckpointWriter(tmp_path, keep=0)


def _async_saver(root: str, steps: int, env: dict[str, str]) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    writer = CheckpointWriter(root, keep=2)
    for s in range(1, steps + 1):
        state = _payload(s)
        writer.save(s, state)
        state["w"].fill_(-1.0)  # the live state moves on while the background write runs
        state["b"].zero_()
        time.sleep(0.005)
    writer.close()


def _assert_loads_whole(root: str) -> int | None:
    ck = tl.checkpoint.load(root)
    if ck is None:
        assert list_steps(root) == [], "checkpoints exist but load returned None"
        return None
    s = ck.step
    assert ck.state["step"] == s
    assert torch.equal(ck.state["w"], torch.full((N,), float(s))) and torch.equal(ck.state["b"], torch.arange(s, s + 7))
    return s


@pytest.mark.parametrize("phase", ["save:shard", "save:manifest", "save:rename"])
def test_kill_during_background_write_keeps_previous_latest(tmp_path, phase):
    root = str(tmp_path)
    p = _context().Process(target=_async_saver, args=(root, 3, {"TRAINLIB_FAULT_KILL_AT_STEP": f"0:2:{phase}"}))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    assert latest_step(root) == 1 and _assert_loads_whole(root) == 1
    writer = CheckpointWriter(root, keep=2)  # the restarted job saves step 2 again over the leftovers
    writer.save(2, _payload(2))
    writer.close()
    assert _assert_loads_whole(root) == 2
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002"]


def test_sigkill_at_random_moments_during_async_saves(tmp_path):
    rng = random.Random(3)
    loaded = []
    for trial in range(4):
        root = str(tmp_path / f"t{trial}")
        p = _context().Process(target=_async_saver, args=(root, 10_000, {}))
        p.start()
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(root, "latest")) and time.monotonic() < deadline and p.is_alive():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
        s = _assert_loads_whole(root)  # never a `latest` that fails, never the mutated live state
        assert s is not None and s == latest_step(root)
        loaded.append(s)
    assert len(loaded) == 4


def _two_ranks_async(root: str):
    import torch.distributed as dist

    from trainlib import comm

    r = dist.get_rank()
    writer = CheckpointWriter(root, keep=3)
    sums = []
    for s in (1, 2):
        w = torch.full((N // 4,), 10.0 * s + r)
        writer.save(s, {"w": w, "rank": r}, layout={"coords": {"dp": r}})
        w.fill_(-1)
        # training's collectives on the default group while the background write uses its own
        for i in range(20):
            t = torch.full((1000,), float(r + i))
            comm.all_reduce(t)
            sums.append(t[0].item())
    writer.wait()
    bad = torch.zeros(3, dtype=torch.complex64) if r == 1 else torch.zeros(3)  # safetensors has no complex
    writer.save(3, {"w": bad})
    try:
        writer.close()
        failure = "none"
    except CheckpointError as e:
        failure = str(e)
    ck = tl.checkpoint.load(root)
    return {"sums": sums, "step": ck.step, "w": ck.state["w"], "rank": ck.state["rank"], "failure": failure}


def test_two_ranks_async_beside_training_collectives(tmp_path):
    out = run_ranks(_two_ranks_async, 2, str(tmp_path), timeout_s=90)
    expect_sums = [float(2 * i + 1) for i in range(20)] * 2  # (0 + i) + (1 + i)
    for r, res in enumerate(out):
        assert res["sums"] == expect_sums
        assert res["step"] == 2 and res["rank"] == r and torch.equal(res["w"], torch.full((N // 4,), 20.0 + r))
    assert "writing the shard failed on rank(s) [1]" in out[0]["failure"]
    assert "complex" in out[1]["failure"]
    body = json.loads((step_dir(tmp_path, 2) / "MANIFEST.json").read_text())["body"]
    assert body["layouts"] == {"0": {"coords": {"dp": 0}}, "1": {"coords": {"dp": 1}}}
    assert list_steps(tmp_path) == [1, 2] and latest_step(tmp_path) == 2


def test_deferred_copy_of_optimizer_tensors_is_taken_before_the_next_step(tmp_path):
    # until=opt: the weights and AdamW moments are copied on the background thread; the optimizer's
    # next step() (which changes them in place) waits for that copy. A BatchNorm running mean changes
    # in forward, so it is copied at once. The checkpoint must be the state at the save() call.
    torch.manual_seed(0)
    # wide layers, small batch: the step is much shorter than the copy, so without the hook the
    # optimizer would overwrite the weights before the background thread copied them
    model = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.BatchNorm1d(1024), torch.nn.Linear(1024, 1024))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step():
        model(torch.randn(4, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    writer = CheckpointWriter(tmp_path, save_rng=False)
    for s in (1, 2):
        expect = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                  "exp_avg": [opt.state[p]["exp_avg"].clone() for p in model.parameters()]}
        writer.save(s, {"model": model.state_dict(), "optimizer": opt.state_dict()}, until=opt)
        step()  # forward changes the BN buffers at once; the hook holds the optimizer for the copy
        assert writer.hook_wait_s >= 0.0
        writer.wait()
        ck = tl.checkpoint.load(tmp_path)
        assert ck.step == s
        for k, v in expect["model"].items():
            assert torch.equal(ck.state["model"][k], v), k
            assert not torch.equal(model.state_dict()[k], v), k  # the live state did move on
        saved = ck.state["optimizer"]["state"]
        for i, v in enumerate(expect["exp_avg"]):
            assert torch.equal(saved[i]["exp_avg"], v)
    writer.close()
    step()  # the hook is gone with the writer
