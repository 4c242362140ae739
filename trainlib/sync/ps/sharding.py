"""Cut buckets into partitions of at most `partition_mb` and spread them over the servers by bytes.

BytePS (Jiang et al., OSDI 2020, section 4) partitions tensors into ~4 MB pieces so that every
server gets an even share of the bytes and a large tensor is pipelined over several servers.
The plan is a pure function of (bucket sizes, element size, partition size, server count), so
every worker computes the same assignment without talking to the others.

Assignment: partitions in decreasing size (ties by key), each to the server with the fewest
bytes so far (ties by server index): the longest-processing-time greedy rule, whose largest
load is within one partition of the mean.
"""
from __future__ import annotations

from dataclasses import dataclass

MB = 1024 * 1024
KEY_BITS = 20  # low bits of a key: the partition index; high bits: the data-parallel group


@dataclass(frozen=True)
class Partition:
    key: int        # the server-side key (group << KEY_BITS | index)
    bucket: int     # bucket index
    offset: int     # first element in the bucket's flat buffer
    numel: int
    server: int     # index into the server list

    def nbytes(self, itemsize: int) -> int:
        return self.numel * itemsize


def plan_partitions(bucket_numels: list[int], itemsize: int | list[int], partition_mb: float,
                    n_servers: int, group: int = 0, first_index: int = 0) -> list[Partition]:
    """Partitions of every bucket (in bucket, then offset order), each assigned to a server.

    `first_index` shifts the keys, so several models synced through the same servers by the same
    group (created in the same order on every rank) do not share keys."""
    if partition_mb <= 0:
        raise ValueError(f"partition_mb={partition_mb} must be positive (MB per partition; BytePS uses about 4)")
    if n_servers < 1:
        raise ValueError(f"need at least one parameter server, got {n_servers}; pass servers=[...] or "
                         "leave it empty for one colocated server per node")
    sizes = itemsize if isinstance(itemsize, list) else [itemsize] * len(bucket_numels)
    parts: list[tuple[int, int, int]] = []
    for b, (n, isz) in enumerate(zip(bucket_numels, sizes)):
        step = max(1, int(partition_mb * MB) // isz)
        parts += [(b, off, min(step, n - off)) for off in range(0, n, step)]
    if first_index + len(parts) >= 1 << KEY_BITS:
        raise ValueError(f"{first_index + len(parts)} partitions exceed the key space ({1 << KEY_BITS}); "
                         "raise partition_mb")
    if not 0 <= group < 1 << (32 - KEY_BITS):
        raise ValueError(f"group id {group} does not fit in {32 - KEY_BITS} bits")
    load = [0] * n_servers
    server_of = [0] * len(parts)
    order = sorted(range(len(parts)), key=lambda i: (-parts[i][2] * sizes[parts[i][0]], i))
    for i in order:
        s = min(range(n_servers), key=lambda j: (load[j], j))
        server_of[i] = s
        load[s] += parts[i][2] * sizes[parts[i][0]]
    return [Partition((group << KEY_BITS) | (first_index + i), b, off, n, server_of[i])
            for i, (b, off, n) in enumerate(parts)]


def server_loads(parts: list[Partition], itemsize: int | list[int], n_servers: int) -> list[int]:
    """Bytes per server under a plan (for tests and the benchmark's report)."""
    load = [0] * n_servers
    for p in parts:
        isz = itemsize if isinstance(itemsize, int) else itemsize[p.bucket]
        load[p.server] += p.numel * isz
    return load
