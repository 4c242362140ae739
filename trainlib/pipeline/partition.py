"""Split a list of layers into contiguous pipeline stages, balanced by parameter count.

Balanced = minimise the largest stage (the pipeline runs at the speed of its slowest stage):
binary search on the capacity, greedy fill (the classic linear-partition bound).
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn


class PartitionError(ValueError):
    """Layers cannot be split as asked; the message says why and how to fix it."""


def layer_costs(layers: Sequence[nn.Module]) -> list[int]:
    # a parameter-free layer still costs something (activations, time): count it as one parameter
    return [max(1, sum(p.numel() for p in layer.parameters())) for layer in layers]


def _fits(costs: list[int], parts: int, cap: int) -> bool:
    n, load = 1, 0
    for c in costs:
        if c > cap:
            return False
        if load + c > cap:
            n, load = n + 1, 0
        load += c
    return n <= parts


def balance(costs: Sequence[int], parts: int) -> list[int]:
    """Boundaries b_0=0 < b_1 < ... < b_parts=len(costs): stage i holds layers [b_i, b_{i+1}).

    Every stage gets at least one layer; the largest stage sum is minimal."""
    costs = list(costs)
    if parts < 1 or parts > len(costs):
        raise PartitionError(f"cannot split {len(costs)} layers into {parts} stages: every stage needs at least "
                             f"one layer; use at most {len(costs)} stages (pp * virtual_stages) or split the model finer")
    lo, hi = max(costs), sum(costs)
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(costs, parts, mid):
            hi = mid
        else:
            lo = mid + 1
    # greedy fill at the optimal capacity, leaving enough layers for the remaining stages
    bounds, load = [0], 0
    for i, c in enumerate(costs):
        remaining_stages = parts - len(bounds)
        if i > bounds[-1] and (load + c > lo or len(costs) - i == remaining_stages):
            bounds.append(i)
            load = 0
        load += c
        if len(bounds) == parts:
            break
    bounds.append(len(costs))
    return bounds


def check_boundaries(bounds: Sequence[int], n_layers: int, parts: int) -> list[int]:
    """Validate user-given boundaries (same format as `balance`)."""
    b = list(bounds)
    if len(b) != parts + 1 or b[0] != 0 or b[-1] != n_layers or any(x >= y for x, y in zip(b, b[1:])):
        raise PartitionError(f"boundaries {b} must be {parts + 1} strictly increasing numbers from 0 to {n_layers} "
                             f"(stage i holds layers [b[i], b[i+1])), for {parts} stages over {n_layers} layers")
    return b
