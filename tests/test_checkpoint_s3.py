"""Checkpoints on S3, against a real S3-compatible server (moto's standalone server, started here as
a subprocess on loopback): the same guarantees and the same kill and corruption tests as on disk."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import trainlib as tl
from trainlib.checkpoint import latest_step, list_steps
from trainlib.checkpoint.async_save import CheckpointWriter
from trainlib.testing import _context, run_ranks

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

pytestmark = pytest.mark.timeout(120)

N = 1 << 19  # 2 MiB of float32 per checkpoint
BUCKET = "ckpt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto server on 127.0.0.1, boto3 pointed at it by env (dummy credentials), one bucket."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"moto server did not start on port {port} (exit {proc.poll()})")
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"])
        client.create_bucket(Bucket=BUCKET)
        yield env, client
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", []))


def _payload(step: int) -> dict:
    return {"w": torch.full((N,), float(step)), "b": torch.arange(step, step + 7), "step": step}


def _assert_loads_whole(root: str) -> int | None:
    ck = tl.checkpoint.load(root)
    if ck is None:
        assert list_steps(root) == [], "checkpoints exist but load returned None"
        return None
    s = ck.step
    assert ck.state["step"] == s
    assert torch.equal(ck.state["w"], torch.full((N,), float(s))) and torch.equal(ck.state["b"], torch.arange(s, s + 7))
    return s


def test_s3_round_trip_keep_and_latest(s3_env):
    _, client = s3_env
    root = f"s3://{BUCKET}/run1"
    assert tl.checkpoint.load(root) is None
    for s in (10, 20, 30):
        tl.checkpoint.save(root, s, _payload(s), keep=2)
    assert list_steps(root) == [20, 30] and latest_step(root) == 30
    assert _keys(client, "run1/") == ["latest"] + [f"step_000000{s}/{n}" for s in (20, 30) for n in
                                                    ("MANIFEST.json", "rank0.json", "rank0.safetensors")]
    assert _assert_loads_whole(root) == 30
    # the shard is a plain safetensors object that the reference reader loads
    from safetensors.torch import load as st_load

    obj = client.get_object(Bucket=BUCKET, Key="run1/step_00000030/rank0.safetensors")["Body"].read()
    assert any(torch.equal(t, torch.full((N,), 30.0)) for t in st_load(obj).values())
    # a resume from 20 that saves 25 drops the abandoned 30
    tl.checkpoint.save(root, 25, _payload(25), keep=2)
    assert list_steps(root) == [20, 25] and latest_step(root) == 25


def _flip(client, key: str) -> None:
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[int(len(data) * 0.6)] ^= 0x10
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))


def _truncate(client, key: str) -> None:
    data = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client.put_object(Bucket=BUCKET, Key=key, Body=data[: len(data) // 2])


@pytest.mark.parametrize("name,how", [("rank0.safetensors", _flip), ("rank0.safetensors", _truncate),
                                      ("rank0.json", _flip), ("MANIFEST.json", _flip)])
def test_s3_damaged_object_falls_back(s3_env, caplog, name, how):
    _, client = s3_env
    prefix = f"dmg-{name}-{how.__name__}"
    root = f"s3://{BUCKET}/{prefix}"
    for s in (1, 2, 3):
        tl.checkpoint.save(root, s, _payload(s), keep=3)
    how(client, f"{prefix}/step_00000003/{name}")
    with caplog.at_level(logging.WARNING, logger="trainlib"):
        assert _assert_loads_whole(root) == 2
    assert "step_00000003" in caplog.text and "damaged" in caplog.text


def _saver(root: str, steps: int, env: dict[str, str], use_async: bool) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    writer = CheckpointWriter(root, keep=2) if use_async else None
    for s in range(1, steps + 1):
        if writer is not None:
            state = _payload(s)
            writer.save(s, state)
            state["w"].fill_(-1.0)
        else:
            tl.checkpoint.save(root, s, _payload(s), keep=2)
    if writer is not None:
        writer.close()


# two of the four (phase x mode) pairs, to stay inside the suite's time budget: the phases' code
# paths are shared by both modes (write_flat), the modes differ only in who runs it
@pytest.mark.parametrize("phase,use_async", [("save:shard", True), ("save:manifest", False)],
                         ids=["shard-async", "manifest-sync"])
def test_s3_kill_during_save_keeps_previous_latest(s3_env, phase, use_async):
    env, client = s3_env
    prefix = f"kill-{phase.replace(':', '-')}-{use_async}"
    root = f"s3://{BUCKET}/{prefix}"
    p = _context().Process(target=_saver, args=(root, 3, {**env, "TRAINLIB_FAULT_KILL_AT_STEP": f"0:2:{phase}"},
                                                use_async))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    assert latest_step(root) == 1 and _assert_loads_whole(root) == 1
    if phase == "save:manifest":  # complete, but `latest` never moved: load still trusts `latest`
        assert list_steps(root) == [1, 2]
    else:  # shard objects without a manifest: not a checkpoint
        assert list_steps(root) == [1] and any(k.startswith("step_00000002/") for k in _keys(client, prefix + "/"))
    tl.checkpoint.save(root, 2, _payload(2), keep=2)  # the restarted job saves 2 over the leftovers
    assert _assert_loads_whole(root) == 2
    tl.checkpoint.save(root, 3, _payload(3), keep=1)
    assert _keys(client, prefix + "/") == ["latest", "step_00000003/MANIFEST.json", "step_00000003/rank0.json",
                                           "step_00000003/rank0.safetensors"]


def _two_ranks_s3(root: str):
    import torch.distributed as dist

    from trainlib import comm

    r = dist.get_rank()
    writer = CheckpointWriter(root, keep=3)
    for s in (1, 2):
        writer.save(s, {"w": torch.full((64,), 10.0 * s + r), "rank": r}, layout={"coords": {"dp": r}})
    writer.close()
    if r == 1:  # only rank 1's shard of step 2 is damaged: both ranks must fall back together
        import boto3

        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
        _flip(client, f"{root.split('/', 3)[3]}/step_00000002/rank1.safetensors")
    comm.barrier()
    ck = tl.checkpoint.load(root)
    return {"step": ck.step, "w": ck.state["w"], "rank": ck.state["rank"]}


def test_s3_two_ranks_async_save_and_agreed_fallback(s3_env):
    env, client = s3_env
    root = f"s3://{BUCKET}/two"
    out = run_ranks(_two_ranks_s3, 2, root, env=env, timeout_s=90)
    for r, res in enumerate(out):
        assert res["step"] == 1 and res["rank"] == r and torch.equal(res["w"], torch.full((64,), 10.0 + r))
    body = json.loads(client.get_object(Bucket=BUCKET, Key="two/step_00000002/MANIFEST.json")["Body"].read())["body"]
    assert sorted(body["files"]) == ["rank0.json", "rank0.safetensors", "rank1.json", "rank1.safetensors"]
    assert body["layouts"] == {"0": {"coords": {"dp": 0}}, "1": {"coords": {"dp": 1}}}


def test_s3_large_shard_goes_multipart(s3_env, monkeypatch):
    from trainlib.checkpoint import s3

    _, client = s3_env
    monkeypatch.setattr(s3, "PART_BYTES", 5 * 1024 * 1024)  # S3's smallest part: 12 MiB makes 3 parts
    root = f"s3://{BUCKET}/multipart"
    w = torch.randn(3 * (1 << 20))
    tl.checkpoint.save(root, 1, {"w": w}, save_rng=False)
    head = client.head_object(Bucket=BUCKET, Key="multipart/step_00000001/rank0.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object's ETag counts its parts
    assert torch.equal(tl.checkpoint.load(root).state["w"], w)


def _train(argv: list[str]) -> dict:
    from trainlib import trainer
    from trainlib.config import load_config

    return trainer.train(load_config(None, argv))


def test_s3_resume_under_another_layout(s3_env, tmp_path):
    """ZeRO-1 on 2 ranks saves to S3; one rank resumes from S3 (a reshard: dp 2 -> 1, optimizer -> none).
    Reference: the same resume from a local copy of the same objects (the disk path test_reshard.py checks)."""
    env, client = s3_env
    small = ["--model.n_layer=1", "--train.log_every=1", "--checkpoint.every=2"]
    root = f"s3://{BUCKET}/reshard"
    run_ranks(_train, 2, [*small, "--train.steps=2", "--dp.shard=optimizer", f"--checkpoint.dir={root}",
                          f"--train.metrics={tmp_path / 'a.jsonl'}"], env=env, timeout_s=120)
    local = tmp_path / "copy"
    for key in _keys(client, "reshard/"):
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, f"reshard/{key}", str(local / key))
    tail = [*small, "--train.steps=3"]
    from_s3, = run_ranks(_train, 1, [*tail, f"--checkpoint.dir={root}", f"--train.metrics={tmp_path / 'b.jsonl'}"],
                         env=env, timeout_s=120)
    from_disk, = run_ranks(_train, 1, [*tail, f"--checkpoint.dir={local}", f"--train.metrics={tmp_path / 'c.jsonl'}"],
                           timeout_s=120)
    assert from_s3["resumed_from"] == from_disk["resumed_from"] == 2
    assert from_s3["weights_sha256"] == from_disk["weights_sha256"] and from_s3["loss_last"] == from_disk["loss_last"]
    assert 3 in list_steps(root)
