"""A sharded checkpoint's manifest records where every slice sits (global shape, tp slice, dp
range, full-model name): `checkpoint.layout.assemble` puts the whole model back together from the
rank files alone, equal to what the unsharded run of the same layout saved, and to the model's names.

The trainer on 4 real gloo ranks (dp2 x tp2 with ZeRO-3, dp2 x pp2 with ZeRO-1), each beside its
unsharded twin: all four runs in one spawned group (`saved`), as a `trainlib train` job of 4 ranks costs
~25 s of CPU in imports and torchrun for a 3-step run. The resume test below is real `trainlib train`
jobs where it checks the launcher's pre-launch check (the first run, which only leaves the checkpoint to
resume, is the same trainer on 2 gloo ranks: ~13 s of CPU less)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainlib.checkpoint import layout, step_dir
from trainlib.models.gpt import GPT, GPTConfig
from trainlib.testing import run_ranks
from tests.trainer_ranks import train_each, train_one

pytestmark = pytest.mark.timeout(300)

MODEL = ["--model.n_layer", "2", "--model.d_model", "32", "--model.n_head", "2", "--model.seq_len", "16"]
ARGS = [*MODEL, "--train.batch_size", "8", "--train.corpus_bytes", "65536", "--train.steps", "3",
        "--train.log_every", "3", "--checkpoint.every", "3"]
CASES = {"tp2_zero3": ["--mesh.tp", "2", "--dp.shard", "parameters", "--train.precision", "bf16"],
         "pp2_zero1": ["--mesh.pp", "2", "--dp.shard", "optimizer"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case's sharded run and its unsharded twin, saved under ROOT/CASE/{sharded,plain}."""
    root = tmp_path_factory.mktemp("zero_ckpt")
    argvs = []
    for case, extra in CASES.items():
        unsharded = [a for a in extra if a not in ("--dp.shard", "parameters", "optimizer", "--train.precision")]
        unsharded = [a for a in unsharded if a != "bf16"]
        for name, flags in (("sharded", extra), ("plain", unsharded)):
            argvs.append([*ARGS, *flags, "--checkpoint.dir", str(root / case / name),
                          "--train.metrics", str(root / case / f"{name}.jsonl")])
    run_ranks(train_each, 4, argvs, env={"TRAINLIB_NO_PROGRESS": "1"}, timeout_s=240)
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_checkpoint_reassembles_to_the_unsharded_one(saved, case):
    extra = CASES[case]
    tmp_path = saved / case
    names = {n for n, _ in GPT(GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=32)).named_parameters()}
    sharded = layout.assemble(step_dir(tmp_path / "sharded", 3), what="master")
    plain = layout.assemble(step_dir(tmp_path / "plain", 3))
    assert set(sharded) == set(plain) == names
    bf16 = "bf16" in extra
    computed = layout.assemble(step_dir(tmp_path / "sharded", 3), what="params") if bf16 else None
    for k in names:
        assert sharded[k].shape == plain[k].shape, k
        if bf16:  # the bf16 weights are exactly the fp32 masters rounded; those track the fp32 run
            assert (computed[k] == sharded[k].bfloat16().float()).all(), k
            assert (sharded[k] - plain[k]).abs().max().item() <= 2e-2, k
        else:
            assert (sharded[k] - plain[k]).abs().max().item() <= 1e-6, k
    assert any((plain[k] != 0).any() for k in names)


def test_sharded_checkpoint_resumes_by_itself_and_refuses_another_stage(tmp_path):
    """`trainlib train` with the flags of a sharded run resumes it (the pre-launch check reads the
    manifest's layout, not the slices' shapes); another --dp.shard is refused before any rank starts."""
    small = [*MODEL, "--train.batch_size", "4", "--train.corpus_bytes", "65536", "--checkpoint.every", "3",
             "--checkpoint.dir", str(tmp_path / "ck"), "--train.metrics", str(tmp_path / "m.jsonl")]
    env = {**os.environ, "TRAINLIB_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}

    def train(*extra):
        return subprocess.run([sys.executable, "-m", "trainlib.cli", "train", *small, *extra], env=env,
                              capture_output=True, text=True, timeout=240)

    # the run to resume: `trainlib train` of these flags runs this on its 2 local ranks
    first = run_ranks(train_one, 2, [*small, "--train.steps", "3", "--dp.shard", "gradients"],
                      env={"TRAINLIB_NO_PROGRESS": "1"}, timeout_s=120)
    assert [s["steps"] for s in first] == [3, 3] and step_dir(tmp_path / "ck", 3).is_dir()
    again = train("--train.steps", "6", "--dp.shard", "gradients")
    assert again.returncode == 0, again.stderr[-3000:]
    assert '"resumed_from": 3' in again.stdout
    other = train("--train.steps", "9", "--dp.shard", "parameters")

    assert other.returncode == 0, other.stderr[-3000:]
    assert "resuming step 6 saved as (pp=1, dp=2, tp=1, shard=gradients) as (pp=1, dp=2, tp=1, shard=parameters)" in other.stderr
