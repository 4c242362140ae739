"""Atomic, checksummed, sharded checkpoints on a (shared) filesystem.

On disk, for a 2-rank job with keep=2:

    D/latest                      "step_00000200\\n"; moved (write tmp, fsync, rename) only after the step is durable
    D/step_00000100/              an older complete checkpoint
    D/step_00000200/rank0.safetensors   rank 0's tensors (model/optimizer shards, RNG state)
                    rank0.json          rank 0's skeleton: everything that is not a tensor, and where tensors go
                    rank1.safetensors, rank1.json
                    MANIFEST.json       sha256 and size of every file above; written last, itself checksummed

A save is the classic crash-consistent recipe (write new, fsync, rename, fsync the directory;
cf. "All File Systems Are Not Created Equal", Pillai et al., OSDI 2014):

    rank 0: make D/.tmp-step_N                          | barrier
    every rank: write + fsync its two files into it      | all-gather (sha256, size) of every file
    rank 0: MANIFEST.json + fsync, fsync dir, rename to D/step_N, fsync D, move `latest`, prune to keep K
    barrier: save() returns on every rank only once the checkpoint is durable and named by `latest`

A process killed at any point leaves either the old state or the new one: a `.tmp-*` directory is
never read, and a `step_*` directory exists only with its manifest. Loading verifies the sha256
of this rank's files and the manifest's own checksum; a damaged checkpoint is skipped with a
warning and the next newest complete one is used — all ranks agree on which, by a collective.
Nothing is unpickled: tensors are safetensors, everything else JSON.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from . import faults, rng, stfile
from .tree import flatten, unflatten

log = logging.getLogger("trainlib")

FORMAT = 1
MANIFEST = "MANIFEST.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit this job; the message says what to do."""


class _Damaged(Exception):
    """This rank's view of one checkpoint failed verification (internal: triggers a fallback)."""


@dataclass
class Checkpoint:
    step: int
    state: dict[str, Any]
    path: Path


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_steps(root: str | os.PathLike) -> list[int]:
    """Steps of the complete-looking checkpoints under root (a manifest exists), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MANIFEST).is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def latest_step(root: str | os.PathLike) -> int | None:
    """The step `latest` names, or None (no pointer, or an unreadable one)."""
    try:
        m = _STEP_DIR.match((Path(root) / LATEST).read_text().strip())
    except OSError:
        return None
    return int(m.group(1)) if m else None


# --- durable writes -------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> tuple[str, int]:
    """Write, flush, fsync; return (sha256 hex, size) of what was written."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest(), len(data)


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    _write_durable(tmp, f"{name}\n".encode())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


# --- where this process sits ----------------------------------------------------------------

def _where(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """(rank, world_size, use collectives)."""
    init = dist.is_available() and dist.is_initialized()
    r = rank if rank is not None else (dist.get_rank() if init else 0)
    w = world_size if world_size is not None else (dist.get_world_size() if init else 1)
    if not 0 <= r < w:
        raise CheckpointError(f"rank {r} is outside world_size {w}")
    if w > 1 and not init:
        raise CheckpointError(f"world_size {w} > 1 but torch.distributed is not initialised; call tl.init() first")
    return r, w, w > 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_i64(values: list[int], world_size: int) -> list[list[int]]:
    from .. import comm

    t = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    out = [torch.empty_like(t) for _ in range(world_size)]
    comm.all_gather(out, t)
    return [o.cpu().tolist() for o in out]


def _all_gather_bytes(data: bytes, world_size: int) -> list[bytes]:
    """Every rank's `data` (lengths first, then the bytes padded to the longest)."""
    from .. import comm

    lengths = [v[0] for v in _all_gather_i64([len(data)], world_size)]
    buf = torch.zeros(max(lengths), dtype=torch.uint8)
    if data:
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(_comm_device())
    out = [torch.empty_like(buf) for _ in range(world_size)]
    comm.all_gather(out, buf)
    return [bytes(o.cpu()[:n].tolist()) for o, n in zip(out, lengths)]


def _barrier() -> None:
    from .. import comm

    comm.all_reduce(torch.zeros(1, device=_comm_device()))


def _digest_ints(hexdigest: str, size: int) -> list[int]:
    raw = bytes.fromhex(hexdigest)
    return [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, 32, 8)] + [size]


def _ints_digest(v: list[int]) -> tuple[str, int]:
    return b"".join(x.to_bytes(8, "little", signed=True) for x in v[:4]).hex(), v[4]


# --- save -----------------------------------------------------------------------------------

def save(root: str | os.PathLike, step: int, state: dict[str, Any], *, keep: int = 3, save_rng: bool = True,
         rank: int | None = None, world_size: int | None = None, layout: dict | None = None) -> Path:
    """Save this rank's `state` (a tree of tensors and JSON values) as checkpoint `step` under `root`.

    Collective: every rank of the job calls it with the same step. Returns the checkpoint's
    directory once it is durable on every rank and `latest` names it; older checkpoints beyond
    the newest `keep` are deleted. save_rng adds this rank's RNG states (torch CPU/CUDA, random,
    numpy), which `load` restores. layout: this rank's checkpoint/layout.py description (global
    shapes, tp and dp slices); given on every rank or none, the manifest records all of them."""
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint step {step!r} must be an int >= 0")
    if not isinstance(keep, int) or keep < 1:
        raise CheckpointError(f"checkpoint keep={keep!r} must be an int >= 1 (how many recent checkpoints to keep)")
    r, w, collective = _where(rank, world_size)
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".tmp-{step_dir(root, step).name}"
    t0 = time.perf_counter()
    if r == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a save of this step that died earlier
            shutil.rmtree(tmp)
        tmp.mkdir()
    if collective:
        _barrier()
    skeleton, tensors = flatten({"state": state, "rng": rng.capture() if save_rng else None})
    meta = {"format": FORMAT, "step": step, "rank": r, "world_size": w, "tree": skeleton}
    names = (f"rank{r}.safetensors", f"rank{r}.json")
    mine = [stfile.write(tmp / names[0], tensors, metadata={"trainlib_format": str(FORMAT)}),
            _write_durable(tmp / names[1], json.dumps(meta).encode())]
    faults.maybe_kill(r, step, "save:shard")
    flat = _digest_ints(*mine[0]) + _digest_ints(*mine[1])
    every = _all_gather_i64(flat, w) if collective else [flat]
    layouts = None
    if layout is not None:
        mine_layout = json.dumps(layout, sort_keys=True).encode()
        layouts = [json.loads(x) for x in _all_gather_bytes(mine_layout, w)] if collective else [layout]
    if r == 0:
        files = {}
        for rr, v in enumerate(every):
            for i, kind in enumerate(("safetensors", "json")):
                digest, size = _ints_digest(v[5 * i: 5 * i + 5])
                files[f"rank{rr}.{kind}"] = {"sha256": digest, "bytes": size}
        body = {"format": FORMAT, "step": step, "world_size": w, "files": files, "saved_unix": time.time()}
        if layouts is not None:
            body["layouts"] = {str(rr): lay for rr, lay in enumerate(layouts)}
        _write_durable(tmp / MANIFEST, json.dumps({"sha256": hashlib.sha256(_canonical(body)).hexdigest(),
                                                   "body": body}, indent=1).encode())
        _fsync_dir(tmp)
        faults.maybe_kill(r, step, "save:manifest")
        if final.exists():  # the same step saved before (a resume that replays it): replace it
            old = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            shutil.rmtree(old)
        os.rename(tmp, final)
        _fsync_dir(root)
        faults.maybe_kill(r, step, "save:rename")
        _write_latest(root, final.name)
        _prune(root, step, keep)
    if collective:
        _barrier()
    log.info("checkpoint step %d saved to %s in %.2fs", step, final, time.perf_counter() - t0)
    return final


def _prune(root: Path, newest: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `newest`; drop later ones (an abandoned timeline
    from before a resume) and leftovers of killed saves."""
    steps = list_steps(root)
    older = [s for s in steps if s <= newest]
    doomed = older[:-keep] + [s for s in steps if s > newest]
    for s in doomed:
        shutil.rmtree(step_dir(root, s), ignore_errors=True)
    for p in root.iterdir():
        if (p.name.startswith(".tmp-step_") or p.name.startswith(".old-step_")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# --- load -----------------------------------------------------------------------------------

def _read_manifest(path: Path, world_size: int) -> dict:
    try:
        outer = json.loads((path / MANIFEST).read_bytes())
        body = outer["body"]
        ok = hashlib.sha256(_canonical(body)).hexdigest() == outer["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _Damaged(f"{MANIFEST} unreadable ({type(e).__name__}: {e})") from None
    if not ok:
        raise _Damaged(f"{MANIFEST} fails its own sha256")
    if body.get("format") != FORMAT or f"step_{body.get('step', -1):08d}" != path.name:
        raise _Damaged(f"{MANIFEST} describes format {body.get('format')} step {body.get('step')}, not this directory")
    if body["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {path} was saved by {body['world_size']} ranks but this job has {world_size}; "
            f"resume with the same world size (and mesh), or point --checkpoint.dir at a new directory")
    return body


def _read_verified(path: Path, entry: dict | None, name: str) -> bytes:
    if entry is None:
        raise _Damaged(f"{name} is not in the manifest")
    try:
        data = (path / name).read_bytes()
    except OSError as e:
        raise _Damaged(f"{name} unreadable ({e.strerror})") from None
    if len(data) != entry["bytes"]:
        raise _Damaged(f"{name} has {len(data)} bytes, the manifest says {entry['bytes']} (truncated?)")
    got = hashlib.sha256(data).hexdigest()
    if got != entry["sha256"]:
        raise _Damaged(f"{name} sha256 {got[:12]}... != manifest {entry['sha256'][:12]}... (corrupted)")
    return data


def _read_shard(path: Path, rank: int, world_size: int) -> dict:
    body = _read_manifest(path, world_size)
    meta_raw = _read_verified(path, body["files"].get(f"rank{rank}.json"), f"rank{rank}.json")
    name = f"rank{rank}.safetensors"
    entry = body["files"].get(name)
    if entry is None:
        raise _Damaged(f"{name} is not in the manifest")
    try:
        blob = stfile.read_verified(path / name, entry["bytes"], entry["sha256"])
    except OSError as e:
        raise _Damaged(f"{name} unreadable ({e.strerror})") from None
    except ValueError as e:
        raise _Damaged(str(e)) from None
    try:
        meta = json.loads(meta_raw)
        tensors = stfile.parse(blob)
        return unflatten(meta["tree"], tensors)
    except Exception as e:  # checksums matched yet it does not parse: written by something else
        raise _Damaged(f"rank{rank} shard does not parse ({type(e).__name__}: {e})") from None


def _candidates(root: Path, step: int | None) -> list[int]:
    if step is not None:
        return [step]
    steps = sorted(list_steps(root), reverse=True)
    first = latest_step(root)
    return ([first] if first in steps else []) + [s for s in steps if s != first]


def load(root: str | os.PathLike, *, step: int | None = None, restore_rng: bool = True,
         rank: int | None = None, world_size: int | None = None) -> Checkpoint | None:
    """Load this rank's part of the newest intact checkpoint under `root` (or of `step`).

    Collective when world_size > 1. Tries `latest` first, then older checkpoints, newest first;
    each skipped one is logged as a warning with the reason. Returns None when `root` holds no
    checkpoint at all; raises CheckpointError when checkpoints exist but none is intact."""
    r, w, collective = _where(rank, world_size)
    root = Path(root)
    cands = _candidates(root, step)
    failures: list[str] = []
    i = 0
    while True:
        s, i = (cands[i] if i < len(cands) else -1), i + 1
        if collective:  # rank 0's view of the directory decides which candidate everyone tries
            s = _all_gather_i64([s], w)[0][0]
        if s < 0:
            break
        path = step_dir(root, s)
        try:
            tree, why = _read_shard(path, r, w), ""
        except _Damaged as e:
            tree, why = None, str(e)
        oks = _all_gather_i64([tree is not None], w) if collective else [[tree is not None]]
        bad = [rr for rr, (ok,) in enumerate(oks) if not ok]
        if why:
            log.warning("rank %d: checkpoint %s is damaged: %s", r, path, why)
        if not bad:
            if failures:
                log.warning("resuming from %s instead of the newer damaged checkpoint(s) %s", path, "; ".join(failures))
            if restore_rng and tree.get("rng") is not None:
                rng.restore(tree["rng"])
            return Checkpoint(s, tree["state"], path)
        failures.append(f"{path.name} (damaged on rank(s) {bad})")
        log.warning("checkpoint %s is damaged on rank(s) %s; falling back to an older checkpoint", path, bad)
    if not failures:
        if step is not None:
            raise CheckpointError(f"no checkpoint for step {step} under {root}; available: {list_steps(root)}")
        return None
    raise CheckpointError(f"no intact checkpoint under {root}: {'; '.join(failures)}. Restore the directory from "
                          "a backup, or point --checkpoint.dir at an empty directory to start over")
