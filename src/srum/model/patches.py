"""Images and latents to token rows and back, and the 2-D grid position ids of those tokens.

Both the ViT path (14-pixel patches of a 3-channel image) and the generation path (2x2 patches of a latent)
use one layout: tokens in row-major order over patches, feature ``(p * patch + q) * C + c`` for row ``p`` and
column ``q`` inside the patch and channel ``c`` (channel fastest).
"""

from __future__ import annotations

import torch
from torch import Tensor


def patchify(x: Tensor, patch: int) -> Tensor:
    """Args: x (C, H, W) with H and W multiples of ``patch``. Returns (H/patch * W/patch, patch*patch*C)."""
    channels, height, width = x.shape
    if height % patch or width % patch:
        raise ValueError(f"patchify: expected sides that are multiples of {patch}, got {height}x{width}")
    rows, cols = height // patch, width // patch
    x = x.reshape(channels, rows, patch, cols, patch)  # (C, h, p, w, q)
    return x.permute(1, 3, 2, 4, 0).reshape(rows * cols, patch * patch * channels)  # (h*w, p*q*C)


def unpatchify(tokens: Tensor, rows: int, cols: int, patch: int) -> Tensor:
    """Exact inverse of ``patchify``. Args: tokens (rows*cols, patch*patch*C). Returns (C, rows*patch, cols*patch)."""
    channels = tokens.shape[1] // (patch * patch)
    x = tokens.reshape(rows, cols, patch, patch, channels)  # (h, w, p, q, C)
    return x.permute(4, 0, 2, 1, 3).reshape(channels, rows * patch, cols * patch)


def grid_position_ids(rows: int, cols: int, stride: int, device: torch.device | str | None = None) -> Tensor:
    """``row * stride + col`` for a rows x cols token grid, row-major (BAGEL's "extrapolate" position ids)."""
    if rows > stride or cols > stride:
        raise ValueError(f"grid of {rows}x{cols} tokens: expected at most {stride} per side")
    row = torch.arange(rows, device=device)[:, None]
    col = torch.arange(cols, device=device)[None, :]
    return (row * stride + col).flatten()
