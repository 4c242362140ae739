"""`python -m trainlib.launchers.ray_main`: trainlib's default job on a Ray cluster, fault tolerant.

    python -m trainlib.launchers.ray_main --num-workers 4 --max-failures 3 --min-workers 2 \\
        --checkpoint-dir /shared/ckpt --resources-per-worker '{"CPU": 8, "GPU": 1}' --address auto \\
        -- --train.steps=1000 --mesh.tp=2

Connects to Ray (--address, else $RAY_ADDRESS, else a local instance), runs `trainlib train`'s
job on --num-workers gang-scheduled actors through trainlib.launchers.ray.run (restarting from
the latest checkpoint after a worker or node failure, up to --max-failures times) and prints rank
0's summary, plus `restarts` and `attempts`, as one JSON object on the last stdout line. This is
the command a KubeRay RayJob's entrypoint runs. Exit codes follow launchers/errors.py: 0, 1 for a
bad flag or config value, 138 when the cluster failed the run (retryable).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from trainlib.launchers.errors import EXIT_CONFIG, EXIT_RETRY, LaunchConfigError, LaunchInfraError

PROG = "python -m trainlib.launchers.ray_main"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} --num-workers N [options] -- [trainlib train flags, e.g. --train.steps=100]",
        description="Run trainlib's default job on N Ray workers (a placement group: all or none), restart it "
                    "from the latest checkpoint when a worker dies, print the summary JSON as the last line.",
        epilog="Everything after `--` is passed to the job as `trainlib train` flags (--section.key=value); "
               "see `trainlib train --help`.")
    p.add_argument("--num-workers", type=int, required=True, help="ranks to start, one Ray actor each")
    p.add_argument("--max-failures", type=int, default=0,
                   help="restarts after a worker/node failure (default 0: fail on the first)")
    p.add_argument("--min-workers", type=int, default=None,
                   help="shrink to at least this many workers when --num-workers cannot be placed "
                        "(default: --num-workers, no shrinking)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where the job checkpoints and resumes from (shared storage or s3:// on a multi-node "
                        "cluster); sets --checkpoint.dir")
    p.add_argument("--resources-per-worker", default='{"CPU": 1}',
                   help='one worker\'s Ray resources as JSON (default \'{"CPU": 1}\')')
    p.add_argument("--address", default=None,
                   help="Ray cluster address (e.g. auto or ray://head:10001); default $RAY_ADDRESS, else local")
    p.add_argument("--timeout-s", type=float, default=24 * 3600.0, help="limit for the whole run (default 1 day)")
    p.add_argument("--connect-timeout-s", type=float, default=120.0,
                   help="how long to wait for an explicit --address to accept connections (default 120 s)")
    return p


def wait_reachable(address: str | None, timeout_s: float) -> str | None:
    """For an explicit HOST:PORT or ray://HOST:PORT: None once it accepts a TCP connection within
    timeout_s, else why not. ray.init itself retries an unreachable GCS for minutes with no word;
    a pod whose head is gone should fail (retryably) and say so. `auto`/local need no check."""
    import socket

    if not address or address in ("auto", "local"):
        return None
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return None  # not HOST:PORT: let Ray parse (and reject) it
    deadline = time.monotonic() + timeout_s
    last = ""
    for _ in range(100000):  # bounded by the deadline; one attempt per second at most
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, max(timeout_s, 0.1))).close()
            return None
        except OSError as e:
            last = str(e)
        if time.monotonic() >= deadline:
            break
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return f"{address!r} accepted no connection within {timeout_s:.0f}s ({last})"


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def config_from_flags(flags: list[str]) -> dict[str, str]:
    """['--train.steps=5', '--model.n_layer', '1'] -> {'train.steps': '5', 'model.n_layer': '1'}; checked
    against trainlib's config (a bad key or value raises ConfigError naming it)."""
    from trainlib.config import load_config

    out: dict[str, str] = {}
    i = 0
    while i < len(flags):
        flag = flags[i]
        if not flag.startswith("--") or "." not in flag.split("=", 1)[0]:
            raise LaunchConfigError(f"{flag!r} after `--` is not a trainlib train flag; write --section.key=value, "
                                    "e.g. --train.steps=100")
        if "=" in flag:
            key, value = flag[2:].split("=", 1)
            i += 1
        elif i + 1 < len(flags):
            key, value = flag[2:], flags[i + 1]
            i += 2
        else:
            raise LaunchConfigError(f"{flag} has no value; write {flag}=VALUE")
        out[key] = value
    load_config(None, [f"--{k}={v}" for k, v in out.items()])  # fail here, not on every worker
    return out


def _resources(text: str) -> dict[str, float]:
    try:
        res = json.loads(text)
    except json.JSONDecodeError as e:
        raise LaunchConfigError(f"--resources-per-worker={text!r} is not JSON ({e}); e.g. '{{\"CPU\": 2, \"GPU\": 1}}'")
    if not isinstance(res, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in res.values()):
        raise LaunchConfigError(f"--resources-per-worker={text!r} must be a JSON object of non-negative numbers, "
                                "e.g. '{\"CPU\": 2, \"GPU\": 1}'")
    return {str(k): float(v) for k, v in res.items()}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_flags = _split(argv)
    p = parser()
    args = p.parse_args(ours)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from trainlib.config import ConfigError

    try:
        config = config_from_flags(train_flags)
        resources = _resources(args.resources_per_worker)
        if args.num_workers < 1:
            raise LaunchConfigError(f"--num-workers={args.num_workers} must be >= 1")
    except (LaunchConfigError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    import ray

    from trainlib.launchers import ray as tl_ray

    address = args.address or os.environ.get("RAY_ADDRESS") or None
    unreachable = wait_reachable(address, args.connect_timeout_s)
    if unreachable:  # the head may be restarting (a RayJob): retryable
        print(f"{PROG}: no Ray cluster: {unreachable}; check that the head runs, fix --address or $RAY_ADDRESS, "
              "or raise --connect-timeout-s", file=sys.stderr)
        return EXIT_RETRY
    try:
        ray.init(address=address, logging_level="WARNING")
    except ConnectionError as e:  # the cluster may still be coming up (a RayJob's head): retryable
        print(f"{PROG}: no Ray cluster at {address!r} ({e}); start one (`ray start --head`), fix --address or "
              "$RAY_ADDRESS, or drop both for a local instance", file=sys.stderr)
        return EXIT_RETRY
    try:
        results = tl_ray.run(tl_ray.train_trainlib, args.num_workers, config, resources_per_worker=resources,
                             timeout_s=args.timeout_s, max_failures=args.max_failures,
                             checkpoint_dir=args.checkpoint_dir, min_workers=args.min_workers,
                             env={"TRAINLIB_NO_PROGRESS": "1"})  # a progress bar per actor is noise in Ray's logs
    except (LaunchConfigError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except LaunchInfraError as e:
        print(f"{PROG}: the cluster failed the run: {e}", file=sys.stderr)
        return EXIT_RETRY
    except Exception as e:  # a worker's error (max_failures=0): a dead worker is the cluster's, a bug the job's
        print(f"{PROG}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_RETRY if tl_ray.is_retryable(e) else EXIT_CONFIG
    finally:
        ray.shutdown()
    print(json.dumps({**results[0], "restarts": results.restarts, "attempts": results.attempts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
