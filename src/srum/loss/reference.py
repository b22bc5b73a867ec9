"""The constrained dense-reward flow loss written plainly, image by image, as the official code computes it.

This is the ground truth every fast path is tested against (run it in float64 for that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from srum.loss.config import LossConfig


def reference_loss(velocity: Tensor, target: Tensor, constraint_target: Tensor | None, reward_maps: list[Tensor],
                   grids: list[tuple[int, int]], config: LossConfig, num_tokens: float | None = None) -> Tensor:
    """Args:
        velocity: (N, C) predicted velocities of the loss tokens, image after image, row-major.
        target: (N, C) flow target of the scored image, ``noise - x0``.
        constraint_target: (N, C) what the constraint pulls toward (None when ``config.constraint`` is none).
        reward_maps: per image a (Hm, Wm) map; it is sampled bilinearly onto the image's token grid.
        grids: per image (rows, cols) of latent tokens.
        num_tokens: the normaliser N (default: the tokens given; a trainer passes the global count).
    Returns:
        the scalar loss ``sum_i w(r_i, e_i) / N + lambda * sum_i mean_c (v - constraint)^2 / N``.
    """
    normaliser = velocity.shape[0] if num_tokens is None else num_tokens
    dtype = torch.float64 if velocity.dtype == torch.float64 else torch.float32  # bf16 inputs sum in float32
    velocity, target = velocity.to(dtype), target.to(dtype)
    constraint_target = None if constraint_target is None else constraint_target.to(dtype)
    total, start = velocity.new_zeros(()), 0
    for reward_map, (rows, cols) in zip(reward_maps, grids, strict=True):
        end = start + rows * cols
        rewards = F.interpolate(reward_map[None, None].to(velocity.dtype), size=(rows, cols), mode="bilinear",
                                align_corners=False).flatten()
        error = ((velocity[start:end] - target[start:end]) ** 2).mean(-1)
        if config.signed == "hinge":
            attract = rewards.clamp(min=0) * error
            repel = (-rewards).clamp(min=0) * (config.margin - error).clamp(min=0)
            total = total + (attract + repel).sum()
        else:
            total = total + (rewards * error).sum()
        if config.constraint != "none" and config.constraint_weight:
            constraint_error = ((velocity[start:end] - constraint_target[start:end]) ** 2).mean(-1)
            total = total + config.constraint_weight * constraint_error.sum()
        start = end
    return total / normaliser
