"""Group-relative advantages: each prompt's K candidates are compared with each other, not with a fixed bar.

A candidate's sample reward is the mean of its reward map. Its sample advantage is that reward minus its group's
mean (divided by the group's standard deviation plus epsilon, optionally). Its dense advantage does the same per
token position: its map minus the group's mean map, over the group's per-position standard deviation. A constant
map therefore gives every token the sample advantage. A group without spread (every candidate alike) gets zero
advantage everywhere: it says nothing about what to draw, and it is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GroupAdvantages:
    """Per image: ``sample`` (B,) advantages, ``tokens`` a (rows, cols) map each; ``informative`` (B,) whether its
    group had spread; ``flat_groups`` how many groups had none."""

    rewards: Tensor
    sample: Tensor
    tokens: list[Tensor]
    informative: Tensor
    flat_groups: int


def _standardise(values: Tensor, scale: bool, eps: float) -> Tensor:
    """values (G, K, ...) centred over K, divided by the std over K (population) plus eps when ``scale``; exactly 0
    where the K values are equal (a rounded mean would leave a residue that eps then magnifies)."""
    centred = values - values.mean(1, keepdim=True)
    standardised = centred / (values.std(1, unbiased=False, keepdim=True) + eps) if scale else centred
    alike = (values == values[:, :1]).all(1, keepdim=True)
    return standardised.masked_fill(alike, 0.0)


def group_advantages(reward_maps: list[Tensor], group_size: int, credit: str = "dense", scale: bool = True,
                     eps: float = 1e-4) -> GroupAdvantages:
    """Advantages of B = G * K images whose maps come group after group (the K candidates of a prompt adjacent,
    sharing a token grid). ``credit`` sample gives each token its image's sample advantage."""
    count = len(reward_maps)
    if group_size < 2 or count % group_size:
        raise ValueError(f"group_advantages: expected groups of K >= 2 candidates filling the batch, got K = "
                         f"{group_size} for {count} images")
    grid = reward_maps[0].shape
    if any(m.shape != grid for m in reward_maps):
        raise ValueError("group_advantages: expected the candidates of a batch to share one token grid, got "
                         f"{sorted({tuple(m.shape) for m in reward_maps})}")
    maps = torch.stack(reward_maps).double().view(count // group_size, group_size, *grid)
    rewards = maps.mean((2, 3))
    sample = _standardise(rewards, scale, eps)
    if credit == "dense":
        tokens = _standardise(maps, scale, eps)
        spread = (maps != maps[:, :1]).flatten(1).any(1)
    else:
        tokens = sample[:, :, None, None].expand_as(maps)
        spread = (rewards != rewards[:, :1]).any(1)
    dtype = reward_maps[0].dtype
    return GroupAdvantages(rewards.flatten().to(dtype), sample.flatten().to(dtype),
                           list(tokens.reshape(count, *grid).to(dtype).unbind()),
                           spread.repeat_interleave(group_size), int((~spread).sum()))


def advantage_weights(advantages: GroupAdvantages, group_size: int, beta: float, max_weight: float) -> list[Tensor]:
    """Token weights exp(beta A) normalised to mean 1 over each group's tokens, clipped to [0, max_weight]; zero
    for groups without spread (they would otherwise fine-tune on whatever was drawn)."""
    tokens = torch.stack(advantages.tokens).double()
    grouped = torch.exp(beta * tokens).view(-1, group_size * tokens[0].numel())
    weights = (grouped / grouped.mean(1, keepdim=True)).clamp(max=max_weight).view_as(tokens)
    weights = weights * advantages.informative.to(weights.dtype)[:, None, None]
    return list(weights.to(advantages.tokens[0].dtype).unbind())
