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
never read, and a `step_*` directory exists only with its manifest. The same recipe runs on S3
(`s3://bucket/prefix`; backends.py, s3.py), where the manifest's PUT replaces the rename, and in
the background (async_save.py: CheckpointWriter), from a snapshot of the state in host memory. Loading verifies the sha256
of this rank's files and the manifest's own checksum; a damaged checkpoint is skipped with a
warning and the next newest complete one is used — all ranks agree on which, by a collective.
Nothing is unpickled: tensors are safetensors, everything else JSON.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from . import backends, hooks, rng, stfile
from .backends import LATEST, MANIFEST, Storage, open_storage  # noqa: F401  (LATEST: public name)
from .tree import flatten, unflatten

log = logging.getLogger("trainlib")

FORMAT = 1


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit this job; the message says what to do."""


class _Damaged(Exception):
    """This rank's view of one checkpoint failed verification (internal: triggers a fallback)."""


@dataclass
class Checkpoint:
    step: int
    state: dict[str, Any]
    path: Any   # a Path, or an s3.S3Object for s3:// checkpoints


def step_dir(root: str | os.PathLike, step: int):
    """Where checkpoint `step` lives: a Path (or an s3.S3Object under s3://)."""
    return open_storage(root).step_path(step)


def list_steps(root: str | os.PathLike) -> list[int]:
    """Steps of the complete-looking checkpoints under root (a manifest exists), ascending."""
    return open_storage(root).list_steps()


def latest_step(root: str | os.PathLike) -> int | None:
    """The step `latest` names, or None (no pointer, or an unreadable one)."""
    return open_storage(root).latest_step()


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# --- where this process sits, and the collectives a save needs ------------------------------

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


class Collectives:
    """The three collectives a save needs, over some group; subclasses give all_gather and device.
    The default (`WORLD`) is the training's default group through comm; the asynchronous writer
    brings its own gloo group so its background thread never shares a group with training."""

    world_size: int = 1

    def device(self) -> torch.device:
        return torch.device("cpu")

    def all_gather(self, out: list[torch.Tensor], t: torch.Tensor) -> None:
        raise NotImplementedError

    def gather_i64(self, values: list[int]) -> list[list[int]]:
        t = torch.tensor(values, dtype=torch.int64, device=self.device())
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self.all_gather(out, t)
        return [o.cpu().tolist() for o in out]

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data` (lengths first, then the bytes padded to the longest)."""
        lengths = [v[0] for v in self.gather_i64([len(data)])]
        buf = torch.zeros(max(lengths), dtype=torch.uint8)
        if data:
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(self.device())
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        self.all_gather(out, buf)
        return [bytes(o.cpu()[:n].tolist()) for o, n in zip(out, lengths)]


class _World(Collectives):
    def __init__(self, world_size: int):
        self.world_size = world_size

    def device(self) -> torch.device:
        return _comm_device()

    def all_gather(self, out: list[torch.Tensor], t: torch.Tensor) -> None:
        from .. import comm

        comm.all_gather(out, t)


def _all_gather_i64(values: list[int], world_size: int) -> list[list[int]]:
    return _World(world_size).gather_i64(values)


def _agree(coll: Collectives | None, step: int, what: str, error: BaseException | None) -> None:
    """Every rank learns whether `what` worked everywhere (instead of waiting for a rank that gave up
    until the collective timeout): this rank's own error is re-raised, another rank's named."""
    oks = coll.gather_i64([error is None]) if coll is not None else [[error is None]]
    if error is not None:
        raise error
    bad = [r for r, (ok,) in enumerate(oks) if not ok]
    if bad:
        raise CheckpointError(f"checkpoint step {step}: {what} failed on rank(s) {bad}; their logs say why")


def _digest_ints(hexdigest: str, size: int) -> list[int]:
    raw = bytes.fromhex(hexdigest)
    return [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, 32, 8)] + [size]


def _ints_digest(v: list[int]) -> tuple[str, int]:
    return b"".join(x.to_bytes(8, "little", signed=True) for x in v[:4]).hex(), v[4]


# --- save -----------------------------------------------------------------------------------

def check_save_args(step: int, keep: int) -> None:
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint step {step!r} must be an int >= 0")
    if not isinstance(keep, int) or keep < 1:
        raise CheckpointError(f"checkpoint keep={keep!r} must be an int >= 1 (how many recent checkpoints to keep)")


def save(root: str | os.PathLike, step: int, state: dict[str, Any], *, keep: int = 3, save_rng: bool = True,
         rank: int | None = None, world_size: int | None = None, layout: dict | None = None):
    """Save this rank's `state` (a tree of tensors and JSON values) as checkpoint `step` under `root`
    (a directory, or s3://bucket/prefix).

    Collective: every rank of the job calls it with the same step. Returns the checkpoint's
    location once it is durable on every rank and `latest` names it; older checkpoints beyond
    the newest `keep` are deleted. save_rng adds this rank's RNG states (torch CPU/CUDA, random,
    numpy), which `load` restores. layout: this rank's checkpoint/layout.py description (global
    shapes, tp and dp slices); given on every rank or none, the manifest records all of them.
    For a save that returns before the write, see async_save.CheckpointWriter."""
    check_save_args(step, keep)
    r, w, collective = _where(rank, world_size)
    skeleton, tensors = flatten({"state": state, "rng": rng.capture() if save_rng else None})
    return write_flat(open_storage(root), step, skeleton, tensors, keep=keep, rank=r, world_size=w,
                      layout=layout, coll=_World(w) if collective else None)


def write_flat(storage: Storage, step: int, skeleton: dict, tensors: dict[str, torch.Tensor], *, keep: int,
               rank: int, world_size: int, layout: dict | None, coll: Collectives | None):
    """The recipe, on a flattened state (tree.flatten); collective over `coll` (None: one process)."""
    r, w = rank, world_size
    t0 = time.perf_counter()
    error = None
    if r == 0:
        try:
            storage.begin(step)
        except Exception as e:
            error = e
    _agree(coll, step, f"preparing {storage.url}", error)
    meta = {"format": FORMAT, "step": step, "rank": r, "world_size": w, "tree": skeleton}
    names = (f"rank{r}.safetensors", f"rank{r}.json")
    flat, error = [0] * 10, None
    try:
        mine = [storage.write_tensors(step, names[0], tensors, {"trainlib_format": str(FORMAT)}),
                storage.write_bytes(step, names[1], json.dumps(meta).encode())]
        flat = _digest_ints(*mine[0]) + _digest_ints(*mine[1])
    except Exception as e:
        error = e
    hooks.fire("save:shard", rank=r, step=step)
    every = coll.gather_i64(flat + [error is None]) if coll is not None else [flat + [error is None]]
    _agree(None, step, "", error)
    failed = [rr for rr, v in enumerate(every) if not v[10]]
    if failed:
        raise CheckpointError(f"checkpoint step {step}: writing the shard failed on rank(s) {failed}; "
                              "their logs say why")
    layouts = None
    if layout is not None:
        mine_layout = json.dumps(layout, sort_keys=True).encode()
        layouts = [json.loads(x) for x in coll.gather_bytes(mine_layout)] if coll is not None else [layout]
    error = None
    if r == 0:
        try:
            _commit(storage, step, every, w, layouts, keep, r)
        except Exception as e:
            error = e
    _agree(coll, step, f"committing to {storage.url}", error)
    final = storage.step_path(step)
    log.info("checkpoint step %d saved to %s in %.2fs", step, final, time.perf_counter() - t0)
    return final


def _commit(storage: Storage, step: int, every: list[list[int]], w: int, layouts: list | None, keep: int,
            r: int) -> None:
    """Rank 0: the manifest (sha256 and size of every rank's files, itself checksummed), then
    `latest`, then pruning."""
    files = {}
    for rr, v in enumerate(every):
        for i, kind in enumerate(("safetensors", "json")):
            digest, size = _ints_digest(v[5 * i: 5 * i + 5])
            files[f"rank{rr}.{kind}"] = {"sha256": digest, "bytes": size}
    body = {"format": FORMAT, "step": step, "world_size": w, "files": files, "saved_unix": time.time()}
    if layouts is not None:
        body["layouts"] = {str(rr): lay for rr, lay in enumerate(layouts)}
    manifest = json.dumps({"sha256": hashlib.sha256(_canonical(body)).hexdigest(), "body": body}, indent=1).encode()
    storage.commit(step, manifest, lambda phase: hooks.fire(phase, rank=r, step=step))
    storage.set_latest(step)
    storage.prune(step, keep)


# --- load -----------------------------------------------------------------------------------

def _read_manifest(path, world_size: int | None) -> dict:
    """The manifest's body, checked against its own sha256 and this directory; with world_size,
    also that it was saved by as many ranks (None: any, for a load under another layout)."""
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
    if world_size is not None and body["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {path} was saved by {body['world_size']} ranks but this job has {world_size}; "
            f"resume with the same world size (and mesh), or point --checkpoint.dir at a new directory")
    return body


def _read_verified(path, entry: dict | None, name: str) -> bytes:
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


def _read_shard(path, rank: int, world_size: int) -> dict:
    body = _read_manifest(path, world_size)
    meta_raw = _read_verified(path, body["files"].get(f"rank{rank}.json"), f"rank{rank}.json")
    name = f"rank{rank}.safetensors"
    entry = body["files"].get(name)
    if entry is None:
        raise _Damaged(f"{name} is not in the manifest")
    try:
        blob = backends.read_verified(path / name, entry["bytes"], entry["sha256"])
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


def _candidates(storage: Storage, step: int | None) -> list[int]:
    if step is not None:
        return [step]
    steps = sorted(storage.list_steps(), reverse=True)
    first = storage.latest_step()
    return ([first] if first in steps else []) + [s for s in steps if s != first]


def load(root: str | os.PathLike, *, step: int | None = None, restore_rng: bool = True,
         rank: int | None = None, world_size: int | None = None) -> Checkpoint | None:
    """Load this rank's part of the newest intact checkpoint under `root` (or of `step`).

    Collective when world_size > 1. Tries `latest` first, then older checkpoints, newest first;
    each skipped one is logged as a warning with the reason. Returns None when `root` holds no
    checkpoint at all; raises CheckpointError when checkpoints exist but none is intact."""
    r, w, collective = _where(rank, world_size)
    storage = open_storage(root)
    cands = _candidates(storage, step)
    failures: list[str] = []
    i = 0
    while True:
        s, i = (cands[i] if i < len(cands) else -1), i + 1
        if collective:  # rank 0's view of the directory decides which candidate everyone tries
            s = _all_gather_i64([s], w)[0][0]
        if s < 0:
            break
        path = storage.step_path(s)
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
            raise CheckpointError(f"no checkpoint for step {step} under {root}; available: {storage.list_steps()}")
        return None
    raise CheckpointError(f"no intact checkpoint under {root}: {'; '.join(failures)}. Restore the directory from "
                          "a backup, or point --checkpoint.dir at an empty directory to start over")
