"""Checkpoints in S3 (or any S3-compatible store: MinIO, moto's server) through boto3.

    s3://bucket/prefix/step_00000200/rank0.safetensors, rank0.json, ..., MANIFEST.json
    s3://bucket/prefix/latest        "step_00000200\\n"

S3 has no rename, but a PUT of one object is atomic (a reader sees the old object or the new one,
never a part) and reads after a successful PUT are strongly consistent (since December 2020). So
a step's files go straight to their final keys, the manifest is PUT last and its presence is what
makes the step complete; `latest` is PUT only after the manifest. A killed save leaves objects
without a manifest, which listing ignores and the next save or prune deletes.

The endpoint comes from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (boto3 reads them itself from
1.28 on; passed explicitly here for older ones), credentials from boto3's usual chain.
"""
from __future__ import annotations

import hashlib
import os
import threading
from typing import Callable

import torch

from . import stfile
from .backends import LATEST, MANIFEST, STEP_DIR, step_name

PART_BYTES = 16 * 1024 * 1024   # multipart part size (S3 needs >= 5 MiB for all parts but the last)
_CLIENTS: dict[str | None, object] = {}
_CLIENTS_LOCK = threading.Lock()


def _client(endpoint: str | None):
    """One boto3 client per endpoint and process (clients are thread-safe; sessions are not)."""
    with _CLIENTS_LOCK:
        if endpoint not in _CLIENTS:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                from .store import CheckpointError

                raise CheckpointError("checkpoint.dir is an s3:// URL but boto3 is not installed; "
                                      "pip install 'trainlib[s3]' (or boto3)") from None
            cfg = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=120)
            _CLIENTS[endpoint] = boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)
        return _CLIENTS[endpoint]


def _missing(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
    return code in ("NoSuchKey", "404", "NotFound")


class S3Object:
    """A key, path-like enough for the loader: `/`, `.name`, `read_bytes()`, `read_verified()`."""

    def __init__(self, storage: "S3Storage", key: str):
        self.storage, self.key = storage, key

    @property
    def name(self) -> str:
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> "S3Object":
        return S3Object(self.storage, f"{self.key.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return f"s3://{self.storage.bucket}/{self.key}"

    def _get(self):
        try:
            return self.storage.client.get_object(Bucket=self.storage.bucket, Key=self.key)
        except Exception as e:  # ClientError, connection errors: the loader treats OSError as "damaged"
            raise FileNotFoundError(2, f"{self}: {type(e).__name__}: {e}") from None

    def read_bytes(self) -> bytes:
        with self._get()["Body"] as body:
            return body.read()

    def read_verified(self, size: int, sha256: str) -> torch.Tensor:
        """The object's bytes as a uint8 tensor after checking size and sha256 (ValueError names which)."""
        resp = self._get()
        if resp["ContentLength"] != size:
            resp["Body"].close()
            raise ValueError(f"{self.name} has {resp['ContentLength']} bytes, the manifest says {size} (truncated?)")
        buf = torch.empty(size, dtype=torch.uint8)
        view, got, h = memoryview(buf.numpy()), 0, hashlib.sha256()
        with resp["Body"] as body:
            while got < size:
                chunk = body.read(min(PART_BYTES, size - got))
                if not chunk:
                    raise ValueError(f"{self.name} ended after {got} of {size} bytes")
                view[got:got + len(chunk)] = chunk
                h.update(chunk)
                got += len(chunk)
        if h.hexdigest() != sha256:
            raise ValueError(f"{self.name} sha256 {h.hexdigest()[:12]}... != manifest {sha256[:12]}... (corrupted)")
        return buf


class _Upload:
    """A write-only stream into one object: a single PUT when small, multipart when large, so a
    shard is never held twice in memory. Nothing is visible under the key before close()."""

    def __init__(self, client, bucket: str, key: str):
        self.client, self.bucket, self.key = client, bucket, key
        self.buf, self.parts, self.upload_id = bytearray(), [], None

    def write(self, data) -> int:
        self.buf += data
        while len(self.buf) >= PART_BYTES:
            self._part(bytes(self.buf[:PART_BYTES]))
            del self.buf[:PART_BYTES]
        return len(data)

    def _part(self, data: bytes) -> None:
        if self.upload_id is None:
            self.upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
        n = len(self.parts) + 1
        etag = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n,
                                       Body=data)["ETag"]
        self.parts.append({"ETag": etag, "PartNumber": n})

    def close(self) -> None:
        if self.upload_id is None:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buf))
            return
        if self.buf:
            self._part(bytes(self.buf))
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                              MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        if self.upload_id is not None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            except Exception:  # best effort: a lifecycle rule reaps abandoned uploads anyway
                pass


class S3Storage:
    def __init__(self, bucket: str, prefix: str, client):
        self.bucket, self.prefix, self.client = bucket, prefix, client
        self.url = f"s3://{bucket}/{prefix}"

    @classmethod
    def from_url(cls, url: str) -> "S3Storage":
        from .store import CheckpointError

        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise CheckpointError(f"checkpoint.dir={url!r} names no bucket; use s3://BUCKET/PREFIX")
        prefix = prefix.strip("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        return cls(bucket, f"{prefix}/" if prefix else "", _client(endpoint))

    def _key(self, step: int, name: str = "") -> str:
        return f"{self.prefix}{step_name(step)}/{name}"

    def step_path(self, step: int) -> S3Object:
        return S3Object(self, self._key(step).rstrip("/"))

    def _objects(self) -> dict[int, set[str]]:
        """step -> names of the objects under it (complete or not)."""
        out: dict[int, set[str]] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}step_")
        for page in pages:
            for obj in page.get("Contents", []):
                folder, _, name = obj["Key"][len(self.prefix):].partition("/")
                m = STEP_DIR.match(folder)
                if m:
                    out.setdefault(int(m.group(1)), set()).add(name)
        return out

    def list_steps(self) -> list[int]:
        try:
            objects = self._objects()
        except Exception as e:
            if "NoSuchBucket" in str(e):
                return []
            raise
        return sorted(s for s, names in objects.items() if MANIFEST in names)

    def latest_step(self) -> int | None:
        try:
            m = STEP_DIR.match(S3Object(self, f"{self.prefix}{LATEST}").read_bytes().decode().strip())
        except (OSError, UnicodeDecodeError):
            return None
        return int(m.group(1)) if m else None

    def _delete_step(self, step: int, names: set[str]) -> None:
        # the manifest first: from then on the step is incomplete, whatever else a crash leaves
        if MANIFEST in names:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(step, MANIFEST))
        rest = [{"Key": self._key(step, n)} for n in sorted(names - {MANIFEST})]
        for i in range(0, len(rest), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": rest[i:i + 1000], "Quiet": True})

    def begin(self, step: int) -> None:
        from .store import CheckpointError

        try:
            names = self._objects().get(step, set())
        except Exception as e:
            if "NoSuchBucket" in str(e):
                raise CheckpointError(f"checkpoint.dir={self.url!r}: bucket {self.bucket!r} does not exist; "
                                      "create it first (trainlib does not create buckets)") from None
            raise
        if names:  # a killed save of this step, or this step saved before (a replay after resume)
            self._delete_step(step, names)

    def write_tensors(self, step: int, name: str, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> tuple[str, int]:
        up = _Upload(self.client, self.bucket, self._key(step, name))
        try:
            out = stfile.write_to(up, tensors, metadata)
            up.close()
        except BaseException:
            up.abort()
            raise
        return out

    def write_bytes(self, step: int, name: str, data: bytes) -> tuple[str, int]:
        self.client.put_object(Bucket=self.bucket, Key=self._key(step, name), Body=data)
        return hashlib.sha256(data).hexdigest(), len(data)

    def commit(self, step: int, manifest: bytes, fault: Callable[[str], None]) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(step, MANIFEST), Body=manifest)
        fault("save:manifest")
        fault("save:rename")  # no rename on S3: the manifest's PUT is the moment the step appears

    def set_latest(self, step: int) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}{LATEST}", Body=f"{step_name(step)}\n".encode())

    def prune(self, newest: int, keep: int) -> None:
        """Keep the newest `keep` complete steps up to `newest`; drop later ones, and every step
        without a manifest (leftovers of killed saves: only one save is ever in flight)."""
        objects = self._objects()
        complete = sorted(s for s, names in objects.items() if MANIFEST in names and s <= newest)
        kept = set(complete[-keep:])
        for s, names in objects.items():
            if s not in kept:
                self._delete_step(s, names)
