"""Start a `trainlib ps-server` subprocess and learn its address (colocated mode, tests, benchmarks).

The server binds port 0 (the OS picks a free one, so there is no race with other jobs) and prints
its address on the first line of stdout; we read that line with a deadline. The token travels in
the child's environment, never on its command line (which `ps` shows to every user).
"""
from __future__ import annotations

import os
import selectors
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from .token import TOKEN_ENV, TOKEN_FILE_ENV

READY = "trainlib ps-server listening on "


class ServerStartError(RuntimeError):
    """The server subprocess exited or stayed silent; the message has its stderr."""


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    address: str

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout_s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def spawn_server(bind: str = "127.0.0.1:0", token: str | None = None, insecure: bool = False,
                 state_dir: str | None = None, timeout_s: float = 60.0, extra: tuple[str, ...] = ()) -> ServerHandle:
    """Run `python -m trainlib.cli ps-server` and wait (at most timeout_s) until it listens."""
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, TOKEN_FILE_ENV)}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    if token:
        env[TOKEN_ENV] = token
    cmd = [sys.executable, "-m", "trainlib.cli", "ps-server", "--bind", bind, *extra]
    if insecure:
        cmd.append("--insecure")
    if state_dir:
        cmd += ["--state-dir", state_dir]
    # stderr goes to a file: a pipe nobody drains would eventually block the server's logging
    errlog = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, env=env, text=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(timeout=0.2):
            line = proc.stdout.readline()
            break
    sel.close()
    if not line.startswith(READY):
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        errlog.seek(0)
        err = errlog.read().strip()
        raise ServerStartError(f"`{' '.join(cmd)}` did not report its address within {timeout_s:.0f}s "
                               f"(exit code {proc.returncode}): {err[-2000:] or line or 'no output'}")
    errlog.close()  # the child keeps its own descriptor
    return ServerHandle(proc, line[len(READY):].strip())
