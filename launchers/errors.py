"""Exit codes for the launcher, chosen for Kubeflow's `restartPolicy: ExitCode`.

The training operator treats exit codes 1-127 as permanent failures (the pod is not restarted)
and 128-255 as retryable (the pod is restarted). So a configuration mistake must exit 1 — a
restart cannot fix it — and an infrastructure failure (a peer vanished, the rendezvous timed
out, a node was pre-empted) must exit >= 128 so the operator tries again.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 1       # user or configuration error: permanent
EXIT_RETRY = 138      # retryable infrastructure failure (128 + 10; no signal uses 10 on exit)


class LaunchConfigError(Exception):
    """The environment or the flags do not describe a job we can start; retrying will not help."""

    exit_code = EXIT_CONFIG


class LaunchInfraError(Exception):
    """Something outside the job failed (rendezvous, a peer, a node); a restart may succeed."""

    exit_code = EXIT_RETRY


def classify_worker_exit(code: int) -> int:
    """Map a worker's exit status to the launcher's exit status.

    A negative code means the worker was killed by a signal (OOM killer, pre-emption): retryable.
    1 and 2 are what Python returns for an uncaught exception and a usage error: permanent.
    Codes >= 128 are passed on as retryable; anything else is passed through unchanged.
    """
    if code == 0:
        return EXIT_OK
    if code < 0 or code >= 128:
        return EXIT_RETRY if code < 0 or code > 255 else code
    return code
