"""The implementations of the constrained dense-reward flow loss compared by the benchmarks, on one input."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from srum.loss import LossConfig, dense_reward_flow_loss
from srum.loss.vectorised import token_weighted_loss

CHANNELS, GRID, MAP = 64, 64, 64  # 64 x 64 tokens of 64 channels per image (a 1024 px image), 64 x 64 maps


def make_inputs(images: int, device: str, dtype: torch.dtype = torch.float32, seed: int = 0, map_side: int = MAP,
                grid: int = GRID):
    generator = torch.Generator().manual_seed(seed)
    tokens = images * grid * grid
    velocity = torch.randn(tokens, CHANNELS, generator=generator).to(device=device, dtype=dtype)
    target = torch.randn(tokens, CHANNELS, generator=generator).to(device=device, dtype=dtype)
    maps = [torch.rand(map_side, map_side, generator=generator).to(device) for _ in range(images)]
    return velocity.requires_grad_(True), target, maps, [(grid, grid)] * images


def official_loop(velocity, target, maps, grids, config=LossConfig()):
    """As the official code does it: per image, interpolate the map to the token grid; the reward-weighted
    squared error to the scored image's target and the squared error to the good image's target (the same
    image in all official data), each a mean over tokens and channels."""
    rewards = torch.cat([F.interpolate(m[None, None], size=g, mode="bilinear", align_corners=False).flatten()
                         for m, g in zip(maps, grids, strict=True)])
    weighted = (rewards[:, None] * (velocity.float() - target.float()) ** 2).mean()
    return weighted + config.constraint_weight * ((velocity.float() - target.float()) ** 2).mean()


def vectorised(velocity, target, maps, grids, config=LossConfig()):
    return dense_reward_flow_loss(velocity, target, target, maps, grids, config, impl="torch")


def triton_fused(velocity, target, maps, grids, config=LossConfig()):
    return dense_reward_flow_loss(velocity, target, target, maps, grids, config, impl="triton")


def compiled():
    """torch.compile of the same math as the vectorised path (rewards gathered outside, the weighted loss
    compiled), built lazily: compiling costs seconds."""
    loss = torch.compile(token_weighted_loss, dynamic=False)

    def run(velocity, target, maps, grids, config=LossConfig()):
        from srum.loss.bilinear import sample_maps

        return loss(velocity, target, target, sample_maps(maps, grids), config)

    return run
