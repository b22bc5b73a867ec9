"""The constrained dense-reward flow loss over a whole ragged batch at once (the CPU fast path)."""

from __future__ import annotations

from torch import Tensor

from srum.loss.bilinear import sample_maps
from srum.loss.config import LossConfig


def token_weighted_loss(velocity: Tensor, target: Tensor, constraint_target: Tensor | None, rewards: Tensor,
                        config: LossConfig, num_tokens: float | None = None) -> Tensor:
    """The loss from per-token rewards (N,); see ``srum.loss.reference.reference_loss`` for the terms."""
    normaliser = velocity.shape[0] if num_tokens is None else num_tokens
    rewards = rewards.to(velocity.dtype)
    error = (velocity - target).pow(2).mean(-1)  # (N,)
    if config.signed == "hinge":
        weighted = rewards.clamp(min=0) * error + (-rewards).clamp(min=0) * (config.margin - error).clamp(min=0)
    else:
        weighted = rewards * error
    total = weighted.sum()
    if config.constraint != "none" and config.constraint_weight:
        total = total + config.constraint_weight * (velocity - constraint_target).pow(2).mean(-1).sum()
    return total / normaliser


def vectorised_loss(velocity: Tensor, target: Tensor, constraint_target: Tensor | None, reward_maps: list[Tensor],
                    grids: list[tuple[int, int]], config: LossConfig, num_tokens: float | None = None) -> Tensor:
    """Same arguments and result as ``reference_loss``; one gather samples every map."""
    rewards = sample_maps([m.to(velocity.dtype) for m in reward_maps], grids)
    return token_weighted_loss(velocity, target, constraint_target, rewards, config, num_tokens)
