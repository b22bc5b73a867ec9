"""Flow-matching time conventions shared by training and sampling (t = 0 data, t = 1 noise)."""

from __future__ import annotations

import torch
from torch import Tensor


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """``s t / (1 + (s - 1) t)``: pushes times toward noise for s > 1; identity for s = 1."""
    return shift * t / (1 + (shift - 1) * t)


def logit_normal_timesteps(count: int, shift: float = 1.0, generator: torch.Generator | None = None,
                           device: torch.device | str | None = None) -> Tensor:
    """BAGEL's training times: ``t = shift(sigmoid(n))`` with ``n ~ N(0, 1)``, one per image. Returns (count,)."""
    logits = torch.randn(count, generator=generator, device=device)
    return shift_timesteps(torch.sigmoid(logits), shift)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t noise`` with t per row. Args: x0, noise (N, C); t (N,)."""
    t = t.to(x0.dtype)[:, None]
    return (1 - t) * x0 + t * noise
