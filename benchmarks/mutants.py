"""Mutation check: plant a fixed list of plausible bugs in the core, one at a time, and run only the
tests that should catch each; print caught / survived. Not part of CI (minutes, not seconds).

    python -m trainlib.benchmarks.mutants                 # every mutant, against HEAD
    python -m trainlib.benchmarks.mutants --list          # what would be planted, and where
    python -m trainlib.benchmarks.mutants --only pp-1f1b-extra-warmup --budget-s 300 --worktree

Each mutant is a textual patch (file, exact old text, new text). It is applied to a private copy
of the repository in a temporary directory -- `git archive` of a commit, or with --worktree the
tracked files as they are now -- never to the working tree, which other people may be editing.
The copy imports as `trainlib` ahead of the editable install (PYTHONPATH, plus links that mirror
setup.py's package_dir), which is checked before anything runs. First the targeted tests run once
unmutated (a mutant "caught" by tests that already fail would prove nothing); then per mutant:

    caught    the targeted tests failed (pytest exit 1) -- including a pytest-timeout of a hang
    survived  they passed: a bug the suite does not see
    timeout   the run exceeded the mutant's time limit (killed; reported apart from caught)
    stale     the old text is no longer in the file exactly once: the list needs updating
    error     pytest could not run them (exit 2-5)

A summary with the score goes to benchmarks/results/mutants.json (commit, command, machine).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .harness import HERE, git_state, metadata, results_dir

REPO = HERE.parent
# setup.py's package_dir: these top-level folders import as trainlib.<name>
SUBTREES = ("kernels", "launchers", "benchmarks")
TRITON_CHILD = {"TRITON_INTERPRET": "1", "TRAINLIB_TEST_TRITON_CHILD": "1", "TRAINLIB_KERNELS": ""}


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str                 # file in the repository
    old: str                  # exact text, present once
    new: str
    tests: tuple[str, ...]    # pytest arguments: files / node ids, "-k" expressions
    why: str                  # the bug it stands for
    env: dict[str, str] = field(default_factory=dict)


MUTANTS: list[Mutant] = [
    Mutant("pp-interleaved-extra-warmup", "trainlib/pipeline/schedules.py",
           "w = min(2 * (p - r - 1) + (v - 1) * p, total)", "w = min(2 * (p - r - 1) + (v - 1) * p + 1, total)",
           ("tests/test_pp.py", "-k", "peak"),
           "one warm-up forward too many: same bubble and gradients, more live activations"),
    Mutant("pp-1f1b-extra-warmup", "trainlib/pipeline/schedules.py",
           "        w = min(p - r - 1, m)\n        a = [Action(\"F\", r, i) for i in range(w)]\n"
           "        for i in range(m - w):\n            a += [Action(\"F\", r, w + i), Action(\"B\", r, i)]",
           "        w = min(p - r, m)\n        a = [Action(\"F\", r, i) for i in range(w)]\n"
           "        for i in range(m - w):\n            a += [Action(\"F\", r, w + i), Action(\"B\", r, i)]",
           ("tests/test_pp.py", "-k", "peak"), "1F1B warms up with p - r forwards instead of p - r - 1"),
    Mutant("pp-zbh1-late-weight-grads", "trainlib/pipeline/schedules.py",
           "while len(pending) > r:", "while len(pending) > r + 1:",
           ("tests/test_pp.py", "-k", "peak"), "ZB-H1 keeps one W more pending: activations held longer"),
    Mutant("ckpt-manifest-self-checksum-ignored", "trainlib/checkpoint/store.py",
           'ok = hashlib.sha256(_canonical(body)).hexdigest() == outer["sha256"]', "ok = True",
           ("tests/test_checkpoint.py", "-k", "damaged or same_length"), "the manifest's own sha256 is not checked"),
    Mutant("ckpt-rank-json-unverified", "trainlib/checkpoint/store.py",
           'meta_raw = _read_verified(path, body["files"].get(f"rank{rank}.json"), f"rank{rank}.json")',
           'meta_raw = (path / f"rank{rank}.json").read_bytes()',
           ("tests/test_checkpoint.py", "-k", "damaged or same_length"), "a rank's JSON is read without its sha256"),
    Mutant("kernels-cpu-exact-scan-fp32-only", "kernels/csrc/bucket_ops.cpp",
           ": dtype == F16 ? any_nonfinite<F16>(x, n) : any_nonfinite<BF16>(x, n);", ": true;",
           ("tests/test_kernels.py", "-k", "epilogue and cpu"),
           "an overflowed fp16/bf16 norm is taken for inf/nan without the per-element scan"),
    Mutant("kernels-triton-strict-finite-bound", "kernels/triton_kernels.py",
           "tl.where(tl.abs(v) <= FLT_MAX, 0, 1)", "tl.where(tl.abs(v) < FLT_MAX, 0, 1)",
           ("tests/test_kernels.py", "-k", "triton and epilogue"), "the largest finite float counts as non-finite",
           TRITON_CHILD),
    Mutant("dp-sum-not-average", "trainlib/data_parallel/wrapper.py",
           "k.scale_cast(b.grads, b.comm, 1.0 / self.dp)", "k.scale_cast(b.grads, b.comm, 1.0)",
           ("tests/test_data_parallel.py",), "gradients summed over dp instead of averaged (view-backed buckets)"),
    Mutant("ps-ssp-bound-off-by-one", "trainlib/sync/ps/state.py",
           "if h.step - lo > h.arg:", "if h.step - lo > h.arg + 1:",
           ("tests/test_ps_dp.py",), "async reads granted one clock beyond the staleness bound"),
    Mutant("tp-row-bias-before-reduce", "trainlib/tensor_parallel/layers.py",
           "y = F.linear(x, self.weight)  # partial sums over tp", "y = F.linear(x, self.weight, self.bias)",
           ("tests/test_tp.py",), "row-parallel bias added on every tp rank before the reduce (counted tp + 1 times)"),
    Mutant("clip-replicated-grads-counted-per-tp-rank", "trainlib/data_parallel/clip.py",
           "        total -= replicated * (1 - 1 / tp)\n", "",
           ("tests/test_compose.py", "-k", "dp2xtp2"),
           "the global grad norm counts tp-replicated parameters once per tp rank"),
    Mutant("tp-sequence-parallel-grads-unsynced", "trainlib/compose.py",
           "            sync_sequence_parallel_grads(self.local, self.mesh)", "            pass",
           ("tests/test_compose.py", "-k", "sp"),
           "LayerNorm / row-bias grads under sequence parallelism keep their partial (T/tp) sums"),
]


@dataclass
class Outcome:
    name: str
    status: str
    seconds: float
    tail: str = ""
    caught_by: str = ""  # the first failing test


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("FAILED ") or line.startswith("ERROR "):
            return line.split(" ", 1)[1].split(" - ")[0]
    return ""


def make_copy(dest: Path, rev: str | None) -> str:
    """The repository at `rev` (or the tracked files of the working tree) under dest; returns what was copied."""
    if rev is not None:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True,
                             check=True).stdout.strip()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        label = sha
    else:
        files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True,
                               check=True).stdout.decode().split("\0")
        for f in filter(None, files):
            src = REPO / f
            if src.is_file():
                (dest / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / f)
        label = "worktree"
    for sub in SUBTREES:  # trainlib.kernels etc. must resolve inside the copy, not to the editable install
        (dest / "trainlib" / sub).symlink_to(Path("..") / sub)
    return label


def copy_env(dest: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test run in the copy: the copy first on the path, its own kernel cache."""
    extra = extra or {}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" or "TRITON_INTERPRET" in extra}
    env.update({"PYTHONPATH": str(dest), "OMP_NUM_THREADS": "1", "TRAINLIB_KERNEL_CACHE": str(dest / ".kernel-cache"),
                **extra})
    return env


def check_imports_copy(dest: Path) -> None:
    code = "import trainlib, trainlib.kernels, trainlib.benchmarks; print(trainlib.__file__, trainlib.kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=dest, env=copy_env(dest), capture_output=True, text=True,
                         timeout=120)
    paths = out.stdout.split()
    if out.returncode or len(paths) != 2 or not all(Path(p).resolve().is_relative_to(dest.resolve()) for p in paths):
        raise SystemExit(f"mutants: the copy in {dest} does not import as trainlib ({out.stdout}{out.stderr}); "
                         "nothing was run")


def run_tests(dest: Path, tests: tuple[str, ...], env: dict[str, str], limit_s: float) -> tuple[int | None, str]:
    """(pytest exit code or None on timeout, output tail). The run gets its own process group so that
    a timeout also ends the rank processes it spawned."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(cmd, cwd=dest, env=copy_env(dest, env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(limit_s, 1))
        return proc.returncode, out[-4000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, (out or "")[-1500:]


def plant(dest: Path, m: Mutant) -> str | None:
    """Apply m in the copy; returns the original text to restore, or None when the patch is stale."""
    target = dest / m.path
    text = target.read_text()
    if text.count(m.old) != 1:
        return None
    target.write_text(text.replace(m.old, m.new))
    return text


def run_all(mutants: list[Mutant], dest: Path, budget_s: float, per_mutant_s: float) -> list[Outcome]:
    start = time.monotonic()

    def left() -> float:
        return budget_s - (time.monotonic() - start)

    # baseline: each distinct test selection must pass before any mutant is planted
    for key in dict.fromkeys((m.tests, tuple(sorted(m.env.items()))) for m in mutants):
        t0 = time.monotonic()
        rc, tail = run_tests(dest, key[0], dict(key[1]), min(per_mutant_s, left()))
        print(f"baseline {' '.join(key[0])}: exit {rc} in {time.monotonic() - t0:.0f}s", flush=True)
        if rc != 0:
            raise SystemExit(f"mutants: the unmutated tests fail or time out ({' '.join(key[0])}):\n{tail}")
    outcomes = []
    for m in mutants:
        if left() < 10:
            outcomes.append(Outcome(m.name, "not run (budget)", 0.0))
            continue
        original = plant(dest, m)
        if original is None:
            outcomes.append(Outcome(m.name, "stale", 0.0))
            continue
        t0 = time.monotonic()
        try:
            rc, tail = run_tests(dest, m.tests, m.env, min(per_mutant_s, left()))
        finally:
            (dest / m.path).write_text(original)
        status = {None: "timeout", 0: "survived", 1: "caught"}.get(rc, "error")
        outcomes.append(Outcome(m.name, status, round(time.monotonic() - t0, 1), tail, first_failure(tail)))
        by = f"  by {outcomes[-1].caught_by}" if status == "caught" else ""
        print(f"{m.name:<40} {status:<9} {outcomes[-1].seconds:6.1f}s  {' '.join(m.tests)}{by}", flush=True)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainlib.benchmarks.mutants", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    p.add_argument("--rev", default="HEAD", help="commit to copy (default HEAD)")
    p.add_argument("--worktree", action="store_true", help="copy the working tree's tracked files instead of --rev")
    p.add_argument("--budget-s", type=float, default=1800, help="stop planting after this many seconds (default 1800)")
    p.add_argument("--per-mutant-s", type=float, default=300, help="time limit of one test run (default 300)")
    p.add_argument("--json", help="where to write the summary (default benchmarks/results/mutants.json)")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        p.error(f"unknown mutant(s) {sorted(unknown)}; --list shows them")
    if args.list:
        for m in chosen:
            print(f"{m.name:<40} {m.path:<36} {m.why}")
        return 0
    t0 = time.monotonic()
    state = git_state()  # for --worktree: the commit and the edits on top of it that were copied
    with tempfile.TemporaryDirectory(prefix="trainlib-mutants-") as tmp:
        dest = Path(tmp)
        copied = make_copy(dest, None if args.worktree else args.rev)
        check_imports_copy(dest)
        print(f"mutants: {len(chosen)} against {copied} in {dest} (budget {args.budget_s:.0f}s)", flush=True)
        outcomes = run_all(chosen, dest, args.budget_s, args.per_mutant_s)
    ran = [o for o in outcomes if o.status in ("caught", "survived", "timeout")]
    caught = [o for o in ran if o.status == "caught"]
    score = f"{len(caught)} of {len(ran)} caught"
    print(f"\nscore: {score}; survived: {[o.name for o in ran if o.status == 'survived'] or 'none'}; "
          f"other: {[(o.name, o.status) for o in outcomes if o not in ran] or 'none'}")
    command = "python -m trainlib.benchmarks.mutants " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = metadata("mutants", command.strip(), False, time.monotonic() - t0)
    # the code the mutants were planted in: the archived commit, or the working tree as copied
    meta["git"] = state if args.worktree else {"commit": copied, "modified": []}
    by_name = {m.name: m for m in MUTANTS}
    survived = [o.name for o in ran if o.status == "survived"]
    result = {"meta": meta, "summary": {"score": score, "caught": len(caught), "ran": len(ran), "survived": survived},
              "mutants": [{"name": o.name, "status": o.status, "seconds": o.seconds, "path": by_name[o.name].path,
                           "tests": " ".join(by_name[o.name].tests), "why": by_name[o.name].why,
                           **({"caught_by": o.caught_by} if o.status == "caught" else {"tail": o.tail[-1500:]})}
                          for o in outcomes]}
    path = Path(args.json) if args.json else results_dir() / "mutants.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {path}")
    return 0 if len(caught) == len(ran) else 1


if __name__ == "__main__":
    sys.exit(main())


def table_headline(s: dict) -> str:
    """This benchmark's line in `trainlib bench table` (benchmarks/README.md), from a result's summary."""
    return f"planted bugs: {s['score']} by the tests aimed at them; survived: {', '.join(s['survived']) or 'none'}"
