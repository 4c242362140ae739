"""Inspect, verify and export checkpoints from outside a job: what `trainlib ckpt` runs.

    steps = describe(D, verify=True)      # one StepInfo per checkpoint: layout, bytes, saved time, problems
    problems = verify_step(step_dir(D, 200))   # [] when every file matches the manifest
    export(D, "model.safetensors")        # the whole model's weights under its own names, one file

One process, no process group: every rank's files are read from the directory (or the s3://
prefix: store.step_dir's path-likes are all this reads through). Export puts each
tensor together from its tp and dp slices by the manifest's layouts (layout.assemble) and writes
a plain safetensors file (tmp + fsync + rename) that `safetensors.torch.load_file` and then
`model.load_state_dict(strict=True)` accept. Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import layout as layout_mod
from . import stfile
from .backends import is_s3
from .store import (FORMAT, MANIFEST, CheckpointError, _canonical, _Damaged, _read_shard, latest_step, list_steps,
                    step_dir)

_CHUNK = 8 << 20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class StepInfo:
    """One checkpoint as `trainlib ckpt ls` shows it. mesh/shard are None when the manifest does not
    record layouts (saved before trainlib did); problems is None when not verified, [] when intact."""
    step: int
    path: str
    latest: bool
    world_size: int | None
    mesh: dict[str, int] | None
    shard: str | None
    bytes: int | None
    saved_unix: float | None
    problems: list[str] | None = field(default=None)

    def as_json(self) -> dict:
        return asdict(self)


def _step_path(path):
    """A step directory as store.step_dir gives it: a Path, or a backend's path-like (s3.S3Object)."""
    return Path(path) if isinstance(path, (str, os.PathLike)) else path


def read_manifest(path) -> dict:
    """The manifest's body after checking its own sha256 and that it describes this directory;
    CheckpointError names what is wrong. `path`: a step directory (store.step_dir)."""
    return _manifest(_step_path(path))[0]


def _manifest(path) -> tuple[dict, int]:
    """(body, the manifest's size in bytes)."""
    try:
        raw = (path / MANIFEST).read_bytes()
        outer = json.loads(raw)
        body, want = outer["body"], outer["sha256"]
        ok = hashlib.sha256(_canonical(body)).hexdigest() == want
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{MANIFEST} unreadable ({type(e).__name__}: {e})") from None
    if not ok:
        raise CheckpointError(f"{MANIFEST} fails its own sha256 (corrupted)")
    if body.get("format") != FORMAT or f"step_{body.get('step', -1):08d}" != path.name:
        raise CheckpointError(f"{MANIFEST} describes format {body.get('format')} step {body.get('step')}, "
                              f"not {path.name}")
    return body, len(raw)


def _sha256_file(path) -> tuple[str, int]:
    if not isinstance(path, Path):   # an object in a store: read whole (as a resume does)
        data = path.read_bytes()
        return hashlib.sha256(data).hexdigest(), len(data)
    h, n = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def verify_step(path) -> list[str]:
    """Every problem with one checkpoint directory (store.step_dir), one line each naming the file
    and why: the manifest's own checksum, then every rank's files (present, size, sha256). [] when intact."""
    path = _step_path(path)
    try:
        body = read_manifest(path)
    except CheckpointError as e:
        return [str(e)]
    files, problems = body.get("files", {}), []
    for r in range(body.get("world_size", 0)):
        for name in (f"rank{r}.safetensors", f"rank{r}.json"):
            if name not in files:
                problems.append(f"{name}: rank {r}'s file is not in the manifest")
    for name, entry in sorted(files.items()):
        try:
            digest, size = _sha256_file(path / name)
        except OSError as e:
            problems.append(f"{name}: unreadable ({e.strerror})")
            continue
        if size != entry["bytes"]:
            problems.append(f"{name}: {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        elif digest != entry["sha256"]:
            problems.append(f"{name}: sha256 {digest[:12]}... != manifest {entry['sha256'][:12]}... (corrupted)")
    return problems


def describe(root: str | os.PathLike, verify: bool = False) -> list[StepInfo]:
    """Every checkpoint under root, oldest first. Without verify only the manifest is checked
    (its own sha256): a bad one shows in problems; verify hashes every file."""
    latest = latest_step(root)
    out = []
    for s in list_steps(root):
        path = step_dir(root, s)
        info = StepInfo(step=s, path=str(path), latest=s == latest, world_size=None, mesh=None, shard=None,
                        bytes=None, saved_unix=None)
        try:
            body, manifest_bytes = _manifest(path)
        except CheckpointError as e:
            info.problems = [str(e)]
            out.append(info)
            continue
        lay = (body.get("layouts") or {}).get("0")
        info.world_size, info.saved_unix = body["world_size"], body.get("saved_unix")
        info.bytes = sum(e["bytes"] for e in body["files"].values()) + manifest_bytes
        if lay is not None:
            info.mesh, info.shard = {a: lay["mesh"][a] for a in ("pp", "dp", "tp")}, lay["shard"]
        if verify:
            info.problems = verify_step(path)
        out.append(info)
    return out


def resolve_step(root: str | os.PathLike, step: int | None) -> int:
    """The checkpoint to read: `step` if it exists, else the one `latest` names, else the newest.
    CheckpointError (naming the directory, the step and the fix) when there is none."""
    if not is_s3(root) and not Path(root).is_dir():
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist; pass the --checkpoint.dir the "
                              "run saved to")
    steps = list_steps(root)
    if not steps:
        raise CheckpointError(f"no checkpoint under {str(root)!r} (no step_*/{MANIFEST}); pass the --checkpoint.dir "
                              "of a run that saved one")
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} under {str(root)!r}; available steps: "
                                  f"{', '.join(map(str, steps))}")
        return step
    latest = latest_step(root)
    return latest if latest in steps else steps[-1]


def consolidate(path, master: bool = False,
                on_rank: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """The whole model's weights (fp32, full-model names) of one checkpoint directory.

    With layouts in the manifest: layout.assemble. Without (saved before trainlib recorded them):
    only a pure data-parallel run can be consolidated, whose every rank holds the whole model;
    that is checked (same names, shapes and bytes on every rank), then rank 0's weights are it."""
    path = _step_path(path)
    body = read_manifest(path)
    try:
        if body.get("layouts"):
            return layout_mod.assemble(path, what="master" if master else "params", on_rank=on_rank)
        return _rank0_of_pure_dp(path, body["world_size"], on_rank)
    except _Damaged as e:  # a rank file failed its checksum while being read
        raise CheckpointError(f"{path} is damaged: {e}; `trainlib ckpt verify` lists every bad file, "
                              "`--step` exports an older checkpoint") from None


def _rank0_of_pure_dp(path, world: int, on_rank: Callable[[int], None] | None) -> dict[str, torch.Tensor]:
    reference: dict[str, torch.Tensor] | None = None
    for r in range(world):
        model = _read_shard(path, r, world)["state"]["model"]
        if "slices" in model:
            raise CheckpointError(f"{path}: saved with --dp.shard but without layouts in its manifest, so its "
                                  "slices cannot be put back together; resume it with a current trainlib and let "
                                  "it save once, then export that checkpoint")
        if reference is None:
            reference = {k: t.clone() for k, t in model.items()}  # a view of the file's buffer otherwise
        elif set(model) != set(reference) or any(
                model[k].dtype != reference[k].dtype or tuple(model[k].shape) != tuple(reference[k].shape)
                or not torch.equal(model[k], reference[k]) for k in model):
            raise CheckpointError(f"{path}: rank {r}'s weights differ from rank 0's and the manifest has no layouts "
                                  f"(saved before trainlib recorded them): a tensor- or pipeline-parallel run that "
                                  "cannot be consolidated; resume it with a current trainlib and let it save once, "
                                  "then export that checkpoint")
        if on_rank is not None:
            on_rank(r)
    assert reference is not None  # world_size >= 1
    return reference


def check_output(out: str | os.PathLike) -> Path:
    """`out` as a Path, if a file can be created there (its directory exists, it is not a directory)."""
    out = Path(out)
    if not out.parent.is_dir():
        raise CheckpointError(f"output directory {str(out.parent)!r} does not exist (for --out {str(out)!r}); "
                              "create it first or pick another path")
    if out.is_dir():
        raise CheckpointError(f"--out {str(out)!r} is a directory; give a file name such as "
                              f"{str(out / 'model.safetensors')!r}")
    return out


def export(root: str | os.PathLike, out: str | os.PathLike, step: int | None = None, dtype: str = "fp32",
           master: bool = False, on_rank: Callable[[int], None] | None = None) -> dict:
    """Write one checkpoint's whole model as a single safetensors file at `out` (atomically: a
    temporary file beside it, fsync, rename). Returns {"step", "path", "tensors", "bytes", "dtype"}."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}; pass --dtype fp32 or --dtype bf16")
    out = check_output(out)
    s = resolve_step(root, step)
    weights = consolidate(step_dir(root, s), master=master, on_rank=on_rank)
    cast = {k: (t.to(DTYPES[dtype]) if t.is_floating_point() else t).contiguous() for k, t in weights.items()}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        _, size = stfile.write(tmp, cast, metadata={"format": "pt", "trainlib_step": str(s)})
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"step": s, "path": str(out), "tensors": len(cast), "bytes": size, "dtype": dtype}
