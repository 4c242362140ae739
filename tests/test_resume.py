"""A worker SIGKILLed at a random step (or inside a checkpoint write) and restarted by torchrun
ends with the same weights_sha256 as an uninterrupted run; and `trainlib train` resumes by itself.

Real `trainlib train` processes, real torchrun (--max-restarts), real SIGKILL (the fault hook
TRAINLIB_FAULT_KILL_AT_STEP makes the chosen rank kill itself, so the step is reproducible).
The runs are independent, so every killed run of the module starts in the background when the first
test asks for them (`killed`), PARALLEL at a time, and each test waits for its own: a `trainlib train`
job costs ~13 s of CPU in imports and torchrun for a 0.2 s run, and one job alone leaves a core idle
while its agent imports and its workers start and stop. The uninterrupted references are the same
trainer on 2 real gloo ranks, all layouts in one spawned group (`refs`), computed meanwhile.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from trainlib.testing import run_ranks
from tests.trainer_ranks import train_each

pytestmark = pytest.mark.timeout(300)

STEPS, EVERY = 12, 4
TINY = ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.seq_len", "16",
        "--train.batch_size", "4", "--train.corpus_bytes", "65536", "--train.steps", str(STEPS),
        "--train.log_every", "4", "--train.warmup_steps", "3"]


def _start(tmp_path, name: str, seed: int, extra: list[str], fault: str | None = None):
    env = {**os.environ, "TRAINLIB_NO_PROGRESS": "1", "TRAINLIB_TIMEOUT_S": "30", "OMP_NUM_THREADS": "1"}
    env.pop("TRAINLIB_FAULT_KILL_AT_STEP", None)
    if fault:
        env["TRAINLIB_FAULT_KILL_AT_STEP"] = fault
    cmd = [sys.executable, "-m", "trainlib.cli", "train", *TINY, "--train.seed", str(seed),
           "--train.metrics", str(tmp_path / f"{name}.jsonl"), *extra]
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)


def _finish(tmp_path, name: str, proc) -> tuple[int, dict | None, str]:
    out, _ = proc.communicate(timeout=240)
    err = (tmp_path / f"{name}.log").read_text()
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), err


def _ck(tmp_path, name: str, restarts: int = 1) -> list[str]:
    return ["--checkpoint.dir", str(tmp_path / name), "--checkpoint.every", str(EVERY), "--max-restarts", str(restarts)]


LAYOUTS = {"plain": [], "pp2": ["--mesh.pp", "2"], "tp2": ["--mesh.tp", "2"], "ps_sync": ["--sync.kind", "ps"]}
SHARDED = [["--dp.shard", "optimizer"], ["--dp.shard", "gradients", "--train.precision", "bf16"],
           ["--dp.shard", "parameters", "--checkpoint.async", "true"]]


def _sharded_name(layout: list[str]) -> str:
    return "_".join(a.strip("-").replace(".", "") for a in layout)


# killed runs at once: the most this file ran side by side before the shared pool (3 jobs = 9 processes)
PARALLEL = 3

# test_killed_worker_resumes_bit_identically's faults
_pick = random.Random(2026)
_R1, _S1 = _pick.randrange(2), _pick.randrange(EVERY + 1, 2 * EVERY)       # between two checkpoints
_R2 = _pick.randrange(2)
_R3, _S3 = _pick.randrange(2), _pick.randrange(2 * EVERY + 1, STEPS)
# (name, fault spec, checkpoint step the restarted job must resume from)
WORKER_TRIALS = [("between_ckpts", f"{_R1}:{_S1}", EVERY),
                 ("in_save", f"{_R2}:{2 * EVERY}:save:shard", EVERY)]     # dies while writing step 8's checkpoint


def _shard_fault(name: str) -> tuple[int, int]:
    """(rank, step) test_killed_shard_resumes_bit_identically kills in layout `name`."""
    return random.Random(len(" ".join(LAYOUTS[name]))).randrange(2), EVERY + 1 + EVERY // 2


def _sharded_fault(i: int) -> tuple[int, int]:
    """(rank, step) test_killed_sharded_run_resumes_bit_identically kills in SHARDED[i]."""
    return i % 2, EVERY + 1 + i % (EVERY - 1)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Job name -> Future of _finish's (returncode, summary, stderr) for every killed run of this module,
    started in the background, PARALLEL at a time (the longest first). "self_1"/"self_2" are one chain:
    the second command starts once the first one is gone."""
    tmp = tmp_path_factory.mktemp("killed")
    procs: list[subprocess.Popen] = []
    stopping = False

    def run(name: str, extra: list[str], fault: str | None = None):
        if stopping:
            raise RuntimeError("the module's tests are over")
        proc = _start(tmp, name, 0, extra, fault)
        procs.append(proc)
        if stopping:  # the teardown's kill may have run before this start
            proc.kill()
        return _finish(tmp, name, proc)

    def self_chain():
        first = run("self_1", _ck(tmp, "self", restarts=0), f"{_R3}:{_S3}")
        return first, run("self_2", _ck(tmp, "self", restarts=0))

    pool = ThreadPoolExecutor(PARALLEL)
    futures: dict[str, Future] = {}
    chain = pool.submit(self_chain)
    futures["self_1"] = Future()
    futures["self_2"] = Future()

    def split(f: Future) -> None:
        try:
            first, second = f.result()
        except BaseException as e:  # noqa: BLE001 - both tests see the chain's failure
            futures["self_1"].set_exception(e)
            futures["self_2"].set_exception(e)
        else:
            futures["self_1"].set_result(first)
            futures["self_2"].set_result(second)

    chain.add_done_callback(split)
    for name, fault, _ in WORKER_TRIALS:
        futures[name] = pool.submit(run, name, _ck(tmp, name), fault)
    for name in ("pp2", "tp2", "ps_sync"):
        rank, step = _shard_fault(name)
        futures[f"shard_{name}"] = pool.submit(run, f"shard_{name}", [*LAYOUTS[name], *_ck(tmp, f"shard_{name}")],
                                               f"{rank}:{step}")
    for i, layout in enumerate(SHARDED):
        name = _sharded_name(layout)
        rank, step = _sharded_fault(i)
        futures[f"{name}_killed"] = pool.submit(run, f"{name}_killed", [*layout, *_ck(tmp, name)], f"{rank}:{step}")
    try:
        yield futures
    finally:
        stopping = True
        for f in futures.values():
            f.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict[str, dict]:
    """Layout name -> rank 0's summary of the uninterrupted run (TINY, seed 0): the weights every
    killed run of that layout must end on, bit for bit."""
    tmp = tmp_path_factory.mktemp("refs")
    layouts = {**LAYOUTS, **{_sharded_name(layout): layout for layout in SHARDED}}
    argvs = [[*TINY, "--train.seed", "0", "--train.metrics", str(tmp / f"{name}.jsonl"), *layout]
             for name, layout in layouts.items()]
    summaries = run_ranks(train_each, 2, argvs, env={"TRAINLIB_NO_PROGRESS": "1", "TRAINLIB_TIMEOUT_S": "30"},
                          timeout_s=240)[0]
    return dict(zip(layouts, summaries))


def test_killed_worker_resumes_bit_identically(killed, refs):
    # resumes by itself: the first run dies with no restarts left, the same command again picks it up
    # (started as soon as the first one is gone, beside the other runs)
    trials = WORKER_TRIALS
    done = {name: killed[name].result() for name in ("self_1", "self_2", *(t[0] for t in trials))}

    ref = refs["plain"]
    for name, fault, resumed in trials:
        rc, summary, err = done[name]
        assert rc == 0, f"{name} ({fault}) failed:\n{err[-3000:]}"
        assert f"fault injection: rank {fault.split(':')[0]} kills itself" in err, name
        assert summary["resumed_from"] == resumed, (name, summary)  # resumed, not re-run from scratch
        assert summary["weights_sha256"] == ref["weights_sha256"], f"{name} ({fault}) diverged from the uninterrupted run"
        assert summary["loss_last"] == ref["loss_last"], name

    rc, summary, err = done["self_1"]
    assert rc != 0 and summary is None and "kills itself" in err
    rc, summary, err = done["self_2"]
    assert rc == 0, err[-3000:]
    assert summary["resumed_from"] == 2 * EVERY and summary["weights_sha256"] == ref["weights_sha256"]



@pytest.mark.parametrize("name", ["pp2", "tp2", "ps_sync"])
def test_killed_shard_resumes_bit_identically(killed, refs, name):
    # pipeline stages and tensor-parallel slices are per-rank shards of the checkpoint; with the
    # parameter server, torchrun's restart also restarts the colocated server (sync mode keeps no
    # state across steps). Each killed run must still end on the uninterrupted run's weights.
    rank, _ = _shard_fault(name)
    rc, summary, err = killed[f"shard_{name}"].result()
    assert rc == 0, err[-3000:]
    assert f"fault injection: rank {rank} kills itself" in err
    assert summary["resumed_from"] == EVERY
    assert summary["weights_sha256"] == refs[name]["weights_sha256"]
    assert summary["loss_last"] == refs[name]["loss_last"]

def _train_rank(argv: list[str], main: bool):
    from trainlib import trainer
    from trainlib.config import load_config

    return trainer.main(argv) if main else trainer.train(load_config(None, argv))


def test_nonfinite_gradients_skip_or_raise(tmp_path):
    # lr 1e30: step 1 blows the weights up, every later gradient is nan. With `skip` the final
    # weights are the ones after step 1 (the reference: that step's checkpoint); with `raise`
    # the job exits 1 naming the step and the fix.
    argv = [*TINY, "--train.lr", "1e30", "--train.warmup_steps", "0", "--train.metrics", str(tmp_path / "m.jsonl")]
    env = {"TRAINLIB_NO_PROGRESS": "1", "TRAINLIB_TIMEOUT_S": "30"}
    ck = ["--checkpoint.dir", str(tmp_path / "ck"), "--checkpoint.every", "1", "--checkpoint.keep", str(STEPS)]
    skip = run_ranks(_train_rank, 2, argv + ck, False, env=env, timeout_s=90)
    assert [s["nonfinite_skipped"] for s in skip] == [STEPS - 1] * 2
    after_step1 = load_file(str(tmp_path / "ck" / "step_00000001" / "rank0.safetensors"))
    final = load_file(str(tmp_path / "ck" / f"step_{STEPS:08d}" / "rank0.safetensors"))
    weights = [k for k in after_step1 if k.startswith("state/model/")]
    assert weights and all(torch.equal(after_step1[k], final[k]) for k in weights)
    assert all(torch.isfinite(final[k]).all() for k in weights)
    assert run_ranks(_train_rank, 2, argv + ["--train.nonfinite", "raise"], True, env=env, timeout_s=90) == [1, 1]


def test_killed_sharded_run_resumes_bit_identically(killed, refs):
    """Each ZeRO stage (and stage 3 in bf16) saves this rank's slices, fp32 masters and optimizer
    state; a rank killed between checkpoints resumes on the uninterrupted run's weights (`refs`).
    The killed runs are started with the module's others (`killed`), to fit the 2-core time budget."""
    for i, layout in enumerate(SHARDED):
        name = _sharded_name(layout)
        rank, _ = _sharded_fault(i)
        ref_summary = refs[name]
        rc, summary, err = killed[f"{name}_killed"].result()
        assert rc == 0, err[-3000:]
        assert f"fault injection: rank {rank} kills itself" in err, name
        # an async save may still be in flight when the kill lands: then the older checkpoint is the one
        assert summary["resumed_from"] == EVERY or ("--checkpoint.async" in layout and summary["resumed_from"]
                                                    in (0, None)), (name, summary)
        assert summary["weights_sha256"] == ref_summary["weights_sha256"], f"{layout}: diverged after resume"
        assert summary["loss_last"] == ref_summary["loss_last"], name
