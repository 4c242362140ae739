"""Run configuration: a small tree of frozen dataclasses, from TOML plus `--section.key=value`.

    cfg = load_config("run.toml", ["--train.steps=50", "--mesh.tp", "2"])

Precedence: dataclass defaults < TOML file < command-line overrides. Unknown sections or keys and
values of the wrong type are errors that list what is valid; cross-field checks live in each
section's __post_init__ so a Config that exists is a Config that makes sense.
"""
from __future__ import annotations

import dataclasses
import keyword
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field, fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .compression import COMPRESS
from .models.gpt import GPTConfig


class ConfigError(ValueError):
    """A bad setting; the message names the key, the value and what would be valid."""


def _positive(section: str, **values: float) -> None:
    for k, v in values.items():
        if v <= 0:
            raise ConfigError(f"{section}.{k}={v} must be > 0")


NONFINITE = ("skip", "raise")


PRECISIONS = ("fp32", "bf16", "fp16")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
SHARD_STAGES = ("none", "optimizer", "gradients", "parameters")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 32          # global batch (sequences per step, summed over dp ranks)
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0        # max global grad norm; 0 disables clipping
    seed: int = 0
    log_every: int = 25
    metrics: str = "runs/metrics.jsonl"
    corpus_bytes: int = 1 << 20
    nonfinite: str = "skip"       # inf/nan gradients: skip the step (and count it) | raise
    precision: str = "fp32"       # fp32 | bf16 | fp16 (fp32 master weights; fp16 with dynamic loss scaling)
    activation_checkpointing: str = "none"   # none | full | selective (recompute blocks in backward)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(f"train.activation_checkpointing={self.activation_checkpointing!r} is not one of "
                              f"{', '.join(ACTIVATION_CHECKPOINTING)}")
        _positive("train", steps=self.steps, batch_size=self.batch_size, lr=self.lr, log_every=self.log_every,
                  corpus_bytes=self.corpus_bytes)
        if self.nonfinite not in NONFINITE:
            raise ConfigError(f"train.nonfinite={self.nonfinite!r} is not one of {', '.join(NONFINITE)}")
        if self.grad_clip < 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError(f"train.grad_clip={self.grad_clip}, train.warmup_steps={self.warmup_steps} and "
                              f"train.weight_decay={self.weight_decay} must be >= 0")


@dataclass(frozen=True)
class ModelConfig(GPTConfig):
    """The default GPT's own config (trainlib.models.gpt.GPTConfig) with the trainer's defaults and
    --model.* checks: what `trainlib train` builds is `GPT(cfg.model)`."""
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    seq_len: int = 128
    vocab_size: int = 256

    def __post_init__(self):
        _positive("model", n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model, seq_len=self.seq_len)
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        if self.vocab_size < 256:
            raise ConfigError(f"model.vocab_size={self.vocab_size} is below 256, the byte tokenizer's vocabulary")


@dataclass(frozen=True)
class MeshConfig:
    pp: int = 1
    dp: int = -1
    tp: int = 1
    schedule: str = "1f1b"        # pipeline schedule when pp > 1: gpipe | 1f1b | interleaved | zb-h1
    microbatches: int = 0         # per step when pp > 1; 0 = 2 * pp

    @property
    def virtual_stages(self) -> int:
        """Stages per pipeline rank the schedule implies (interleaved 1F1B: 2)."""
        name = self.schedule.lower().replace("_", "-")
        return 2 if name in ("interleaved", "interleaved-1f1b", "1f1b-interleaved") else 1


SYNC_KINDS = ("allreduce", "ps", "ddp")


@dataclass(frozen=True)
class SyncConfig:
    kind: str = "allreduce"      # allreduce | ps | ddp (torch DDP, as a reference)
    bucket_mb: float = 25.0
    compress: str = "none"        # none | bf16 | fp16
    transport: str = "auto"       # auto | torch | mpi | shm
    mode: str = "sync"            # ps: sync (summed gradients, = all-reduce) | async (parameter deltas, SSP)
    staleness: int = 0            # ps async: how many clocks a worker may run ahead of the slowest
    partition_mb: float = 4.0     # ps: partition size spread over the servers (BytePS uses ~4 MB)
    servers: str = ""             # ps: comma-separated host:port; empty = $TRAINLIB_PS_ADDRS or colocated

    def __post_init__(self):
        if self.kind not in SYNC_KINDS:
            raise ConfigError(f"sync.kind={self.kind!r} is not one of {', '.join(SYNC_KINDS)}")
        if self.compress not in COMPRESS:
            raise ConfigError(f"sync.compress={self.compress!r} is not one of {', '.join(COMPRESS)}")
        _positive("sync", bucket_mb=self.bucket_mb, partition_mb=self.partition_mb)
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"sync.mode={self.mode!r} is not one of sync, async (used with sync.kind=ps)")
        if self.staleness < 0 or (self.staleness and self.mode != "async"):
            raise ConfigError(f"sync.staleness={self.staleness} needs sync.mode=async and a value >= 0")


@dataclass(frozen=True)
class DPConfig:
    shard: str = "none"           # none | optimizer | gradients | parameters (ZeRO stages 1, 2, 3 over dp)

    def __post_init__(self):
        if self.shard not in SHARD_STAGES:
            raise ConfigError(f"dp.shard={self.shard!r} is not one of {', '.join(SHARD_STAGES)} "
                              "(optimizer = ZeRO-1, gradients = ZeRO-2, parameters = ZeRO-3)")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = ""                 # empty: none; a directory or s3://bucket/prefix: save every `every` steps, resume
    every: int = 100
    keep: int = 3
    async_: bool = False          # --checkpoint.async: copy to host memory, write in the background

    def __post_init__(self):
        _positive("checkpoint", every=self.every, keep=self.keep)
        if self.dir.startswith("s3://"):
            if not self.dir[len("s3://"):].split("/")[0]:
                raise ConfigError(f"checkpoint.dir={self.dir!r} names no bucket; use s3://BUCKET/PREFIX")
        elif self.dir:  # fail before launching ranks, not at the first save an hour in
            path = os.path.abspath(self.dir)
            if os.path.exists(path) and not os.path.isdir(path):
                raise ConfigError(f"checkpoint.dir={self.dir!r} exists and is not a directory; point it at a directory")
            parent = path
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                raise ConfigError(f"checkpoint.dir={self.dir!r} cannot be created: {parent!r} is a file, not a "
                                  "directory; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"checkpoint.dir={self.dir!r} cannot be created or written: {parent!r} is not "
                                  "writable; choose a directory you can write to")


@dataclass(frozen=True)
class ObserveConfig:
    """Where the per-window metrics go besides train.metrics (rank 0 only); empty = off."""
    breakdown: bool = True        # measure the per-step breakdown (forward/backward/sync wait/...; bytes; memory)
    tensorboard: str = ""         # a log directory for TensorBoard event files
    mlflow: str = ""              # an MLflow tracking URI (e.g. sqlite:///runs/mlflow.db or http://mlflow:5000)
    mlflow_experiment: str = "trainlib"
    prometheus: str = ""          # HOST:PORT to serve /metrics on (PORT alone binds 127.0.0.1)


@dataclass(frozen=True)
class ProfileConfig:
    steps: str = ""               # "A:B": a torch profiler (Chrome) trace of steps A..B (1-based, inclusive) on every rank
    dir: str = "runs/profile"     # where the per-rank traces go

    @property
    def window(self) -> tuple[int, int] | None:
        if not self.steps:
            return None
        a, b = self.steps.split(":")
        return int(a), int(b)

    def __post_init__(self):
        if self.steps:
            parts = self.steps.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]):
                raise ConfigError(f"profile.steps={self.steps!r} is not A:B with 1 <= A <= B (e.g. --profile.steps 10:12)")


@dataclass(frozen=True)
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sections() -> dict[str, type]:
    return typing.get_type_hints(Config)


def _coerce(section: str, key: str, tp, raw):
    """Turn a TOML value or a command-line string into the field's type."""
    where = f"{section}.{key}"
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw in (None, "none", "None", ""):
            return None
        tp = args[0]
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        if tp is float:
            value = float(raw)
        else:
            return tp(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={raw!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    if not math.isfinite(value):  # nan passes every `<= 0` check, and inf/nan lr trains garbage for hours
        raise ConfigError(f"{where}={raw!r} is not a finite number; give a finite value")
    return value


def _apply(values: dict[str, dict], section: str, key: str, raw) -> None:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r}; sections are {', '.join(sections)}")
    known = typing.get_type_hints(sections[section])
    if keyword.iskeyword(key):  # --checkpoint.async is the field async_ (a Python keyword)
        key += "_"
    if key not in known:
        raise ConfigError(f"unknown key {section}.{key}; {section} has {', '.join(known)}")
    values.setdefault(section, {})[key] = _coerce(section, key.rstrip("_"), known[key], raw)


def parse_overrides(argv: list[str]) -> list[tuple[str, str, str]]:
    """`--section.key=value` or `--section.key value` -> [(section, key, value)]."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value (see --help)")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
            value, i = argv[i + 1], i + 1
        section, _, key = name.partition(".")
        out.append((section, key.replace("-", "_"), value))
        i += 1
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    values: dict[str, dict] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path!r} is not valid TOML: {e}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
            for key, raw in table.items():
                _apply(values, section, key, raw)
    for section, key, raw in parse_overrides(overrides or []):
        _apply(values, section, key, raw)
    built = {}
    for name, cls in _sections().items():
        try:
            built[name] = cls(**values.get(name, {}))
        except TypeError as e:
            raise ConfigError(f"[{name}]: {e}") from None
    return Config(**built)


def describe_flags() -> str:
    """`--section.key (default)` lines for --help."""
    lines = []
    for name, cls in _sections().items():
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{name}.{f.name.rstrip('_')}={default}")
    return "\n".join(lines)
