"""Named device mesh: axes pp (outermost), dp, tp (innermost).

tp is innermost so a tensor-parallel group is made of consecutive ranks, i.e. the GPUs of one node
that talk over NVLink; pp is outermost so pipeline stages can straddle nodes (Megatron's order).

    rank = (pp_idx * dp + dp_idx) * tp + tp_idx

`MeshLayout` is the pure layout math (no process group, unit-testable); `Mesh` adds the process
groups, one per axis for this rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist

AXES = ("pp", "dp", "tp")


class MeshError(ValueError):
    """An impossible mesh; the message has the sizes and the fix."""


def resolve_sizes(world_size: int, pp: int = 1, dp: int = -1, tp: int = 1) -> dict[str, int]:
    """Fill in the one axis given as -1 and check that the product is the world size."""
    sizes = {"pp": pp, "dp": dp, "tp": tp}
    for axis, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or (n < 1 and n != -1):
            raise MeshError(f"{axis}={n!r} must be a positive integer, or -1 to infer it from world_size {world_size}")
    inferred = [a for a, n in sizes.items() if n == -1]
    if len(inferred) > 1:
        raise MeshError(f"{' and '.join(inferred)} are both -1; at most one axis can be inferred (set the others)")
    known = math.prod(n for n in sizes.values() if n != -1)
    shown = " * ".join(f"{a}({n})" for a, n in sizes.items())
    if inferred:
        if world_size % known:
            raise MeshError(f"{shown}: world_size {world_size} is not divisible by {known}, "
                            f"so {inferred[0]} cannot be inferred; pick sizes whose product divides {world_size}")
        sizes[inferred[0]] = world_size // known
    elif known != world_size:
        raise MeshError(f"{shown} = {known} != world_size {world_size}; set dp=-1 to infer it")
    return sizes


@dataclass(frozen=True)
class MeshLayout:
    pp: int
    dp: int
    tp: int

    @classmethod
    def build(cls, world_size: int, pp: int = 1, dp: int = -1, tp: int = 1) -> "MeshLayout":
        return cls(**resolve_sizes(world_size, pp, dp, tp))

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def size(self, axis: str) -> int:
        _check_axis(axis)
        return getattr(self, axis)

    def coords(self, rank: int) -> dict[str, int]:
        if not 0 <= rank < self.world_size:
            raise MeshError(f"rank {rank} is outside the mesh of {self.world_size} ranks")
        return {"pp": rank // (self.dp * self.tp), "dp": (rank // self.tp) % self.dp, "tp": rank % self.tp}

    def rank_of(self, pp: int = 0, dp: int = 0, tp: int = 0) -> int:
        for axis, i in (("pp", pp), ("dp", dp), ("tp", tp)):
            if not 0 <= i < self.size(axis):
                raise MeshError(f"{axis} index {i} is outside 0..{self.size(axis) - 1}")
        return (pp * self.dp + dp) * self.tp + tp

    def groups(self, axis: str) -> list[list[int]]:
        """Every group along `axis`: ranks that differ only in that coordinate, in rank order."""
        _check_axis(axis)
        others = [a for a in AXES if a != axis]
        out = []
        for i in range(self.size(others[0])):
            for j in range(self.size(others[1])):
                base = {others[0]: i, others[1]: j}
                out.append([self.rank_of(**base, **{axis: k}) for k in range(self.size(axis))])
        return sorted(out)

    def group_ranks(self, axis: str, rank: int) -> list[int]:
        """The ranks of `rank`'s group along `axis`."""
        c = self.coords(rank)
        return [self.rank_of(**{**c, axis: k}) for k in range(self.size(axis))]


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise MeshError(f"unknown mesh axis {axis!r}; the axes are {', '.join(AXES)}")


_GROUPS: dict[tuple[str, tuple[int, ...]], tuple[object, object]] = {}   # (backend, ranks) -> (WORLD, group)


def _axis_group(ranks: list[int], backend: str):
    """The process group of `ranks`, made once per process group world: a group holds sockets (gloo)
    or communicators (NCCL) until the world is destroyed, so a process that builds many meshes (a
    sweep, a benchmark, Ray actors reused across trials) would run out of file descriptors. new_group
    must be called by all ranks for every group in the same order; every rank builds the same meshes in
    the same order, so all hit or all miss this cache together."""
    world = dist.group.WORLD
    hit = _GROUPS.get((backend, tuple(ranks)))
    if hit is not None and hit[0] is world:
        return hit[1]
    g = dist.new_group(ranks, backend=backend)
    _GROUPS[(backend, tuple(ranks))] = (world, g)
    return g


class Mesh:
    """`tl.Mesh(pp=1, dp=-1, tp=1)`: the layout plus one process group per axis for this rank.

    Every rank must build the same mesh (new_group is collective over the whole world)."""

    def __init__(self, pp: int = 1, dp: int = -1, tp: int = 1, *, world_size: int | None = None,
                 rank: int | None = None):
        if world_size is None or rank is None:
            if not dist.is_initialized():
                raise MeshError("Mesh needs a process group: call tl.init() first "
                                "(or use MeshLayout for the pure layout math)")
            world_size = dist.get_world_size() if world_size is None else world_size
            rank = dist.get_rank() if rank is None else rank
        self.layout = MeshLayout.build(world_size, pp, dp, tp)
        self.rank_global = rank
        self._groups: dict[str, object] = {}
        if dist.is_initialized():
            backend = dist.get_backend()
            for axis in AXES:
                for ranks in self.layout.groups(axis):
                    g = _axis_group(ranks, backend) if len(ranks) < world_size else dist.group.WORLD
                    if rank in ranks:
                        self._groups[axis] = g

    def group(self, axis: str):
        """This rank's process group along `axis`."""
        _check_axis(axis)
        return self._groups[axis]

    def rank(self, axis: str) -> int:
        return self.layout.coords(self.rank_global)[axis]

    def size(self, axis: str) -> int:
        return self.layout.size(axis)

    def coords(self) -> dict[str, int]:
        return self.layout.coords(self.rank_global)

    def group_ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's group along `axis` (for p2p peers and broadcasts)."""
        return self.layout.group_ranks(axis, self.rank_global)

    def __repr__(self) -> str:
        return f"Mesh(pp={self.layout.pp}, dp={self.layout.dp}, tp={self.layout.tp}, rank={self.rank_global})"
