"""What each rank holds of each FSDP2 unit: ``fully_shard`` splits every parameter along dim 0 the way
``torch.chunk`` does (ranks past the end hold nothing), and pads every rank's storage to the first rank's size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from srum.train.parallel import fsdp_units


def shard_rows(rows: int, world: int, rank: int) -> int:
    """Rows of a dim-0 chunk: ``ceil(rows / world)`` each, the last ones short or empty."""
    chunk = math.ceil(rows / world)
    return max(0, min(rows, (rank + 1) * chunk) - rank * chunk)


def shard_numel(shape: tuple[int, ...], world: int, rank: int) -> int:
    rows, rest = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    return shard_rows(rows, world, rank) * rest


@dataclass(frozen=True)
class UnitSize:
    """Elements of one unit's own parameters: whole, trainable, and one rank's shards of each."""

    name: str
    numel: int
    trainable: int
    shard: int
    trainable_shard: int
    reshard_after_forward: bool


def unit_sizes(model: nn.Module, world: int, rank: int = 0) -> list[UnitSize]:
    """Per unit of :func:`srum.train.parallel.fsdp_units`, its own parameters (those no inner unit took)."""
    claimed: set[int] = set()
    sizes = []
    for unit in fsdp_units(model):
        own = [p for module in unit.modules for p in module.parameters() if id(p) not in claimed]
        own = list({id(p): p for p in own}.values())
        claimed.update(id(p) for p in own)
        shapes = [(tuple(p.shape), p.requires_grad) for p in own]
        sizes.append(UnitSize(unit.name, sum(math.prod(s) for s, _ in shapes),
                              sum(math.prod(s) for s, trained in shapes if trained),
                              sum(shard_numel(s, world, rank) for s, _ in shapes),
                              sum(shard_numel(s, world, rank) for s, trained in shapes if trained),
                              unit.reshard_after_forward))
    return sizes
