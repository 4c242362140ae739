"""Checkpoints: exact round trip, bit-identical continuation, keep-K, corruption fallback, multi-rank."""
from __future__ import annotations

import json
import logging
import random
import re

import numpy as np
import pytest
import torch

import trainlib as tl
from trainlib.checkpoint import CheckpointError, StateError, flatten, list_steps, latest_step, step_dir, unflatten
from trainlib.testing import run_ranks

pytestmark = pytest.mark.timeout(120)


def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))


def _train(model, opt, steps: int) -> None:
    for _ in range(steps):  # draws from the global RNG (data and dropout): RNG state must come back too
        x = torch.randn(5, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _state(model, opt) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "sampler": {"epoch": 1, "step": 7}}


def test_tree_round_trip_is_exact():
    base = torch.arange(12, dtype=torch.float32)
    state = {"views": [base[:6], base[6:]], "bf16": torch.randn(3, dtype=torch.bfloat16), "scalar": torch.tensor(2.5),
             "ints": {0: torch.ones(2, dtype=torch.int64), 3: "x"}, "betas": (0.9, 0.999), "nan": float("nan"),
             "nested": {"a": [1, None, True, "s", 1e-300]}, "empty": torch.empty(0, 4)}
    skeleton, tensors = flatten(state)
    json.dumps(skeleton)  # the skeleton is plain JSON
    back = unflatten(json.loads(json.dumps(skeleton)), tensors)
    assert back["betas"] == (0.9, 0.999) and list(back["ints"]) == [0, 3] and back["ints"][3] == "x"
    assert back["nested"] == state["nested"] and back["nan"] != back["nan"]
    for k in ("bf16", "scalar", "empty"):
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k])
    assert torch.equal(torch.cat(back["views"]), base)
    with pytest.raises(StateError, match=r"'opt/weird'.*set"):
        flatten({"opt": {"weird": {1, 2}}})


def test_resume_continues_bit_identically(tmp_path, caplog):
    model, opt = _model_and_opt()
    _train(model, opt, 3)
    random.seed(11)
    np.random.seed(12)
    tl.checkpoint.save(tmp_path, 3, _state(model, opt))
    expect_draws = (torch.rand(4), random.random(), np.random.rand())
    _train(model, opt, 3)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(999)  # a fresh process: different RNG, fresh model and optimizer
    random.seed(0)
    np.random.seed(0)
    model2, opt2 = _model_and_opt(seed=5)
    ck = tl.checkpoint.load(tmp_path)
    assert ck.step == 3 and ck.state["sampler"] == {"epoch": 1, "step": 7}
    model2.load_state_dict(ck.state["model"])
    opt2.load_state_dict(ck.state["optimizer"])
    got_draws = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(got_draws[0], expect_draws[0]) and got_draws[1:] == expect_draws[1:]
    _train(model2, opt2, 3)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_keep_k_and_latest_pointer(tmp_path):
    for s in (10, 20, 30, 40, 50):
        tl.checkpoint.save(tmp_path, s, {"w": torch.full((3,), float(s))}, keep=2)
    assert list_steps(tmp_path) == [40, 50] and latest_step(tmp_path) == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000040", "step_00000050"]
    # resuming from 40 and saving 45 drops the abandoned 50
    tl.checkpoint.save(tmp_path, 45, {"w": torch.zeros(1)}, keep=2)
    assert list_steps(tmp_path) == [40, 45] and latest_step(tmp_path) == 45
    with pytest.raises(CheckpointError, match="keep=0"):
        tl.checkpoint.save(tmp_path, 46, {}, keep=0)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path, where: float = 0.6):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [("rank0.safetensors", _truncate), ("rank0.safetensors", _flip),
                                    ("rank0.json", _flip), ("MANIFEST.json", _flip)])
def test_damaged_checkpoint_falls_back_with_warning(tmp_path, caplog, damage):
    name, how = damage
    for s in (1, 2, 3):
        tl.checkpoint.save(tmp_path, s, {"w": torch.full((1000,), float(s)), "s": s}, keep=3)
    how(step_dir(tmp_path, 3) / name)
    with caplog.at_level(logging.WARNING, logger="trainlib"):
        ck = tl.checkpoint.load(tmp_path)
    assert ck.step == 2 and ck.state["s"] == 2 and torch.equal(ck.state["w"], torch.full((1000,), 2.0))
    text = caplog.text
    assert "step_00000003" in text and "damaged" in text and "step_00000002" in text
    if name != "MANIFEST.json":
        assert name in text


def _edit_value(path, old: bytes, new: bytes) -> None:
    """Replace one JSON value by another of the same length: the file stays valid JSON, same size."""
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1, (path.name, old)
    edited = data.replace(old, new)
    json.loads(edited)  # still parses: only the checksum can tell
    path.write_bytes(edited)


def _saved_unix(path) -> bytes:
    return repr(json.loads(path.read_bytes())["body"]["saved_unix"]).encode()


# Each edit keeps the JSON valid and the size unchanged, so neither parsing nor the size check can
# notice it: the warning must be the checksum's, and the value must never be loaded.
@pytest.mark.parametrize("name,edit,reason", [
    ("rank0.json", lambda p: _edit_value(p, b'"s": 3', b'"s": 7'), r"rank0\.json sha256 \w+\.\.\. != manifest .*corrupted"),
    # the time stamp is the one value only the manifest's own sha256 covers
    ("MANIFEST.json", lambda p: _edit_value(p, _saved_unix(p), b"2" + _saved_unix(p)[1:]), "fails its own sha256"),
])
def test_same_length_json_edit_is_caught_by_its_checksum(tmp_path, caplog, name, edit, reason):
    for s in (1, 2, 3):
        tl.checkpoint.save(tmp_path, s, {"w": torch.full((10,), float(s)), "s": s}, keep=3)
    edit(step_dir(tmp_path, 3) / name)
    with caplog.at_level(logging.WARNING, logger="trainlib"):
        ck = tl.checkpoint.load(tmp_path)
    assert ck.step == 2 and ck.state["s"] == 2 and torch.equal(ck.state["w"], torch.full((10,), 2.0))
    damaged = [r.getMessage() for r in caplog.records if "step_00000003 is damaged: " in r.getMessage()]
    assert len(damaged) == 1 and re.search(reason, damaged[0]), caplog.text


def test_all_damaged_raises_and_empty_returns_none(tmp_path):
    assert tl.checkpoint.load(tmp_path / "nothing") is None
    for s in (1, 2):
        tl.checkpoint.save(tmp_path, s, {"w": torch.ones(10)})
        _flip(step_dir(tmp_path, s) / "rank0.safetensors")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*step_00000002.*step_00000001"):
        tl.checkpoint.load(tmp_path)


def _two_rank_save_corrupt_load(root: str):
    import torch.distributed as dist

    from trainlib import comm

    r = dist.get_rank()
    torch.manual_seed(100 + r)
    tl.checkpoint.save(root, 1, {"w": torch.full((64,), 10.0 + r), "rank": r}, keep=3)
    draw_after_step1 = torch.rand(3)
    tl.checkpoint.save(root, 2, {"w": torch.full((64,), 20.0 + r), "rank": r}, keep=3)
    if r == 1:  # only rank 1's shard of step 2 is damaged: both ranks must fall back together
        _flip(step_dir(root, 2) / "rank1.safetensors")
    comm.barrier()
    torch.manual_seed(0)
    ck = tl.checkpoint.load(root)
    rng_is_step1 = torch.equal(torch.rand(3), draw_after_step1)
    # a checkpoint written by a 1-rank job cannot be resumed by 2 ranks: a clear error on both
    if r == 0:
        tl.checkpoint.save(f"{root}/single", 1, {"w": torch.ones(1)}, rank=0, world_size=1)
    comm.barrier()
    try:
        tl.checkpoint.load(f"{root}/single")
        mismatch = "no error"
    except CheckpointError as e:
        mismatch = str(e)
    return {"step": ck.step, "w": ck.state["w"], "rank": ck.state["rank"], "rng_is_step1": rng_is_step1,
            "mismatch": mismatch}


def test_two_ranks_agree_on_fallback(tmp_path):
    out = run_ranks(_two_rank_save_corrupt_load, 2, str(tmp_path), timeout_s=60)
    for r, res in enumerate(out):
        assert res["step"] == 1 and res["rank"] == r and torch.equal(res["w"], torch.full((64,), 10.0 + r))
        assert res["rng_is_step1"]
        assert "saved by 1 ranks but this job has 2" in res["mismatch"] and "--checkpoint.dir" in res["mismatch"]
    files = json.loads((step_dir(tmp_path, 2) / "MANIFEST.json").read_text())["body"]["files"]
    assert sorted(files) == ["rank0.json", "rank0.safetensors", "rank1.json", "rank1.safetensors"]


def test_stfile_is_safetensors_both_ways(tmp_path):
    from safetensors.torch import load_file, save_file

    from trainlib.checkpoint import stfile

    ts = {"f32": torch.randn(3, 5), "u8": torch.arange(7, dtype=torch.uint8), "bf16": torch.randn(4, dtype=torch.bfloat16),
          "f64": torch.randn(2, dtype=torch.float64), "b": torch.tensor([True, False, True]), "s": torch.tensor(3),
          "e": torch.empty(0, 2)}
    digest, size = stfile.write(tmp_path / "ours.safetensors", ts, {"k": "v"})
    theirs = load_file(str(tmp_path / "ours.safetensors"))  # the reference reader agrees with our writer
    save_file(ts, str(tmp_path / "theirs.safetensors"))
    raw = (tmp_path / "theirs.safetensors").read_bytes()
    import hashlib

    ours = stfile.parse(stfile.read_verified(tmp_path / "theirs.safetensors", len(raw), hashlib.sha256(raw).hexdigest()))
    for k, v in ts.items():
        assert theirs[k].dtype == v.dtype and torch.equal(theirs[k], v), k
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k
    assert size == (tmp_path / "ours.safetensors").stat().st_size
    assert digest == hashlib.sha256((tmp_path / "ours.safetensors").read_bytes()).hexdigest()
