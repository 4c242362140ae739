"""Resume under another layout: dp 2->1, 1->2, 2->4; tp 2->1, 1->2; pp 2->1, 1->2, boundaries
moved; shard none <-> optimizer <-> parameters.

Saved runs are the trainer on real gloo ranks too (6 steps, a checkpoint at step 3; one spawned group
per world size: a `trainlib train` job costs ~13-25 s of CPU in imports and torchrun). Each resumed
run is the trainer on real gloo ranks (run_ranks, one spawned group per world size running several
layouts) from a copy of the step-3 checkpoint. Right after loading, every rank's parameters, fp32
masters and AdamW moments must equal its cut of the saved global tensors (layout.assemble) bit for
bit; then the resumed step 4 must continue the uninterrupted run's loss curve."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainlib.testing import run_ranks
from tests.trainer_ranks import train_each

pytestmark = pytest.mark.timeout(420)

MODEL = ["--model.n_layer", "2", "--model.d_model", "32", "--model.n_head", "2", "--model.seq_len", "16",
         "--train.batch_size", "8", "--train.corpus_bytes", "65536", "--train.log_every", "1",
         "--train.warmup_steps", "2", "--train.grad_clip", "0"]
SAVED = {  # name: (nproc, layout flags) of the run that saves
    "dp2": (2, []),
    "tp2dp2_zero1": (4, ["--mesh.tp", "2", "--dp.shard", "optimizer"]),
    "pp2_zero3": (2, ["--mesh.pp", "2", "--dp.shard", "parameters"]),
}
RESUMED = [  # (saved, world, layout flags): every kind of change the issue lists
    ("dp2", 1, []),                                              # dp 2 -> 1
    ("dp2", 4, []),                                              # dp 2 -> 4
    ("dp2", 2, ["--mesh.tp", "2"]),                              # tp 1 -> 2
    ("dp2", 2, ["--mesh.pp", "2"]),                              # pp 1 -> 2
    ("dp2", 2, ["--dp.shard", "parameters"]),                    # shard none -> parameters
    ("tp2dp2_zero1", 2, []),                                     # tp 2 -> 1, optimizer -> none
    ("tp2dp2_zero1", 4, ["--mesh.pp", "2", "--dp.shard", "parameters"]),   # pp 1 -> 2, tp -> 1, stage 1 -> 3
    ("pp2_zero3", 1, []),                                        # pp 2 -> 1, dp 1 -> 1, parameters -> none
    ("pp2_zero3", 2, ["--dp.shard", "optimizer"]),               # pp 2 -> 1, dp 1 -> 2, parameters -> optimizer
    ("pp2_zero3", 4, ["--mesh.pp", "4", "--dp.shard", "gradients"]),       # stage boundaries moved (4 stages)
]


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def _resume_worker(jobs: list[tuple[str, list[str], str]]) -> list[dict]:
    """Train steps 4..4 from each job's checkpoint copy; check what the restore loaded first."""
    from trainlib import trainer
    from trainlib.checkpoint import layout, reshard, resume
    from trainlib.config import load_config

    out = []
    for ck_dir, flags, metrics in jobs:
        seen = {}
        original = resume.restore

        def checked_restore(ck_cfg, model, opt, sampler, counters, original=original):
            start, counters = original(ck_cfg, model, opt, sampler, counters)
            seen["mismatch"] = _compare_with_saved(ck_cfg.dir, start, model, opt, layout, reshard)
            return start, counters

        trainer.resume.restore = checked_restore
        try:
            summary = trainer.train(load_config(None, [*MODEL, *flags, "--train.steps", "4", "--checkpoint.dir",
                                                       ck_dir, "--checkpoint.every", "100", "--train.metrics",
                                                       metrics]))
        finally:
            trainer.resume.restore = original
        out.append({"resumed_from": summary["resumed_from"], "mismatch": seen["mismatch"]})
    return out


def _compare_with_saved(ck_dir: str, step: int, model, opt, layout, reshard) -> list[str]:
    """Names whose local weights, masters or AdamW moments differ (at all) from the cut of the
    saved global tensors this rank's layout asks for."""
    from trainlib.checkpoint import step_dir

    saved = layout.assemble(step_dir(ck_dir, step), what="master")
    mine = layout.layout_of(model)
    dp = getattr(model, "dp_model", model)
    sharded = dp if getattr(dp, "sharded", False) else None
    local = dict(getattr(model, "module", model).named_parameters())
    values = sharded.param_slices("master") if sharded is not None else {k: p.detach() for k, p in local.items()}
    bad = []
    for name, e in mine["params"].items():
        if "dp" in e and e["dp"] is None:
            continue
        want = reshard._cut(saved[name], e)
        got = values[e["key"]].float().reshape(want.shape)
        if not torch.equal(got, want):
            bad.append(name)
    # the optimizer moved too: a step count on every slice, moments of the right size
    inner = getattr(opt, "inner", opt)
    steps = {float(s["step"]) for s in inner.state.values() if "step" in s}
    if steps != {float(step)}:
        bad.append(f"optimizer steps {steps} != {step}")
    return bad


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    for world in sorted({nproc for nproc, _ in SAVED.values()}):
        argvs = [[*MODEL, *flags, "--train.steps", "6", "--checkpoint.every", "3", "--checkpoint.keep", "2",
                  "--checkpoint.dir", str(root / name), "--train.metrics", str(root / f"{name}.jsonl")]
                 for name, (nproc, flags) in SAVED.items() if nproc == world]
        run_ranks(train_each, world, argvs, env={"TRAINLIB_NO_PROGRESS": "1"}, timeout_s=300)
    return root


def test_resume_under_another_layout(saved, tmp_path):
    jobs: dict[int, list] = {}
    for i, (name, world, flags) in enumerate(RESUMED):
        ck = tmp_path / f"job{i}"
        shutil.copytree(saved / name / "step_00000003", ck / "step_00000003")
        (ck / "latest").write_text("step_00000003\n")
        jobs.setdefault(world, []).append((i, (str(ck), flags, str(tmp_path / f"job{i}.jsonl"))))
    results: dict[int, dict] = {}
    for world, entries in sorted(jobs.items()):
        per_rank = run_ranks(_resume_worker, world, [job for _, job in entries], env={"TRAINLIB_NO_PROGRESS": "1"},
                             timeout_s=300)
        for k, (i, _) in enumerate(entries):
            results[i] = {"ranks": [r[k] for r in per_rank]}
    for i, (name, world, flags) in enumerate(RESUMED):
        for rank, r in enumerate(results[i]["ranks"]):
            assert r["resumed_from"] == 3, (name, flags, r)
            assert not r["mismatch"], f"{name} -> {world} ranks {flags}, rank {rank}: {r['mismatch'][:5]}"
        uninterrupted = _losses(saved / f"{name}.jsonl")[4]
        resumed = _losses(tmp_path / f"job{i}.jsonl")[4]
        # another layout sums in another order: the step-4 loss agrees to float32 rounding
        assert abs(resumed - uninterrupted) <= 1e-5, (name, world, flags, resumed, uninterrupted)


def test_a_model_change_is_refused_before_training(saved, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(saved / "dp2" / "step_00000003", ck / "step_00000003")
    (ck / "latest").write_text("step_00000003\n")
    other = [a if a != "32" else "48" for a in MODEL]   # d_model 32 -> 48
    env = {**os.environ, "TRAINLIB_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "trainlib.cli", "train", *other, "--train.steps", "4",
                          "--checkpoint.dir", str(ck)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "of another model" in out.stderr and "has shape [32] there and [48] in this run" in out.stderr, out.stderr


def test_sync_kind_change_all_reduce_to_parameter_server(saved, tmp_path):
    """The same layout under the parameter server (sync mode, colocated servers): the plain load
    path; step 4 continues the all-reduce run's curve."""
    ck = tmp_path / "ck"
    shutil.copytree(saved / "dp2" / "step_00000003", ck / "step_00000003")
    (ck / "latest").write_text("step_00000003\n")
    argv = [*MODEL, "--train.steps", "4", "--sync.kind", "ps", "--checkpoint.dir", str(ck),
            "--train.metrics", str(tmp_path / "ps.jsonl")]
    summary = run_ranks(train_each, 2, [argv], env={"TRAINLIB_NO_PROGRESS": "1"}, timeout_s=180)[0][0]
    assert summary["resumed_from"] == 3
    assert abs(_losses(tmp_path / "ps.jsonl")[4] - _losses(saved / "dp2.jsonl")[4]) <= 1e-5
