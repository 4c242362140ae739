"""One error line per failed job, not one traceback per rank.

When a value can only be found bad inside the ranks, every rank usually trips on it, and the
ranks that did not are killed or lose a peer. A launcher that started the ranks (`trainlib train`
on one machine, `trainlib launch` in a pod) sets TRAINLIB_ERROR_DIR; the first rank to fail
claims `first` in it (O_EXCL: exactly one wins) and writes its one line there, and the launcher
prints that line last, after torchrun's agent has stopped the other ranks. Without a launcher
(torchrun by hand) each failing rank prints its own line. TRAINLIB_DEBUG=1 (`--debug`) adds the
traceback on stderr.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

ERROR_DIR_ENV = "TRAINLIB_ERROR_DIR"
VALIDATED_ENV = "TRAINLIB_VALIDATED"   # the launcher ran trainlib.validate for this world size
DEBUG_ENV = "TRAINLIB_DEBUG"
FIRST = "first"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report(line: str, exc: BaseException | None = None, *, print_line: bool = True) -> bool:
    """Report one failure of this rank; returns whether this rank was the first to fail.

    The first failing rank's line goes to the launcher (or to stderr without one); later ranks
    only fail secondarily (a lost peer, the same bad value) and stay quiet."""
    if exc is not None and debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if not error_dir:
        if print_line:
            print(line, file=sys.stderr, flush=True)
        return True
    rank = os.environ.get("RANK", "0")
    try:
        fd = os.open(os.path.join(error_dir, FIRST), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError:  # the launcher's directory is gone: say it ourselves
        print(line, file=sys.stderr, flush=True)
        return True
    with os.fdopen(fd, "w") as f:
        f.write(f"{line} (rank {rank})\n" if line else "")
    return True


def first_error(error_dir: str | os.PathLike) -> str | None:
    """The first failing rank's line, for the launcher to print; None when no rank reported one."""
    try:
        text = (Path(error_dir) / FIRST).read_text().strip()
    except OSError:
        return None
    return text or None
