"""Hierarchical all-reduce for CPU buckets when the data-parallel group spans nodes
(`tl.AllReduce(transport="hierarchical")`; what NCCL and Horovod do across nodes).

With L ranks per node and N nodes, rank (node j, local index i) owns chunk i of each bucket:

    reduce-scatter in the node (shm)   chunk i of its own buffer = sum over the node's L ranks
    all-reduce across nodes (gloo)     chunk i summed over the N ranks with local index i
    all-gather in the node (shm)       chunk i copied into the node's other L-1 buffers

Each byte crosses the network once per node instead of once per rank, and the L cross-node
all-reduces (one group per local index) run side by side. The in-node steps are the shm
transport's own chunked reduction (ShmGroup with an `across` step between its reduce and its
write-back), so chunking, barriers and timeouts are shared with transport='shm'.

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


def build_group(group, timeout_s: float, layout: NodeLayout) -> ShmGroup:
    """This node's ShmGroup whose owned chunks are all-reduced across nodes in between.

    Collective over `group`: first the cross-node groups, one per local index (comm.subgroups),
    then every rank sets up its node's shared memory."""
    cross = None
    if len(layout.nodes) > 1:
        cross = comm.subgroups([list(c) for c in layout.cross_groups], group, timeout_s)
    rank = dist.get_rank()

    def across(chunk: torch.Tensor, what: str) -> None:
        try:
            comm.all_reduce(chunk, group=cross)
        except comm.CollectiveTimeout as e:
            raise comm.CollectiveTimeout(f"{e} (rank {rank} was in the hierarchical all-reduce's cross-node step "
                                         f"of {what}, with ranks {list(layout.cross)})") from e

    log.debug("hierarchical all-reduce: %s; local index %d, cross-node group %s", layout.describe(),
              layout.local_index, list(layout.cross))
    return ShmGroup(group, timeout_s, members=list(layout.local), tag=f"-n{layout.node_index}",
                    across=across if cross is not None else None)
