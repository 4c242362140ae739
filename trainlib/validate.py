"""Everything about a `trainlib train` run that can be known before any rank starts.

    warnings = check_run(cfg, world_size=4, nodes=1)   # raises ConfigError naming the value and the fix

The launching process (`trainlib train` before it starts torchrun, `trainlib launch` before it
runs torchrun's agent) calls this, so a bad value costs one line and exit 1 instead of a
traceback from every rank. A rank started by some other launcher runs the same checks itself.
Single values are checked where they are parsed (config.py); here live the checks that relate
values to each other, to the mesh, to the environment and to the filesystem. Values that do not
apply to the chosen layout either raise (the run would not do what was asked) or come back as
one-line warnings (a tuning knob with nothing to tune).
"""
from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import fields

from .config import Config, ConfigError
from .mesh import MeshError, MeshLayout


def check_run(cfg: Config, world_size: int, nodes: int = 1, env: dict[str, str] | None = None,
              resolve: bool = True) -> list[str]:
    """Check cfg for a job of `world_size` ranks on `nodes` nodes; return warnings, raise ConfigError.

    resolve=False skips name lookups of the parameter servers: in a pod that starts before the
    servers' pods, their DNS names do not exist yet, which is no reason to fail the job for good."""
    env = dict(os.environ if env is None else env)
    layout = mesh_layout(cfg, world_size)
    check_model_over_mesh(cfg, layout)
    check_batch(cfg, layout)
    check_pipeline(cfg, layout)
    check_sync(cfg, layout, nodes, env, resolve)
    check_env(env)
    check_paths(cfg)
    check_observe(cfg)
    from .validate_checkpoint import check_checkpoint

    check_checkpoint(cfg, layout)
    return not_applicable(cfg, layout)


def mesh_layout(cfg: Config, world_size: int) -> MeshLayout:
    try:
        return MeshLayout.build(world_size, cfg.mesh.pp, cfg.mesh.dp, cfg.mesh.tp)
    except MeshError as e:
        raise ConfigError(f"mesh: {e}") from None


def check_model_over_mesh(cfg: Config, layout: MeshLayout) -> None:
    """Tensor parallel splits heads, the MLP and the vocabulary; pipeline parallel splits layers."""
    m, tp = cfg.model, layout.tp
    if tp > 1:
        for key, n in (("n_head", m.n_head), ("vocab_size", m.vocab_size)):
            if n % tp:
                raise ConfigError(f"model.{key}={n} is not divisible by tp={tp} (tensor parallel splits it over "
                                  f"the tp ranks); set --mesh.tp to a divisor of {n} or --model.{key} to a multiple "
                                  f"of {tp}")
    if cfg.sync.kind == "ddp" and (layout.pp > 1 or tp > 1):
        raise ConfigError(f"sync.kind=ddp (torch DDP) cannot wrap pipeline or tensor-parallel stages "
                          f"(pp={layout.pp}, tp={tp}); use --sync.kind allreduce")
    if layout.pp > 1:
        stages = layout.pp * cfg.mesh.virtual_stages
        layers = m.n_layer + 2  # the GPT's pipeline layers: [embed, *blocks, final]
        if layers < stages:
            raise ConfigError(f"model.n_layer={m.n_layer} gives {layers} pipeline layers (embedding, blocks, head) "
                              f"for {stages} stages (pp={layout.pp}{' x 2 virtual' if stages > layout.pp else ''}); "
                              f"every stage needs a layer: set --model.n_layer >= {stages - 2} or a smaller --mesh.pp")


def microbatches(cfg: Config, layout: MeshLayout) -> int:
    return cfg.mesh.microbatches or 2 * layout.pp


def check_batch(cfg: Config, layout: MeshLayout) -> None:
    """train.batch_size is global: it splits over dp, then (pp > 1) into microbatches."""
    t, dp = cfg.train, layout.dp
    if t.batch_size % dp:
        up = dp * -(-t.batch_size // dp)
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by dp={dp} (the global batch splits "
                          f"over dp ranks); use a multiple of {dp}, e.g. --train.batch_size {up}")
    if layout.pp > 1:
        per_rank, m = t.batch_size // dp, microbatches(cfg, layout)
        if per_rank % m:
            raise ConfigError(f"train.batch_size={t.batch_size} / dp {dp} = {per_rank} sequences per rank is not "
                              f"divisible by {m} microbatches (mesh.microbatches={cfg.mesh.microbatches}, 0 = 2 * pp); "
                              f"make --train.batch_size a multiple of {dp * m} or set --mesh.microbatches")
    # the corpus is bytes, one token each (data.ByteTokenizer); windows of seq_len + 1 tokens
    windows = (t.corpus_bytes - 1) // cfg.model.seq_len
    if windows < t.batch_size:
        raise ConfigError(f"train.corpus_bytes={t.corpus_bytes} holds {windows} windows of model.seq_len="
                          f"{cfg.model.seq_len}, fewer than one batch of {t.batch_size}; raise --train.corpus_bytes "
                          f"to at least {t.batch_size * cfg.model.seq_len + 1}")


def check_pipeline(cfg: Config, layout: MeshLayout) -> None:
    from .pipeline import SCHEDULES, ScheduleError, build_schedule

    name = cfg.mesh.schedule
    if cfg.mesh.microbatches < 0:
        raise ConfigError(f"mesh.microbatches={cfg.mesh.microbatches} must be >= 0 (0 = 2 * pp)")
    if layout.pp == 1:
        try:
            build_schedule(name, 1, 1)
        except ScheduleError:
            raise ConfigError(f"mesh.schedule={name!r} is not one of {', '.join(SCHEDULES)}") from None
        return
    try:
        build_schedule(name, layout.pp, microbatches(cfg, layout))
    except ScheduleError as e:
        raise ConfigError(f"mesh.schedule={name!r} with pp={layout.pp}: {e}") from None


def check_sync(cfg: Config, layout: MeshLayout, nodes: int, env: dict[str, str], resolve: bool = True) -> None:
    from .sync.allreduce import TRANSPORTS

    s = cfg.sync
    if s.transport not in TRANSPORTS:
        raise ConfigError(f"sync.transport={s.transport!r} is not one of {', '.join(TRANSPORTS)}; "
                          "auto picks the fastest that works here")
    if s.kind == "allreduce":
        if s.transport == "mpi" and not _started_by_mpi(env):
            raise ConfigError("sync.transport=mpi needs ranks started by mpiexec (mpiexec -n N trainlib launch -- "
                              "trainlib train ...); use --sync.transport auto or torch")
        if s.transport == "mpi" and s.compress != "none":
            raise ConfigError(f"sync.compress={s.compress} is not supported by sync.transport=mpi (MPI has no 16-bit "
                              "float sum); use --sync.transport torch or --sync.compress none")
        if s.transport == "hierarchical" and nodes < 2:
            raise ConfigError("sync.transport=hierarchical needs ranks on >= 2 nodes and this job has 1; use "
                              "--sync.transport shm (or auto) on one node")
    if s.kind == "ps":
        from .sync.ps.protocol import DEFAULT_MAX_BYTES

        cap_mb = DEFAULT_MAX_BYTES // 2**20
        if s.partition_mb * 2**20 > DEFAULT_MAX_BYTES:
            raise ConfigError(f"sync.partition_mb={s.partition_mb} exceeds the servers' frame cap of {cap_mb} MB; "
                              f"use --sync.partition_mb <= {cap_mb} (BytePS uses about 4)")
        given = False
        for where, addrs in (("sync.servers", s.servers), ("TRAINLIB_PS_ADDRS", env.get("TRAINLIB_PS_ADDRS", ""))):
            for addr in (a.strip() for a in addrs.split(",")):
                if addr:
                    check_address(where, addr, resolve)
                    given = True
        _check_ps_token(env, given)


def _check_ps_token(env: dict[str, str], servers_given: bool) -> None:
    """Servers started elsewhere share a token with the workers; colocated ones make their own."""
    from .sync.ps.token import TokenError, read_token

    try:
        token = read_token(env=env)
    except TokenError as e:
        raise ConfigError(str(e)) from None
    if servers_given and not token:
        raise ConfigError("sync.servers / TRAINLIB_PS_ADDRS name parameter servers but there is no token: set "
                          "TRAINLIB_PS_TOKEN or TRAINLIB_PS_TOKEN_FILE (the Secret the servers mount), or leave "
                          "sync.servers empty for colocated servers")


def _started_by_mpi(env: dict[str, str]) -> bool:
    return any(k in env for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"))


def check_address(where: str, addr: str, resolve: bool = True) -> None:
    """HOST:PORT with a port in 1..65535 and a host this machine can resolve."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")  # [::1]:5555
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {addr!r} is not HOST:PORT with a port in 1..65535; e.g. 10.0.0.5:5555")
    if not resolve:
        return
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"{where}: host {host!r} in {addr!r} does not resolve ({e}); check the name, or give an "
                          "IP address") from None


def check_env(env: dict[str, str]) -> None:
    """The TRAINLIB_* variables the ranks read, parsed here with the ranks' own parsers."""
    from .runtime import LaunchError, choose_device_backend, resolve_timeout_s

    try:
        resolve_timeout_s(env=env)
        resolve_timeout_s(env=env, ps=True)
    except LaunchError as e:
        raise ConfigError(str(e)) from None
    if env.get("TRAINLIB_BACKEND") or env.get("TRAINLIB_DEVICE"):
        try:
            choose_device_backend(0, env.get("TRAINLIB_BACKEND") or None, env.get("TRAINLIB_DEVICE") or None)
        except LaunchError as e:
            raise ConfigError(f"TRAINLIB_BACKEND={env.get('TRAINLIB_BACKEND', '')!r} TRAINLIB_DEVICE="
                              f"{env.get('TRAINLIB_DEVICE', '')!r}: {e}") from None
    spec = env.get("TRAINLIB_FAULT_KILL_AT_STEP")
    if spec:
        from .testing import parse_fault_spec  # only when the fault variable is set (see checkpoint.hooks)

        try:
            parse_fault_spec(spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_paths(cfg: Config) -> None:
    """Create what the run will write to and prove it is writable, so a bad path fails now and not
    at the first save an hour in. (os.access is not enough: root passes it on read-only mounts.)"""
    if cfg.checkpoint.dir:
        _writable_dir("checkpoint.dir", cfg.checkpoint.dir, cfg.checkpoint.dir)
    metrics = cfg.train.metrics
    if os.path.isdir(metrics):
        raise ConfigError(f"train.metrics={metrics!r} is a directory; give a file path, e.g. {metrics.rstrip('/')}"
                          "/metrics.jsonl")
    _writable_dir("train.metrics", metrics, os.path.dirname(os.path.abspath(metrics)))


def check_observe(cfg: Config) -> None:
    """The sinks and the trace directory, before launch: a bad --observe.* value should not wait for
    rank 0's first step (or a profiler window an hour in) to fail."""
    o = cfg.observe
    if o.prometheus:
        from .observe.prometheus import parse_address

        try:
            parse_address(o.prometheus, "observe.prometheus")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if o.mlflow:
        from .observe.mlflow_sink import check_tracking_uri

        check_tracking_uri(o.mlflow)
        if not o.mlflow_experiment.strip():
            raise ConfigError(f"observe.mlflow_experiment={o.mlflow_experiment!r} is empty; name the MLflow experiment "
                              "(--observe.mlflow_experiment NAME), or leave it at its default, trainlib")
    if o.tensorboard:
        _writable_dir("observe.tensorboard", o.tensorboard, o.tensorboard)
    if cfg.profile.window is not None:
        _writable_dir("profile.dir", cfg.profile.dir, cfg.profile.dir)


def _writable_dir(key: str, value: str, path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".trainlib-probe-"):
            pass
    except OSError as e:
        blocker = _first_file_on(path)
        why = f"{blocker!r} is a file, not a directory" if blocker else (e.strerror or str(e))
        raise ConfigError(f"{key}={value!r} cannot be created or written ({why}); choose a path in a writable "
                          "directory") from None


def _first_file_on(path: str) -> str | None:
    """The first existing non-directory among path's ancestors (a file where a directory must be)."""
    parts, cur = os.path.abspath(path).split(os.sep)[1:], os.sep
    for part in parts:
        cur = os.path.join(cur, part)
        if os.path.exists(cur) and not os.path.isdir(cur):
            return cur
        if not os.path.exists(cur):
            return None
    return None


def _changed(section, name: str) -> bool:
    """Whether a field differs from its default: a default was not chosen, so it cannot be misplaced."""
    default = next(f.default for f in fields(section) if f.name == name)
    return getattr(section, name) != default


def not_applicable(cfg: Config, layout: MeshLayout) -> list[str]:
    """Values the chosen layout would ignore: raise when the run would not do what they ask for,
    return a warning when they only tune something this layout does not have."""
    s, m, warnings = cfg.sync, cfg.mesh, []
    ps_only = [k for k in ("mode", "servers") if _changed(s, k)]
    if s.kind != "ps" and ps_only:
        k = ps_only[0]
        raise ConfigError(f"sync.{k}={getattr(s, k)!r} only applies to sync.kind=ps, not {s.kind}; drop it or set "
                          "--sync.kind ps")
    if s.kind == "ps" and _changed(s, "compress"):
        raise ConfigError(f"sync.compress={s.compress} applies to sync.kind=allreduce; with sync.kind=ps the "
                          "gradients go to the servers uncompressed; drop it or set --sync.kind allreduce")
    if s.kind == "ddp" and _changed(s, "compress"):
        raise ConfigError(f"sync.compress={s.compress} is not supported with sync.kind=ddp (the torch DDP "
                          "reference); drop it or set --sync.kind allreduce")
    if s.kind != "allreduce" and _changed(s, "transport"):
        raise ConfigError(f"sync.transport={s.transport} applies to sync.kind=allreduce, not {s.kind}; drop it or "
                          "set --sync.kind allreduce")
    if s.kind == "ps" and s.mode == "async" and layout.pp > 1:
        raise ConfigError(f"sync.mode=async cannot drive pipeline stages (pp={layout.pp}): the asynchronous parameter "
                          "server exchanges weights in the forward a pipeline schedule does not call; use "
                          "--sync.mode sync or --sync.kind allreduce")
    sharded = cfg.dp.shard != "none" or cfg.train.precision != "fp32"
    if sharded and s.kind != "allreduce":
        what = f"dp.shard={cfg.dp.shard}" if cfg.dp.shard != "none" else f"train.precision={cfg.train.precision}"
        raise ConfigError(f"{what} needs sync.kind=allreduce (it reduce-scatters gradient buckets and keeps fp32 "
                          f"master slices); sync.kind={s.kind} keeps whole fp32 gradients; set --sync.kind allreduce")
    if cfg.dp.shard != "none" and layout.dp == 1:
        warnings.append(f"dp.shard={cfg.dp.shard} has no effect with dp=1 (nothing to shard over); drop it or use "
                        "more data-parallel ranks")
    if s.kind != "ps" and _changed(s, "partition_mb"):
        warnings.append(f"sync.partition_mb={s.partition_mb} has no effect with sync.kind={s.kind} (it sizes the "
                        "parameter server's partitions); drop it")
    if layout.pp == 1:
        for k in ("schedule", "microbatches"):
            if _changed(m, k):
                warnings.append(f"mesh.{k}={getattr(m, k)!r} has no effect with pp=1 (no pipeline); drop it or set "
                                "--mesh.pp > 1")
    if not cfg.checkpoint.dir:
        for k in ("every", "keep"):
            if _changed(cfg.checkpoint, k):
                warnings.append(f"checkpoint.{k}={getattr(cfg.checkpoint, k)} has no effect without checkpoint.dir; "
                                "set --checkpoint.dir to save checkpoints")
    if cfg.train.warmup_steps >= cfg.train.steps and _changed(cfg.train, "warmup_steps"):
        warnings.append(f"train.warmup_steps={cfg.train.warmup_steps} >= train.steps={cfg.train.steps}: the learning "
                        "rate never reaches train.lr; lower the warmup")
    return warnings

