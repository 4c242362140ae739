"""Where checkpoint bytes live: a local (shared) filesystem or S3, behind one small interface.

store.py writes the crash-consistent recipe once against `Storage`; each backend supplies the
primitives with the guarantee the recipe needs from them:

    begin(step)              rank 0, before any rank writes: clear what a killed save of `step` left
    write_tensors / write_bytes   one rank's files of `step`, durable when the call returns
    commit(step, manifest)   rank 0, after every rank's files: make the step complete — after this
                             call, and never before, the step is listed by list_steps()
    set_latest(step)         rank 0, after commit: the pointer moves in one atomic write
    prune(newest, keep)      rank 0: drop older steps and leftovers of killed saves

Filesystem: files go to D/.tmp-step_N/, the manifest last, then one rename makes step_N appear
(POSIX rename is atomic; fsyncs make it durable). S3 has no rename, but a PUT is atomic per object:
files go straight to their final keys and the manifest's presence is what makes a step complete.
Readers get a path-like `step_path(step)` with `/`, `.name` and `read_bytes()` (a `Path` on disk).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Protocol

import torch

from . import stfile

MANIFEST = "MANIFEST.json"
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


class Storage(Protocol):
    url: str

    def list_steps(self) -> list[int]: ...
    def latest_step(self) -> int | None: ...
    def step_path(self, step: int): ...
    def begin(self, step: int) -> None: ...
    def write_tensors(self, step: int, name: str, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> tuple[str, int]: ...
    def write_bytes(self, step: int, name: str, data: bytes) -> tuple[str, int]: ...
    def commit(self, step: int, manifest: bytes, fault: Callable[[str], None]) -> None: ...
    def set_latest(self, step: int) -> None: ...
    def prune(self, newest: int, keep: int) -> None: ...


def is_s3(root: str | os.PathLike) -> bool:
    return str(root).startswith("s3://")


def open_storage(root: str | os.PathLike) -> Storage:
    """`s3://bucket/prefix` -> S3 (boto3), anything else -> a directory."""
    if is_s3(root):
        from .s3 import S3Storage

        return S3Storage.from_url(str(root))
    return LocalStorage(Path(root))


def read_verified(path, size: int, sha256: str) -> torch.Tensor:
    """A file's bytes as a uint8 tensor after checking size and sha256 (ValueError says which failed);
    OSError when it cannot be read. `path` is a Path or a backend's path-like (S3Object)."""
    if isinstance(path, Path):
        return stfile.read_verified(path, size, sha256)
    return path.read_verified(size, sha256)


# --- a directory on a local or shared filesystem ---------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> tuple[str, int]:
    """Write, flush, fsync; return (sha256 hex, size) of what was written."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest(), len(data)


class LocalStorage:
    """The classic recipe (write new, fsync, rename, fsync the directory; cf. Pillai et al., OSDI 2014)."""

    def __init__(self, root: Path):
        self.root = root
        self.url = str(root)

    def _tmp(self, step: int) -> Path:
        return self.root / f".tmp-{step_name(step)}"

    def step_path(self, step: int) -> Path:
        return self.root / step_name(step)

    def list_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = STEP_DIR.match(p.name)
            if m and (p / MANIFEST).is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def latest_step(self) -> int | None:
        try:
            m = STEP_DIR.match((self.root / LATEST).read_text().strip())
        except OSError:
            return None
        return int(m.group(1)) if m else None

    def begin(self, step: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(step)
        if tmp.exists():  # a save of this step that died earlier
            shutil.rmtree(tmp)
        tmp.mkdir()

    def write_tensors(self, step: int, name: str, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> tuple[str, int]:
        return stfile.write(self._tmp(step) / name, tensors, metadata=metadata)

    def write_bytes(self, step: int, name: str, data: bytes) -> tuple[str, int]:
        return write_durable(self._tmp(step) / name, data)

    def commit(self, step: int, manifest: bytes, fault: Callable[[str], None]) -> None:
        tmp, final = self._tmp(step), self.step_path(step)
        write_durable(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        fault("save:manifest")
        if final.exists():  # the same step saved before (a resume that replays it): replace it
            old = self.root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            shutil.rmtree(old)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        fault("save:rename")

    def set_latest(self, step: int) -> None:
        tmp = self.root / f".{LATEST}.tmp"
        write_durable(tmp, f"{step_name(step)}\n".encode())
        os.replace(tmp, self.root / LATEST)
        _fsync_dir(self.root)

    def prune(self, newest: int, keep: int) -> None:
        """Keep the newest `keep` checkpoints up to `newest`; drop later ones (an abandoned timeline
        from before a resume) and leftovers of killed saves."""
        steps = self.list_steps()
        older = [s for s in steps if s <= newest]
        for s in older[:-keep] + [s for s in steps if s > newest]:
            shutil.rmtree(self.step_path(s), ignore_errors=True)
        for p in self.root.iterdir():
            if (p.name.startswith(".tmp-step_") or p.name.startswith(".old-step_")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
