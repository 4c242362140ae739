"""`trainlib ckpt ls | verify | export` on checkpoints made by real training runs.

Three runs of the same seed and steps: plain dp2, dp2 with ZeRO-3 (--dp.shard parameters) and
dp2 x tp2 with ZeRO-1, the trainer on real gloo ranks (one spawned group per world size: a
`trainlib train` job costs ~13-25 s of CPU in imports and torchrun for a 2-step run). The reference
for an export is what the run itself ended on: each run's summary carries weights_sha256 of its
final weights (for tp, rank 0's tp slice), so the exported file loaded into a fresh GPT must hash
to it, bit for bit; and every layout's export must agree with the plain run's within float
reduction-order noise."""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainlib.cli import main as cli
from trainlib.models.gpt import GPT, GPTConfig
from trainlib.testing import run_ranks
from tests.trainer_ranks import train_each
from trainlib.trainer import weights_sha256

pytestmark = pytest.mark.timeout(300)

CFG = GPTConfig(vocab_size=256, seq_len=16, n_layer=1, n_head=2, d_model=32)
ARGS = ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.seq_len", "16",
        "--train.batch_size", "4", "--train.corpus_bytes", "65536", "--train.steps", "2", "--checkpoint.every", "2",
        "--train.log_every", "2"]
RUNS = {"dp2": [], "dp2_zero3": ["--dp.shard", "parameters"],
        "dp2_tp2_zero1": ["--mesh.tp", "2", "--dp.shard", "optimizer"]}
LAYOUT = {"dp2": ({"pp": 1, "dp": 2, "tp": 1}, "none", 2), "dp2_zero3": ({"pp": 1, "dp": 2, "tp": 1}, "parameters", 2),
          "dp2_tp2_zero1": ({"pp": 1, "dp": 2, "tp": 2}, "optimizer", 4)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """name -> (checkpoint dir, rank 0's summary, as `trainlib train` prints it)."""
    root = tmp_path_factory.mktemp("ckpt_tools")
    out = {}
    for world in sorted({w for _, _, w in LAYOUT.values()}):
        names = [name for name in RUNS if LAYOUT[name][2] == world]
        argvs = [[*ARGS, *RUNS[name], "--checkpoint.dir", str(root / name),
                  "--train.metrics", str(root / f"{name}.jsonl")] for name in names]
        summaries = run_ranks(train_each, world, argvs, env={"TRAINLIB_NO_PROGRESS": "1"}, timeout_s=240)[0]
        out.update({name: (root / name, summary) for name, summary in zip(names, summaries)})
    return out


def _ckpt(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli(["ckpt", *argv])
    got = capsys.readouterr()
    return rc, got.out, got.err


def _fresh_gpt(path: Path) -> GPT:
    model = GPT(CFG, seed=123)   # another seed: every weight must come from the file
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def _manifest(step_path: Path) -> dict:
    return json.loads((step_path / "MANIFEST.json").read_bytes())


def _rewrite_manifest(step_path: Path, body: dict) -> None:
    """A manifest as the writer makes it: the body and sha256 of its canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    (step_path / "MANIFEST.json").write_text(json.dumps({"sha256": hashlib.sha256(canonical).hexdigest(),
                                                         "body": body}, indent=1))


def test_export_is_the_weights_each_run_ended_on(runs, tmp_path, capsys):
    exported = {}
    for name, (ck, summary) in runs.items():
        out = tmp_path / f"{name}.safetensors"
        rc, stdout, stderr = _ckpt(capsys, "export", str(ck), "--out", str(out))
        assert rc == 0, stderr
        assert json.loads(stdout) == {"step": 2, "path": str(out), "tensors": 17, "bytes": out.stat().st_size,
                                      "dtype": "fp32"}
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # the tmp file was renamed
        model = _fresh_gpt(out)
        weights = model.state_dict()
        exported[name] = weights
        if LAYOUT[name][0]["tp"] == 1:
            assert weights_sha256(weights) == summary["weights_sha256"], name
        else:   # the summary hashes rank 0's tp slice (and the replicated tensors) under its local names
            layout = _manifest(ck / "step_00000002")["body"]["layouts"]["0"]["params"]
            local = {e["key"]: (weights[n].narrow(e["tp"]["dim"], 0, e["local_shape"][e["tp"]["dim"]])
                                if e["tp"] else weights[n]).contiguous() for n, e in layout.items()}
            assert weights_sha256(local) == summary["weights_sha256"]
            assert "4/4" in stderr   # the progress bar went over every rank
    plain = exported["dp2"]
    assert any(not torch.equal(plain[k], GPT(CFG, seed=0).state_dict()[k]) for k in plain)   # it trained
    for name in ("dp2_zero3", "dp2_tp2_zero1"):   # the same arithmetic up to reduction order
        assert max((exported[name][k] - plain[k]).abs().max().item() for k in plain) < 1e-6, name
    # the plain run's rank 0 file holds the whole model: the export is its bytes
    rank0 = load_file(str(runs["dp2"][0] / "step_00000002" / "rank0.safetensors"))
    assert all(torch.equal(plain[k], rank0[f"state/model/{k}"]) for k in plain)


def test_export_bf16_and_master(runs, tmp_path, capsys):
    ck = runs["dp2_zero3"][0]
    rc, _, err = _ckpt(capsys, "export", str(ck), "--out", str(tmp_path / "fp32.safetensors"))
    assert rc == 0, err
    rc, _, err = _ckpt(capsys, "export", str(ck), "--out", str(tmp_path / "bf16.safetensors"), "--dtype", "bf16",
                       "--master", "--step", "2")
    assert rc == 0, err
    fp32, bf16 = load_file(str(tmp_path / "fp32.safetensors")), load_file(str(tmp_path / "bf16.safetensors"))
    assert set(fp32) == set(bf16)
    for k in fp32:   # an fp32 run's masters are its weights; bf16 is their rounding
        assert bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].bfloat16()), k


def test_ls_shows_each_layout(runs, capsys):
    for name, (ck, _) in runs.items():
        mesh, shard, world = LAYOUT[name]
        rc, out, err = _ckpt(capsys, "ls", str(ck), "--json")
        assert rc == 0, err
        (info,) = json.loads(out)
        files = sum(p.stat().st_size for p in (ck / "step_00000002").iterdir())
        assert info == {"step": 2, "path": str(ck / "step_00000002"), "latest": True, "world_size": world,
                        "mesh": mesh, "shard": shard, "bytes": files,
                        "saved_unix": _manifest(ck / "step_00000002")["body"]["saved_unix"], "problems": None}
        rc, out, _ = _ckpt(capsys, "ls", str(ck), "--verify")
        assert rc == 0
        line, = out.splitlines()
        want = f"latest  world {world}  pp1 dp{mesh['dp']} tp{mesh['tp']} shard={shard}"
        assert want in line and line.endswith("verified") and line.split()[:2] == ["step", "2"], line


def test_verify_names_a_flipped_byte_in_a_rank_file_and_in_the_manifest(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRAINLIB_NO_PROGRESS", "1")   # stderr is then the error line alone
    ck = tmp_path / "ck"
    shutil.copytree(runs["dp2_tp2_zero1"][0], ck)
    rc, out, err = _ckpt(capsys, "verify", str(ck))
    assert rc == 0 and out == "step 2: intact\n" and err == ""
    (ck / "latest").write_text("step_00000009\n")   # a pointer to nothing: a warning, not damage
    rc, out, err = _ckpt(capsys, "verify", str(ck))
    assert rc == 0 and out == "step 2: intact\n" and "latest names step 9, which is not a complete" in err, err

    victim = ck / "step_00000002" / "rank3.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    rc, out, err = _ckpt(capsys, "verify", str(ck), "--step", "2")
    assert rc == 1
    bad = [line.strip() for line in out.splitlines()[1:]]
    assert len(bad) == 1 and bad[0].startswith("rank3.safetensors: sha256 ") and bad[0].endswith("(corrupted)"), out
    rc, out, _ = _ckpt(capsys, "ls", str(ck), "--verify")
    assert rc == 1 and "damaged: rank3.safetensors: sha256" in out
    rc, out, err = _ckpt(capsys, "export", str(ck), "--out", str(tmp_path / "m.safetensors"))
    assert rc == 1 and "rank3.safetensors" in err and "corrupted" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m.safetensors").exists()
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    manifest = ck / "step_00000002" / "MANIFEST.json"
    text = manifest.read_text()
    digest = _manifest(ck / "step_00000002")["body"]["files"]["rank0.json"]["sha256"]
    flipped = digest[:-1] + ("0" if digest[-1] != "0" else "1")   # still valid JSON, a different body
    manifest.write_text(text.replace(digest, flipped))
    rc, out, _ = _ckpt(capsys, "verify", str(ck))
    assert rc == 1 and "MANIFEST.json fails its own sha256" in out, out
    rc, out, _ = _ckpt(capsys, "ls", str(ck))   # ls checks the manifest even without --verify
    assert rc == 1 and "damaged: MANIFEST.json fails its own sha256" in out


def test_checkpoint_without_layouts(runs, tmp_path, capsys, monkeypatch):
    """A manifest from before layouts were recorded: a pure dp run exports from rank 0's whole
    model (its ranks are checked to agree), a sharded or tp run is refused."""
    monkeypatch.setenv("TRAINLIB_NO_PROGRESS", "1")
    for name in ("dp2", "dp2_tp2_zero1"):
        ck = tmp_path / name
        shutil.copytree(runs[name][0], ck)
        body = _manifest(ck / "step_00000002")["body"]
        del body["layouts"]
        _rewrite_manifest(ck / "step_00000002", body)
    rc, out, _ = _ckpt(capsys, "ls", str(tmp_path / "dp2"))
    assert rc == 0 and "world 2  layout not recorded" in out, out
    out_file = tmp_path / "old.safetensors"
    rc, _, err = _ckpt(capsys, "export", str(tmp_path / "dp2"), "--out", str(out_file))
    assert rc == 0, err
    assert weights_sha256(_fresh_gpt(out_file).state_dict()) == runs["dp2"][1]["weights_sha256"]
    rc, _, err = _ckpt(capsys, "export", str(tmp_path / "dp2_tp2_zero1"), "--out", str(tmp_path / "no.safetensors"))
    assert rc == 1 and "without layouts" in err and "resume it with a current trainlib" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "no.safetensors").exists()


def test_bad_input_is_one_line_naming_the_value_and_the_fix(runs, tmp_path, capsys):
    ck = str(runs["dp2"][0])
    (tmp_path / "empty").mkdir()
    cases = [
        (["ls", str(tmp_path / "nope")], [str(tmp_path / "nope"), "does not exist", "--checkpoint.dir"]),
        (["verify", str(tmp_path / "empty")], [str(tmp_path / "empty"), "no checkpoint", "--checkpoint.dir"]),
        (["verify", ck, "--step", "7"], ["step 7", "available steps: 2"]),
        (["export", ck, "--step", "7", "--out", str(tmp_path / "m.safetensors")], ["step 7", "available steps: 2"]),
        (["export", ck, "--out", str(tmp_path / "missing" / "m.safetensors")],
         [str(tmp_path / "missing"), "does not exist", "create it"]),
        (["export", ck, "--out", str(tmp_path)], [str(tmp_path), "is a directory", "model.safetensors"]),
    ]
    for argv, words in cases:
        rc, out, err = _ckpt(capsys, *argv)
        assert rc == 1 and out == "", argv
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"trainlib ckpt {argv[0]}: error: "), err
        assert all(w in err for w in words), (argv, err)


def _moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"moto server did not start on port {port} (exit {proc.poll()})")
            time.sleep(0.1)


def test_s3_checkpoint_ls_verify_export(runs, tmp_path, capsys, monkeypatch):
    """The same commands on an s3:// prefix, against a real S3-compatible server on loopback
    (moto's standalone server): the objects are the tp run's files, as an S3 save lays them out."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "TRAINLIB_NO_PROGRESS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proc = _moto(port)
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"])
        client.create_bucket(Bucket="ckpt")
        local = runs["dp2_tp2_zero1"][0]
        for f in sorted((local / "step_00000002").iterdir()):
            client.put_object(Bucket="ckpt", Key=f"run/step_00000002/{f.name}", Body=f.read_bytes())
        client.put_object(Bucket="ckpt", Key="run/latest", Body=(local / "latest").read_bytes())
        url = "s3://ckpt/run"

        rc, out, err = _ckpt(capsys, "ls", url, "--verify")
        assert rc == 0, err
        assert "latest  world 4  pp1 dp2 tp2 shard=optimizer" in out and out.rstrip().endswith("verified"), out
        rc, out, _ = _ckpt(capsys, "verify", url)
        assert rc == 0 and out == "step 2: intact\n"
        rc, _, err = _ckpt(capsys, "export", url, "--out", str(tmp_path / "s3.safetensors"))
        assert rc == 0, err
        rc, _, err = _ckpt(capsys, "export", str(local), "--out", str(tmp_path / "disk.safetensors"))
        assert rc == 0, err
        assert (tmp_path / "s3.safetensors").read_bytes() == (tmp_path / "disk.safetensors").read_bytes()

        data = bytearray((local / "step_00000002" / "rank1.safetensors").read_bytes())
        data[-1] ^= 0x80
        client.put_object(Bucket="ckpt", Key="run/step_00000002/rank1.safetensors", Body=bytes(data))
        client.delete_object(Bucket="ckpt", Key="run/step_00000002/rank2.json")
        rc, out, _ = _ckpt(capsys, "verify", url)
        bad = sorted(line.strip() for line in out.splitlines()[1:])
        assert rc == 1 and len(bad) == 2, out
        assert bad[0].startswith("rank1.safetensors: sha256 ") and bad[0].endswith("(corrupted)"), out
        assert bad[1].startswith("rank2.json: unreadable"), out
        rc, _, err = _ckpt(capsys, "ls", "s3://ckpt/nothing-here")
        assert rc == 1 and "no checkpoint under 's3://ckpt/nothing-here'" in err, err
    finally:
        proc.terminate()
        proc.wait(10)
