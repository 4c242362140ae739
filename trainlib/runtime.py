"""`tl.init()`: bring up torch.distributed from whatever launched this process.

Detection order (first match wins):
  1. an already-initialised default process group (someone else called init_process_group);
  2. a torchrun child: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
  3. mpiexec: OMPI_COMM_WORLD_* (Open MPI) or PMI_RANK/PMI_SIZE (MPICH, Intel MPI); rank 0's address
     and a free port are shared through mpi4py when MASTER_ADDR is not set;
  4. a single process: a one-rank group on an in-memory store (no port, no network).

Device and backend: CUDA -> nccl, XLA/Neuron (torch_xla importable) -> xla, CPU -> gloo.
Override with `init(backend=..., device=...)` or TRAINLIB_BACKEND / TRAINLIB_DEVICE.

Every collective has a timeout: DEFAULT_TIMEOUT_S (5 minutes), overridable by argument or
TRAINLIB_TIMEOUT_S. torch's own default (30 minutes for gloo, 10 for nccl) is far too long to
notice a dead peer in a training job that checkpoints every few minutes. `timeout_s()` is the one
place that decides it (see its docstring for the order); other modules read this process's
runtime through `current()`, `get_runtime()`, `device()` and `timeout_s()`, never the global.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import liveness

log = logging.getLogger("trainlib")

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "TRAINLIB_TIMEOUT_S"
PS_TIMEOUT_ENV = "TRAINLIB_PS_TIMEOUT_S"   # the parameter server's waits only (servers in other pods)
BACKENDS = ("gloo", "nccl", "xla", "mpi")


class LaunchError(RuntimeError):
    """The environment does not describe a job we can join; the message names what is missing."""


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job, as read from the environment (no side effects)."""

    source: str  # "torchrun" | "mpi" | "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None = None
    master_port: int | None = None


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    local_world_size: int = 1
    source: str = "single"
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_RUNTIME: Runtime | None = None   # set by init(), cleared by shutdown(); read through the accessors below


def current() -> Runtime | None:
    """The Runtime tl.init() returned in this process; None before init() and after shutdown()."""
    return _RUNTIME


def get_runtime() -> Runtime:
    """The Runtime tl.init() returned; RuntimeError naming the fix before init()."""
    if _RUNTIME is None:
        raise RuntimeError("trainlib is not initialised; call tl.init() first")
    return _RUNTIME


def device() -> torch.device:
    """This process's device as tl.init() chose it; CPU before init() (nothing chose one yet)."""
    return _RUNTIME.device if _RUNTIME is not None else torch.device("cpu")


def timeout_s(explicit: float | None = None, *, ps: bool = False) -> float:
    """Seconds a distributed wait may block before it raises CollectiveTimeout. The one lookup:

      1. `explicit`: a per-call or per-object timeout_s=... (Handle.wait, ParameterServer, Pipeline)
      2. ps=True only: TRAINLIB_PS_TIMEOUT_S (the PS's waits may need longer than the collectives')
      3. tl.init(timeout_s=...)
      4. TRAINLIB_TIMEOUT_S
      5. DEFAULT_TIMEOUT_S (300 s)

    3-5 are settled once by tl.init() and kept in the Runtime, so every wait of a job uses the same
    figure even if the environment changes later; before init() they are read now. A bad value raises
    LaunchError naming it."""
    if explicit is None and _RUNTIME is not None and not (ps and os.environ.get(PS_TIMEOUT_ENV)):
        return _RUNTIME.timeout_s
    return resolve_timeout_s(explicit, ps=ps)


def resolve_timeout_s(explicit: float | None = None, env: Mapping[str, str] | None = None, *,
                      ps: bool = False) -> float:
    """timeout_s()'s order without an initialised runtime, over `env` (default os.environ): what a
    rank started with that environment will use. Launchers and validation call this before any rank
    starts; LaunchError names a bad value and the fix."""
    env = os.environ if env is None else env
    if explicit is not None:
        value, name = explicit, "timeout_s"
    else:
        name = next((n for n in ((PS_TIMEOUT_ENV,) if ps else ()) + (TIMEOUT_ENV,) if env.get(n)), None)
        if name is None:
            return DEFAULT_TIMEOUT_S
        try:
            value = float(env[name])
        except ValueError:
            value = math.nan
    if not (math.isfinite(value) and value > 0):
        default = f"{TIMEOUT_ENV} or the default {DEFAULT_TIMEOUT_S:.0f}"
        fix = {"timeout_s": f"pass e.g. timeout_s=600, or None for {default}",
               PS_TIMEOUT_ENV: f"set e.g. {name}=600, or unset it for the collective timeout ({default})",
               TIMEOUT_ENV: f"set e.g. {name}=600, or unset it for the default {DEFAULT_TIMEOUT_S:.0f}"}[name]
        shown = env[name] if explicit is None else explicit
        raise LaunchError(f"{name}={shown!r} is not a positive number of seconds; {fix}")
    return float(value)


def _int_env(env: dict[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer; the launcher must set it to a rank or size") from None


def _first(env: dict[str, str], *names: str) -> str | None:
    for n in names:
        if env.get(n) not in (None, ""):
            return n
    return None


def detect_launch(env: dict[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's variables. Pure: it neither connects nor changes anything."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
        if world > 1 and missing:
            raise LaunchError(
                f"RANK={rank} WORLD_SIZE={world} are set but {', '.join(missing)} is not; "
                "start the job with torchrun (it sets both) or export MASTER_ADDR=<rank 0 host> MASTER_PORT=<free port>")
        local_rank = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _int_env(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        info = LaunchInfo("torchrun", rank, world, local_rank, local_world, env.get("MASTER_ADDR"),
                          int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None)
    elif (r := _first(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")) is not None:
        size_name = {"OMPI_COMM_WORLD_RANK": "OMPI_COMM_WORLD_SIZE", "PMI_RANK": "PMI_SIZE",
                     "PMIX_RANK": "PMIX_SIZE"}[r]
        if size_name not in env:
            raise LaunchError(f"{r} is set but {size_name} is not: this does not look like a complete mpiexec environment")
        rank, world = _int_env(env, r), _int_env(env, size_name)
        lr = _first(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PALS_LOCAL_RANKID")
        ls = _first(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PALS_LOCAL_SIZE")
        local_rank = _int_env(env, lr) if lr else rank
        local_world = _int_env(env, ls) if ls else world
        info = LaunchInfo("mpi", rank, world, local_rank, local_world, env.get("MASTER_ADDR"),
                          int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None)
    else:
        info = LaunchInfo("single", 0, 1, 0, 1)
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"rank {info.rank} is outside world_size {info.world_size}; check the launcher's RANK/WORLD_SIZE")
    if not 0 <= info.local_rank < info.local_world_size:
        raise LaunchError(f"local rank {info.local_rank} is outside local world size {info.local_world_size}")
    return info


def choose_device_backend(local_rank: int, backend: str | None = None, device: str | None = None,
                          env: dict[str, str] | None = None) -> tuple[torch.device, str]:
    """CUDA -> nccl, XLA -> xla, else CPU -> gloo; explicit arguments, then env, win."""
    env = os.environ if env is None else env
    backend = backend or env.get("TRAINLIB_BACKEND") or None
    device = device or env.get("TRAINLIB_DEVICE") or None
    if backend is not None and backend not in BACKENDS:
        raise LaunchError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} (or unset TRAINLIB_BACKEND)")
    if device is None:
        if backend in (None, "nccl") and torch.cuda.is_available():
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
        elif backend in (None, "xla") and _xla_available():
            device = "xla"
        else:
            device = "cpu"
    dev = _xla_device() if device == "xla" else torch.device(device)
    if backend is None:
        backend = {"cuda": "nccl", "xla": "xla"}.get(dev.type, "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise LaunchError(f"backend nccl needs a CUDA device but device is {dev}; use backend gloo on CPU")
    return dev, backend


def _xla_available() -> bool:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


def _xla_device() -> torch.device:
    import torch_xla.core.xla_model as xm

    return xm.xla_device()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it); good enough for loopback jobs."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _share_master_over_mpi(info: LaunchInfo) -> tuple[str, int]:
    """Under mpiexec nobody set MASTER_ADDR: rank 0 picks its address and a port, MPI broadcasts them."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError("started by mpiexec without MASTER_ADDR/MASTER_PORT and mpi4py is not installed; "
                          "pip install 'trainlib[mpi]' or export MASTER_ADDR and MASTER_PORT") from None
    comm = MPI.COMM_WORLD
    payload = None
    if comm.Get_rank() == 0:
        host = os.environ.get("TRAINLIB_MASTER_ADDR") or ("127.0.0.1" if info.world_size == info.local_world_size
                                                          else socket.gethostbyname(socket.gethostname()))
        payload = f"{host}:{free_port('0.0.0.0' if host != '127.0.0.1' else host)}"
    host, port = comm.bcast(payload, root=0).rsplit(":", 1)  # a short str, MPI-internal, never from the network
    return host, int(port)


def _keep_freed_cpu_memory(dev: torch.device) -> None:
    """On CPU, glibc's malloc kept from re-faulting freed tensors every step (cpu_malloc)."""
    if dev.type == "cpu":
        from . import cpu_malloc

        cpu_malloc.reuse()


def init(backend: str | None = None, device: str | None = None, timeout_s: float | None = None) -> Runtime:
    """Join (or create) the default process group and return where this process sits. Idempotent."""
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    timeout_s = resolve_timeout_s(timeout_s)
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        dev, _ = choose_device_backend(local_rank, backend, device)
        _keep_freed_cpu_memory(dev)
        _RUNTIME = Runtime(rank, world, local_rank, dev, dist.get_backend(), int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                           "existing", timeout_s)
        if world > 1:
            _start_heartbeat(rank, timeout_s, None, None)
        return _RUNTIME
    info = detect_launch()
    dev, backend = choose_device_backend(info.local_rank, backend, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    _keep_freed_cpu_memory(dev)
    if info.source == "single" or (info.world_size == 1 and not info.master_addr):  # RANK=0 WORLD_SIZE=1 alone
        store = dist.HashStore()
        dist.init_process_group("gloo" if backend == "xla" else backend, store=store, rank=0, world_size=1, timeout=timeout)
    elif backend == "xla":
        dist.init_process_group("xla", init_method="xla://", timeout=timeout)
    else:
        addr, port = info.master_addr, info.master_port
        if info.source == "mpi" and (addr is None or port is None):
            addr, port = _share_master_over_mpi(info)
        os.environ.update(MASTER_ADDR=str(addr), MASTER_PORT=str(port), RANK=str(info.rank),
                          WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                          LOCAL_WORLD_SIZE=str(info.local_world_size))
        store = _per_attempt_store(str(addr), int(port), info.world_size, timeout)
        if store is not None:
            dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=info.rank,
                                    world_size=info.world_size, timeout=timeout)
        if info.world_size > 1:
            _start_heartbeat(info.rank, timeout_s, str(addr), int(port))
    _RUNTIME = Runtime(info.rank, info.world_size, info.local_rank, dev, backend, info.local_world_size,
                       info.source, timeout_s)
    # A script that never calls shutdown() would exit with gloo's threads still joinable, and the C++
    # runtime aborts ("terminate called without an active exception", SIGABRT) in some of those exits.
    atexit.register(_shutdown_at_exit)
    log.debug("rank %d/%d: %s launch, %s on %s", info.rank, info.world_size, info.source, backend, dev)
    return _RUNTIME


def _per_attempt_store(addr: str, port: int, world_size: int, timeout: datetime.timedelta):
    """torchrun's agent store, with a key prefix per restart attempt (None outside torchrun).

    torchrun shares one TCPStore with its workers for the whole job; after a restart the new
    workers could read the gloo addresses the dead ones left there, connect to dead ports and
    hang until the timeout (seen with torch 2.13). A prefix per TORCHELASTIC_RESTART_COUNT keeps
    each attempt's keys apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"trainlib/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _start_heartbeat(rank: int, timeout_s: float, addr: str | None, port: int | None) -> None:
    """Publish this rank's liveness in the job's store (trainlib.liveness), so a collective timeout
    can name the peer it lost. Its own client to the store at addr:port (torchrun's agent store, or
    rank 0's): a read stuck on a dead store must not block c10d's client, and vice versa. Without an
    address (a group someone else made) it falls back to the default group's store."""
    from . import comm   # comm imports this module (timeout_s): import it late

    if addr is not None and port is not None:
        connect = liveness.tcp_store(addr, port)
        name = f"the job's store at {addr}:{port}"
    else:
        try:
            default = dist.distributed_c10d._get_default_store()  # private: present in torch 2.5 .. 2.13
        except (AttributeError, RuntimeError, ValueError) as e:
            log.debug("no store for heartbeats (%s): timeouts will not name the lost peer", e)
            return
        def connect(t: float):   # one shared client: its timeout is the group's
            return default
        name = "the default process group's store"
    liveness.start(rank, timeout_s, connect, name, comm.progress, addr or os.environ.get("MASTER_ADDR"))


def _shutdown_at_exit() -> None:
    try:
        shutdown()
    except Exception as e:  # exiting anyway; say why the group could not be torn down
        log.debug("shutdown at exit failed: %s", e)


def shutdown() -> None:
    """Destroy the process group (tests and the trainer call this at exit)."""
    global _RUNTIME
    liveness.stop()   # before the group goes: its last beat says "exited"
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _RUNTIME = None
