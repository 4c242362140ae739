"""Colocated mode: one parameter server per node, started by the node's local rank 0.

Every rank of the job calls `colocated_servers` together (it has collectives):
  1. the token: TRAINLIB_PS_TOKEN / TRAINLIB_PS_TOKEN_FILE if set, else rank 0 makes one and
     broadcasts it (64 hex characters as a uint8 tensor over trainlib.comm);
  2. local rank 0 of each node spawns `trainlib ps-server` (port 0: no race), which exits with it;
  3. the addresses are all-gathered, so every rank gets the same list, ordered by node.
The other ranks then wait for the servers with a timeout (PSClient.hello).
"""
from __future__ import annotations

import atexit
import logging
import os

import torch

from ... import comm
from ...netif import RouteError, route_to
from ...runtime import get_runtime
from .launch import ServerHandle, spawn_server
from .token import new_token, read_token

log = logging.getLogger("trainlib")

ADDR_BYTES = 256
HOST_ENV = "TRAINLIB_PS_HOST"


def _bytes_tensor(data: bytes, size: int) -> torch.Tensor:
    if len(data) > size:
        raise ValueError(f"{data[:40]!r}... is longer than {size} bytes")
    t = torch.zeros(size, dtype=torch.uint8)
    if data:
        t[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return t


def _text(t: torch.Tensor) -> str:
    return bytes(t.tolist()).rstrip(b"\0").decode()


def shared_token(token: str | None) -> str:
    """The job's token: given, from env/file, or made by rank 0 and broadcast (all ranks call this)."""
    token = token or read_token()
    if token:
        return token
    rt = get_runtime()
    t = _bytes_tensor(new_token().encode() if rt.rank == 0 else b"", 64)
    if rt.world_size > 1:
        comm.broadcast(t, src=0)
    return _text(t)


def node_address() -> str:
    """The address this node's server binds and announces in a multi-node job: TRAINLIB_PS_HOST if
    set, else this node's address on the route to MASTER_ADDR. Not gethostbyname(gethostname()):
    on Debian and many images that is 127.0.1.1, which the other nodes cannot reach. Not 0.0.0.0:
    the server listens only where the job's traffic arrives."""
    if os.environ.get(HOST_ENV):
        return os.environ[HOST_ENV]
    master = os.environ.get("MASTER_ADDR")
    if not master:
        raise RuntimeError(f"the job spans nodes but neither {HOST_ENV} nor MASTER_ADDR is set, so the colocated "
                           f"parameter server cannot tell which address the other nodes reach; set {HOST_ENV}="
                           "<this node's IP>")
    try:
        return route_to(master).address
    except RouteError as e:
        raise RuntimeError(f"colocated parameter server: {e}; set {HOST_ENV}=<this node's IP>") from None


def colocated_servers(token: str, start_timeout_s: float = 60.0,
                      worker_timeout_s: float = 300.0) -> tuple[list[str], ServerHandle | None]:
    """Start this node's server (on local rank 0) and return every node's server address."""
    rt = get_runtime()
    single_node = rt.world_size == rt.local_world_size
    handle = None
    mine = b""
    failure = None
    if rt.local_rank == 0:
        bind_host = "127.0.0.1" if single_node else node_address()
        try:
            handle = spawn_server(f"{bind_host}:0", token=token, timeout_s=start_timeout_s,
                                  extra=("--exit-with-parent", "--worker-timeout", str(worker_timeout_s)))
        except Exception as e:  # tell the other ranks instead of leaving them in the all-gather
            failure = f"!rank {rt.rank}: {e}"[: ADDR_BYTES - 1]
            if rt.world_size == 1:
                raise
    if handle is not None:
        atexit.register(handle.stop)
        port = handle.address.rpartition(":")[2]
        mine = f"{bind_host}:{port}".encode()
        log.info("rank %d: started colocated parameter server %s (pid %d)", rt.rank, mine.decode(), handle.proc.pid)
    if rt.world_size == 1:
        return [mine.decode()], handle
    t = _bytes_tensor(failure.encode()[: ADDR_BYTES] if failure else mine, ADDR_BYTES)
    everyone = [torch.zeros_like(t) for _ in range(rt.world_size)]
    comm.all_gather(everyone, t)
    addrs = [a for a in map(_text, everyone) if a]
    failed = [a[1:] for a in addrs if a.startswith("!")]
    if failed:
        if handle is not None:
            handle.stop()
        raise RuntimeError("could not start the colocated parameter server(s): " + "; ".join(failed))
    return addrs, handle
