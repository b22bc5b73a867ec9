"""Adapters between the modalities and the decoder: sin-cos position tables, the timestep embedder, the
ViT connector."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_2d_table(grid_size: int, dim: int) -> Tensor:
    """The frozen 2-D sin-cos table, (grid_size**2, dim) float32.

    Row ``r * grid_size + c`` is ``[sin(c w), cos(c w), sin(r w), cos(r w)]`` with ``w_k = 10000**(-k / (dim/4))``:
    the first half encodes the column, the second the row. Computed in float64 as the official tables are.
    """
    if dim % 4:
        raise ValueError(f"sin-cos table width: expected a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(x: Tensor) -> Tensor:
        angles = x.reshape(-1, 1) * omega  # (G*G, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (G*G, dim)


class PositionTable(nn.Module):
    """A frozen sin-cos table looked up by position id (``latent_pos_embed``, ``vit_pos_embed``).

    Kept as a persistent buffer so checkpoints carry it under the official name ``pos_embed``; it is
    recomputed, never trained, and recomputing it after loading is exact.
    """

    def __init__(self, grid_size: int, dim: int) -> None:
        super().__init__()
        self.grid_size, self.dim = grid_size, dim
        self.register_buffer("pos_embed", sincos_2d_table(grid_size, dim))

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        self.pos_embed = sincos_2d_table(self.grid_size, self.dim).to(device)

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.pos_embed[position_ids]


def timestep_features(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """``[cos(t f_k), sin(t f_k)]`` with ``f_k = exp(-ln(max_period) k / (dim/2))``, cosine first, in fp32.

    ``t`` is the flow time in [0, 1] itself (not scaled by 1000), one value per token.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (N, dim)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t, then Linear, SiLU, Linear (``mlp.0`` and ``mlp.2`` in the checkpoint)."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        """Args: t (N,) in [0, 1]. Returns (N, hidden) in the weights' dtype."""
        return self.mlp(timestep_features(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class Connector(nn.Module):
    """ViT features into the decoder's width: ``fc2(gelu_tanh(fc1(x)))``."""

    def __init__(self, in_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
