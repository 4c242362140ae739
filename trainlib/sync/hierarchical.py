"""Hierarchical all-reduce for CPU buckets when the data-parallel group spans nodes
(`tl.AllReduce(transport="hierarchical")`; what NCCL and Horovod do across nodes).

With L ranks per node and N nodes, rank (node j, local index i) owns chunk i of each bucket:

    reduce-scatter in the node (shm)   chunk i of its own buffer = sum over the node's L ranks
    all-reduce across nodes (gloo)     chunk i summed over the N ranks with local index i
    all-gather in the node (shm)       chunk i copied into the node's other L-1 buffers

Each byte crosses the network once per node instead of once per rank, and the L cross-node
all-reduces (one group per local index) run side by side. The in-node steps are the shm
transport's own chunked reduction (ShmGroup with a `cross` step between its reduce and its
write-back), so chunking, barriers and timeouts are shared with transport='shm'.

Reduce-scatter and all-gather (sharded data parallel) keep the dp group's chunks, flat.view(dp, -1):
rank (node j, local index i) reduces in the node the chunks of every rank with local index i (its
cross-node group), then the cross-node group reduce-scatters them (gloo), each keeping its own;
all-gather runs the same path backwards (cross-node all-gather, then the in-node write-back).

Node identity is shm's: sha256(hostname|boot id), or $TRAINLIB_NODE_ID (tests, emulated nodes).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import comm
from .shm import ShmGroup, why_not_on_each_node

log = logging.getLogger("trainlib")

Facts = list[tuple[int, bool, int, int]]  # per group rank: (node id, /dev/shm writable, free bytes, bytes needed)


@dataclass(frozen=True)
class NodeLayout:
    """The data-parallel group's global ranks by node; nodes ordered by their lowest rank."""

    nodes: tuple[tuple[int, ...], ...]
    rank: int

    @classmethod
    def from_facts(cls, facts: Facts, ranks: list[int], rank: int) -> "NodeLayout":
        by_node: dict[int, list[int]] = {}
        for (node, *_), r in zip(facts, ranks):
            by_node.setdefault(node, []).append(r)
        return cls(tuple(sorted(tuple(sorted(rs)) for rs in by_node.values())), rank)

    @property
    def counts(self) -> list[int]:
        return [len(n) for n in self.nodes]

    @property
    def node_index(self) -> int:
        return next(j for j, n in enumerate(self.nodes) if self.rank in n)

    @property
    def local(self) -> tuple[int, ...]:
        """The ranks of this rank's node."""
        return self.nodes[self.node_index]

    @property
    def local_index(self) -> int:
        return self.local.index(self.rank)

    @property
    def cross(self) -> tuple[int, ...]:
        """The ranks with this rank's local index, one per node: its cross-node group."""
        return self.cross_groups[self.local_index]

    @property
    def cross_groups(self) -> list[tuple[int, ...]]:
        """Every cross-node group, by local index (needs the same rank count on every node)."""
        return [tuple(n[i] for n in self.nodes) for i in range(len(self.local))]

    def describe(self) -> str:
        return ", ".join(f"node {j}: ranks {list(n)}" for j, n in enumerate(self.nodes))


def why_not(layout: NodeLayout, facts: Facts) -> str | None:
    """Why the hierarchical transport cannot serve this layout (None: it can)."""
    if len(set(layout.counts)) != 1:
        return (f"needs the same number of the data-parallel group's ranks on every node, but the nodes hold "
                f"{layout.counts} ({layout.describe()}); start the same number of processes on every node "
                "(torchrun --nproc-per-node)")
    return why_not_on_each_node(facts)


def auto_picks(layout: NodeLayout, facts: Facts) -> bool:
    """transport='auto' on a multi-node group: hierarchical when every node has >= 2 ranks (with one
    rank per node it is flat all-reduce plus overhead), the same count everywhere and room in shm."""
    if min(layout.counts) < 2:
        reason = f"needs >= 2 ranks of the group on every node, but the nodes hold {layout.counts}"
    else:
        reason = why_not(layout, facts)
    if reason is not None:
        log.info("AllReduce(transport='auto'): the group spans %d nodes; using flat torch, not hierarchical "
                 "all-reduce: it %s", len(layout.nodes), reason)
    return reason is None


def check_usable(layout: NodeLayout, facts: Facts) -> None:
    """For an explicit transport='hierarchical': raise naming the layout and the fix."""
    reason = why_not(layout, facts)
    if reason is not None:
        raise ValueError(f"transport='hierarchical' {reason}; or use transport='torch' (or 'auto', which falls "
                         "back to it)")


class CrossNode:
    """The cross-node step of one rank: collectives over the ranks with its local index, one per node."""

    def __init__(self, group, layout: NodeLayout):
        self.group, self.layout, self.rank = group, layout, dist.get_rank()
        self.ranks = dist.get_process_group_ranks(group)  # group-rank order: the order of the chunks

    def _named(self, e: comm.CollectiveTimeout, op: str, what: str) -> comm.CollectiveTimeout:
        return comm.CollectiveTimeout(f"{e} (rank {self.rank} was in the hierarchical {op}'s cross-node step of "
                                      f"{what}, with ranks {list(self.layout.cross)})")

    def all_reduce(self, chunk: torch.Tensor, what: str) -> None:
        try:
            comm.all_reduce(chunk, group=self.group)
        except comm.CollectiveTimeout as e:
            raise self._named(e, "all-reduce", what) from e

    def reduce_scatter(self, parts: list[torch.Tensor], mine: int, what: str) -> None:
        """parts[mine] := the sum over the cross-node group of parts[k] of group rank k."""
        flat = _adjacent(parts)
        try:
            comm.reduce_scatter_tensor(parts[mine], flat if flat is not None else torch.cat(parts), group=self.group)
        except comm.CollectiveTimeout as e:
            raise self._named(e, "reduce-scatter", what) from e

    def all_gather(self, parts: list[torch.Tensor], mine: int, what: str) -> None:
        """parts[k] := group rank k's parts[k], for every k."""
        flat = _adjacent(parts)
        out = flat if flat is not None else torch.empty(sum(p.numel() for p in parts), dtype=parts[0].dtype)
        try:
            comm.all_gather_into_tensor(out, parts[mine], group=self.group)
        except comm.CollectiveTimeout as e:
            raise self._named(e, "all-gather", what) from e
        if flat is None:
            for p, src in zip(parts, out.view(len(parts), -1)):
                p.copy_(src)


def _adjacent(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """One flat view over `parts` when they follow each other in one buffer (no staging copy), else None."""
    p0, size = parts[0], parts[0].numel() * parts[0].element_size()
    if not all(p.is_contiguous() and p.data_ptr() == p0.data_ptr() + k * size for k, p in enumerate(parts)):
        return None
    return p0.as_strided((p0.numel() * len(parts),), (1,))  # from p0's storage offset on


def build_group(group, timeout_s: float, layout: NodeLayout) -> ShmGroup:
    """This node's ShmGroup whose owned chunks are reduced across nodes in between.

    Collective over `group`: first the cross-node groups, one per local index (comm.subgroups),
    then every rank sets up its node's shared memory."""
    cross = None
    if len(layout.nodes) > 1:
        cross = CrossNode(comm.subgroups([list(c) for c in layout.cross_groups], group, timeout_s), layout)
    log.debug("hierarchical all-reduce: %s; local index %d, cross-node group %s", layout.describe(),
              layout.local_index, list(layout.cross))
    return ShmGroup(group, timeout_s, members=list(layout.local), tag=f"-n{layout.node_index}", cross=cross,
                    owners=cross.ranks if cross is not None else None)
