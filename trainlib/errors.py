"""What a failed distributed wait raises: one hierarchy, read by the trainer's exit-code policy.

    CollectiveError                 a collective, point-to-point or parameter-server wait failed;
    |                               the message names the rank, the operation and its sequence number
    +-- CollectiveTimeout           it did not finish in time, or a peer failed inside it: infrastructure,
    |   |                           so the job is worth retrying (trainer exit 138)
    |   +-- PipelineTimeout         a pipeline stage's send/recv (trainlib/pipeline/runtime.py)
    |   +-- PSTimeout               a parameter server did not answer, or dropped the connection
    |                               (trainlib/sync/ps/client.py; also a PSError)
    +-- CollectiveMismatch          ranks entered the same collective with different ops, shapes or
                                    dtypes: a bug in the program, retrying repeats it (trainer exit 1)

A mismatch is deliberately not a timeout: `except CollectiveTimeout` (retry, rename, wrap) must not
turn a program bug into "please retry". Catch CollectiveError for both.
"""
from __future__ import annotations


class CollectiveError(RuntimeError):
    """A distributed wait failed; the message names the rank, the operation and its sequence number."""


class CollectiveTimeout(CollectiveError):
    """A collective or point-to-point wait did not finish in time (or a peer failed inside it)."""


class CollectiveMismatch(CollectiveError):
    """Ranks entered the same collective with different ops, shapes or dtypes (TRAINLIB_DEBUG_COLLECTIVES=1)."""
