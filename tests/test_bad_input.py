"""Every invalid config, mesh or environment: `trainlib train` exits 1 with a message that names
the value and the fix. Each case is the real CLI entry point in its own process (forked from a
server that has torch imported, so a case costs ~0.1 s instead of a torch import), and the
process's exit code is what is checked.
"""
from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.timeout(180)

SINGLE = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # run as one rank: no torchrun

# (case, argv, extra env, substrings the error must contain: the value and the fix)
CASES = [
    ("steps zero", ["--train.steps", "0"], {}, ["train.steps=0", "must be > 0"]),
    ("steps not int", ["--train.steps=ten"], {}, ["train.steps='ten'", "not a valid int"]),
    ("heads", ["--model.d_model", "130"], {}, ["model.d_model=130", "not divisible by model.n_head=4"]),
    ("vocab", ["--model.vocab_size", "100"], {}, ["model.vocab_size=100", "256"]),
    ("sync kind", ["--sync.kind", "nccl2"], {}, ["sync.kind='nccl2'", "allreduce"]),
    ("unknown section", ["--optim.lr", "1"], {}, ["unknown config section 'optim'", "train"]),
    ("unknown key", ["--train.learning_rate", "1"], {}, ["unknown key train.learning_rate", "lr"]),
    ("bare arg", ["steps=3"], {}, ["unexpected argument 'steps=3'", "--section.key=value"]),
    ("missing value", ["--train.steps"], {}, ["--train.steps needs a value", "--train.steps=VALUE"]),
    ("config file", ["--config", "/nonexistent/run.toml"], {}, ["'/nonexistent/run.toml' does not exist"]),
    ("bad toml", ["--config", "{bad_toml}"], {}, ["is not valid TOML"]),
    ("nonfinite", ["--train.nonfinite", "ignore"], {}, ["train.nonfinite='ignore'", "skip, raise"]),
    ("ckpt every", ["--checkpoint.every", "0"], {}, ["checkpoint.every=0", "must be > 0"]),
    ("ckpt keep", ["--checkpoint.keep", "-1"], {}, ["checkpoint.keep=-1", "must be > 0"]),
    ("ckpt dir is file", ["--checkpoint.dir", "{a_file}"], {}, ["exists and is not a directory", "directory"]),
    ("nproc", ["--nproc-per-node", "0"], {}, ["--nproc-per-node=0", ">= 1"]),
    ("max restarts", ["--max-restarts", "-1"], {}, ["--max-restarts=-1", ">= 0"]),
    ("mesh product", ["--nproc-per-node", "3", "--mesh.dp", "2"], {}, ["dp(2)", "world_size 3", "dp=-1"]),
    ("mesh divisor", ["--nproc-per-node", "2", "--mesh.tp", "3"], {}, ["tp(3)", "not divisible by 3"]),
    ("env rank", [], {"RANK": "one", "WORLD_SIZE": "2"}, ["RANK='one' is not an integer"]),
    ("env master", [], {"RANK": "1", "WORLD_SIZE": "2"}, ["MASTER_ADDR", "torchrun"]),
    ("env rank range", [], {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     ["rank 2 is outside world_size 2"]),
    ("env backend", [], {**SINGLE, "TRAINLIB_BACKEND": "nccl3"}, ["unknown backend 'nccl3'", "TRAINLIB_BACKEND"]),
    ("env nccl on cpu", [], {**SINGLE, "TRAINLIB_BACKEND": "nccl", "TRAINLIB_DEVICE": "cpu"},
     ["backend nccl needs a CUDA device", "gloo"]),
    ("env timeout", [], {**SINGLE, "TRAINLIB_TIMEOUT_S": "soon"}, ["TRAINLIB_TIMEOUT_S='soon'", "unset it"]),
    ("env timeout sign", [], {**SINGLE, "TRAINLIB_TIMEOUT_S": "-5"}, ["timeout_s=-5.0 must be positive"]),
    ("env fault spec", ["--train.steps", "2"], {**SINGLE, "TRAINLIB_FAULT_KILL_AT_STEP": "soon"},
     ["TRAINLIB_FAULT_KILL_AT_STEP='soon'", "RANK:STEP[:PHASE]"]),
]


def _cli_case(argv: list[str], env: dict[str, str], err_path: str) -> None:
    """One case in a fresh process (forked from a server that already imported torch): the CLI's
    stderr goes to err_path and its return code becomes the process's exit code."""
    for k in [k for k in os.environ if k.startswith(("TRAINLIB_", "TORCHELASTIC_")) or k in _LAUNCH_VARS]:
        del os.environ[k]
    os.environ.update(env)
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    try:
        from trainlib import cli

        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 99
    sys.stderr.flush()
    os._exit(rc)


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_bad_input_table(tmp_path):
    from trainlib.testing import _context

    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[train\nsteps = 3\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    subs = {"{bad_toml}": str(bad_toml), "{a_file}": str(a_file)}
    small = ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.seq_len", "16",
             "--train.batch_size", "2", "--train.corpus_bytes", "8192", "--train.metrics", str(tmp_path / "m.jsonl")]
    ctx = _context()
    problems = []
    for i, (name, argv, env, needles) in enumerate(CASES):
        argv = ["train", *(small if name.startswith("env") else []), *[subs.get(a, a) for a in argv]]
        err_path = tmp_path / f"case{i}.err"
        p = ctx.Process(target=_cli_case, args=(argv, {"TRAINLIB_NO_PROGRESS": "1", **env}, str(err_path)))
        p.start()
        p.join(60)
        if p.is_alive():
            p.kill()
            p.join()
            problems.append(f"{name}: still running after 60 s")
            continue
        err = err_path.read_text()
        last = err.strip().splitlines()[-1] if err.strip() else ""
        if p.exitcode != 1 or not all(n in err for n in needles):
            problems.append(f"{name}: exit {p.exitcode}, wanted 1 and {needles}; last stderr line: {last!r}")
        elif "Traceback" in err:
            problems.append(f"{name}: a traceback instead of a one-line error: {last!r}")
    assert not problems, "\n".join(problems)
