"""`trainlib launch [--nproc-per-node N] [--dry-run] [--] CMD ...`: the container entrypoint.

    trainlib launch -- trainlib train --train.steps 100
    trainlib launch --dry-run -- trainlib train      # the plan as JSON; nothing starts
    mpiexec -n 2 trainlib launch -- trainlib train

It works out where it runs (trainlib.launchers.detect), what the node has (devices), the
environment profile and the torchrun arguments (plan), prints what it decided on stderr, then:
torchrun mode runs torchrun's elastic agent in this process (`torch.distributed.run`, exactly what
the `torchrun` script does) so the workers' exit codes can be read; mpi-rank mode runs CMD as one
rank; mpirun mode (MPIJob launcher pod) execs mpirun; exec mode (torchrun child, MPIJob worker)
execs CMD unchanged.

A CMD of `trainlib train ...` is checked for the world size of the plan before torchrun starts
(trainlib.validate): a bad value exits 1 with one line, and a value that can only fail in a rank
is reported once, by the first failing rank, as the last line.

Exit codes (Kubeflow ExitCode restart policy): 1 for a configuration error, a missing command or
a failing training script (permanent), 138 (or the worker's own code >= 128) for infrastructure
failures such as a rendezvous timeout, a lost peer or a worker killed by a signal (retryable).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

from trainlib.launchers.errors import (EXIT_CONFIG, EXIT_RETRY, LaunchConfigError, LaunchInfraError,
                                       classify_worker_exit)
from trainlib.launchers.plan import LaunchPlan, build_plan
from trainlib.rank_errors import ERROR_DIR_ENV, VALIDATED_ENV, first_error
from trainlib.runtime import resolve_timeout_s


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors are configuration errors: exit 1, not argparse's 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="trainlib launch", description=__doc__.split("\n\n")[0],
                usage="trainlib launch [--nproc-per-node N] [--dry-run] [--quiet] [--] CMD ...",
                epilog="e.g. trainlib launch -- trainlib train --train.steps 100 (the images' default CMD)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: from the pod)")
    p.add_argument("--dry-run", action="store_true", help="print the plan as JSON and exit")
    p.add_argument("--quiet", action="store_true", help="do not print the explanation")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run, e.g. trainlib train")
    return p


def parse_argv(argv: list[str]) -> argparse.Namespace:
    """Flags, then CMD. No CMD is a usage error: starting a default job nobody asked for looked,
    to a user trying the command, like a hang (minutes of training with no prompt back)."""
    p = parser()
    args = p.parse_args(argv)
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if not args.cmd:
        p.error("no command to launch; e.g. trainlib launch -- trainlib train")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        p.error(f"--nproc-per-node={args.nproc_per_node} must be >= 1")
    return args


def train_args(cmd: list[str]) -> list[str] | None:
    """The arguments of a `trainlib train` command (`trainlib train ...`, `[python] -m trainlib.cli train
    ...`), else None."""
    c = list(cmd)
    if c and os.path.basename(c[0]).startswith("python"):
        c = c[1:]
    if c[:2] == ["-m", "trainlib.cli"]:
        c = ["trainlib", *c[2:]]
    if c[:1] and os.path.basename(c[0]) == "trainlib" and c[1:2] == ["train"]:
        return c[2:]
    return None


def preflight(plan: LaunchPlan) -> bool:
    """Check a `trainlib train` job before torchrun starts it, for the plan's world size; the ranks
    then skip the same checks (TRAINLIB_VALIDATED) and report a failure once (TRAINLIB_ERROR_DIR)."""
    argv = train_args(plan.cmd)
    if argv is None or plan.mode != "torchrun" or not plan.placement.nnodes.isdigit():
        return False  # not our trainer, or an elastic world whose size is not known yet: the ranks check
    from trainlib.runtime import LaunchError
    from trainlib.trainer import preflight as check_train

    nodes = int(plan.placement.nnodes)
    try:
        # names of parameter servers are not looked up: in a pod they may not exist yet
        warnings = check_train(argv, nodes * plan.nproc_per_node, nodes, plan.env, resolve=False)
    except (ValueError, LaunchError) as e:  # ConfigError, MeshError, TokenError are ValueErrors
        raise LaunchConfigError(str(e)) from None
    _say([f"warning: {w}" for w in warnings])
    return True


def _say(lines: list[str]) -> None:
    for line in lines:
        print(f"trainlib launch: {line}", file=sys.stderr, flush=True)


def run_torchrun(plan: LaunchPlan) -> int:
    """torchrun's elastic agent, in-process, with the plan's environment; returns our exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    os.environ.clear()
    os.environ.update(plan.env)
    _bound_exit_barrier(resolve_timeout_s(env=plan.env))
    try:
        run(parse_args(plan.torchrun_argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = classify_worker_exit(failure.exitcode)
        _say([f"worker rank {rank} failed with exit code {failure.exitcode}; exiting {code} "
              f"({'retryable' if code >= 128 else 'permanent'})"])
        return code
    except (RendezvousError, TimeoutError, ConnectionError) as e:
        raise LaunchInfraError(f"rendezvous failed: {type(e).__name__}: {e}") from e
    except Exception as e:
        if type(e).__name__ in ("SignalException", "DistNetworkError", "DistStoreError"):
            raise LaunchInfraError(f"{type(e).__name__}: {e}") from e
        raise
    return 0


def _bound_exit_barrier(timeout_s: float) -> None:
    """torchrun's agent waits 300 s (not configurable from its CLI) at exit for every other node's
    agent; when a node has died that is minutes of a finished pod doing nothing. Wait as long as
    any other distributed wait in trainlib instead."""
    import torch.distributed.launcher.api as api

    base = api.LocalElasticAgent
    if getattr(base, "_trainlib_bounded", False):
        return

    class BoundedExitAgent(base):
        _trainlib_bounded = True

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("exit_barrier_timeout", timeout_s)
            super().__init__(*args, **kwargs)

    api.LocalElasticAgent = BoundedExitAgent


def as_program(cmd: list[str]) -> list[str]:
    """What torchrun would run for CMD: a .py file or `-m module` under this Python, else the executable."""
    if cmd and cmd[0] in ("-m", "--module"):
        return [sys.executable, "-m", *cmd[1:]]
    if cmd and cmd[0].endswith(".py"):
        return [sys.executable, *cmd]
    return list(cmd)


def run_child(cmd: list[str], env: dict[str, str]) -> int:
    """Run CMD as a child (so MPI can be finalised after it), forwarding SIGTERM/SIGINT."""
    cmd = as_program(cmd)
    try:
        proc = subprocess.Popen(cmd, env=env)
    except (FileNotFoundError, PermissionError):
        raise LaunchConfigError(f"command not found: {cmd[0]!r}; is it installed in the image and on PATH?") from None
    def forward(sig: int, _frame) -> None:
        proc.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return classify_worker_exit(proc.wait())
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def exec_cmd(cmd: list[str], env: dict[str, str]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    cmd = as_program(cmd)
    try:
        os.execvpe(cmd[0], cmd, env)
    except (FileNotFoundError, PermissionError):
        raise LaunchConfigError(f"command not found: {cmd[0]!r}; is it installed in the image and on PATH?") from None
    return EXIT_CONFIG  # not reached


def execute(plan: LaunchPlan) -> int:
    if plan.mode == "torchrun":
        return run_torchrun(plan)
    if plan.mode == "exec":
        return exec_cmd(plan.cmd, plan.env)
    if plan.mode == "mpi-rank":
        from trainlib.launchers.mpi import rank_env

        env, _ = rank_env(plan.env)
        return run_child(plan.cmd, env)
    if plan.mode == "mpirun":
        from trainlib.launchers.mpi import mpirun_argv

        hostfile = plan.placement.hostfile
        try:
            text = open(hostfile).read()
        except OSError as e:
            raise LaunchConfigError(f"cannot read the MPI hostfile {hostfile}: {e}; is the MPIJob's config volume mounted?") from None
        # Open MPI passes only what -x names; MPICH/Intel hydra pass the whole environment
        names = [k for k in ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH") if k in plan.env]
        names += sorted(k for k in plan.env if k.startswith(("TRAINLIB_", "NCCL_", "FI_", "NEURON_")))
        argv = mpirun_argv(hostfile, text, plan.cmd, names, open_mpi="OMPI_MCA_orte_default_hostfile" in plan.env)
        _say(["mpirun: " + " ".join(argv)])
        return exec_cmd(argv, plan.env)
    raise AssertionError(plan.mode)


def main(argv: list[str] | None = None) -> int:
    args = parse_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        plan = build_plan(args.cmd, nproc_override=args.nproc_per_node)
        validated = preflight(plan)
        if args.dry_run:
            print(json.dumps(plan.as_dict(), indent=2))
            return 0
        if not args.quiet:
            _say(plan.explain())
        if plan.mode != "torchrun":
            return execute(plan)
        with tempfile.TemporaryDirectory(prefix="trainlib-launch-") as errors:
            plan.env[ERROR_DIR_ENV] = errors
            if validated:
                plan.env[VALIDATED_ENV] = "1"
            code = execute(plan)
            line = first_error(errors) if code else None
            if line:
                _say([f"first failure: {line}"])
            return code
    except LaunchConfigError as e:
        _say([f"error: {e}"])
        return EXIT_CONFIG
    except LaunchInfraError as e:
        _say([f"retryable failure: {e}"])
        return EXIT_RETRY


if __name__ == "__main__":
    sys.exit(main())
