"""Streaming safetensors write and zero-copy read, with the sha256 computed on the way.

The file format is safetensors' own (https://github.com/huggingface/safetensors#format):

    u64 little-endian N | N bytes of JSON header, space-padded to 8 | raw tensor bytes
    header: {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}}

so `safetensors.torch.load_file` reads what we write. Why not call safetensors.torch.save: it
builds the whole file as one `bytes` object first (a full extra copy of the state, ~40% of the
save time for a 300 MB checkpoint here); writing each tensor's memory straight to the file while
hashing it costs only the write. Reading parses the header and makes tensors that are views of
one uint8 buffer, so a load is one read plus one hash pass.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}[_name]
_BY_NAME = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (t is CPU and contiguous)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[str, int]:
    """Write a safetensors file, flush and fsync it; return (sha256 hex, size) of its bytes."""
    with open(path, "wb") as f:
        out = write_to(f, tensors, metadata)
        f.flush()
        os.fsync(f.fileno())
    return out


def write_to(f: BinaryIO, tensors: dict[str, torch.Tensor],
             metadata: dict[str, str] | None = None) -> tuple[str, int]:
    """Stream safetensors bytes into any binary writer (a file, an S3 multipart upload);
    return (sha256 hex, size). The caller makes them durable."""
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    # widest elements first (as safetensors does): every offset is then a multiple of its element size
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    h = hashlib.sha256()
    for chunk in (struct.pack("<Q", len(head)), head):
        f.write(chunk)
        h.update(chunk)
    for name in names:
        mv = _raw(tensors[name])
        f.write(mv)
        h.update(mv)
    return h.hexdigest(), 8 + len(head) + offset


def read_verified(path: Path, size: int, sha256: str) -> torch.Tensor:
    """The file's bytes as a uint8 tensor, after checking size and sha256; ValueError says which failed."""
    actual = os.path.getsize(path)
    if actual != size:
        raise ValueError(f"{path.name} has {actual} bytes, the manifest says {size} (truncated?)")
    buf = torch.empty(size, dtype=torch.uint8)  # not zero-filled, unlike bytearray(size)
    with open(path, "rb", buffering=0) as f:
        view, got = memoryview(buf.numpy()), 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"{path.name} ended after {got} of {size} bytes")
            got += n
    digest = hashlib.sha256(view).hexdigest()
    if digest != sha256:
        raise ValueError(f"{path.name} sha256 {digest[:12]}... != manifest {sha256[:12]}... (corrupted)")
    return buf


def parse(buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes (a uint8 tensor); each a view into buf (no copy)."""
    if len(buf) < 8:
        raise ValueError("file shorter than a safetensors header")
    (n,) = struct.unpack("<Q", buf[:8].numpy().tobytes())
    if n > min(_MAX_HEADER, len(buf) - 8):
        raise ValueError(f"safetensors header of {n} bytes does not fit the file")
    header = json.loads(buf[8:8 + n].numpy().tobytes())
    # each tensor gets its own storage over its byte range (storage_offset 0: some torch APIs,
    # torch.set_rng_state among them, read a storage from its start)
    base, out, raw = 8 + n, {}, memoryview(buf.numpy())
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _BY_NAME[info["dtype"]]
        begin, end = info["data_offsets"]
        count = 1
        for d in info["shape"]:
            count *= d
        elem = torch.empty((), dtype=dtype).element_size()
        if end - begin != count * elem or base + end > len(buf):
            raise ValueError(f"tensor {name!r}: offsets {begin}..{end} do not match shape {info['shape']}")
        if count == 0:
            out[name] = torch.empty(info["shape"], dtype=dtype)
        elif (base + begin) % elem:  # a file from another writer with unaligned data: copy
            out[name] = buf[base + begin: base + end].clone().view(dtype).view(info["shape"])
        else:
            out[name] = torch.frombuffer(raw[base + begin: base + end], dtype=dtype).view(info["shape"])
    return out
