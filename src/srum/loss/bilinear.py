"""Bilinear sampling of maps onto token grids exactly as ``F.interpolate(mode="bilinear", align_corners=False)``
does it, as explicit gather indexes and weights (no upsampled buffer), for ragged batches."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


def source_coords(out_size: int, in_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each output index: the two source indexes and the weight of the second one (float64).

    ``src = (d + 0.5) * in / out - 0.5`` clamped below at 0; the upper index is clamped to ``in - 1``.
    """
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    return low, high, src - low


@lru_cache(maxsize=64)
def sample_points(in_size: tuple[int, int], grid: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """The 4 source pixels of each token of a (rows, cols) grid sampled from a (height, width) map.

    Returns ys, xs (rows*cols, 4) int64 and weights (rows*cols, 4) float64, tokens row-major.
    """
    (height, width), (rows, cols) = in_size, grid
    y0, y1, wy = source_coords(rows, height)
    x0, x1, wx = source_coords(cols, width)
    y_pair, x_pair = torch.stack([y0, y1], -1), torch.stack([x0, x1], -1)  # (rows, 2), (cols, 2)
    wy_pair, wx_pair = torch.stack([1 - wy, wy], -1), torch.stack([1 - wx, wx], -1)
    n = rows * cols
    ys = y_pair[:, None, :, None].expand(rows, cols, 2, 2).reshape(n, 4)
    xs = x_pair[None, :, None, :].expand(rows, cols, 2, 2).reshape(n, 4)
    weights = (wy_pair[:, None, :, None] * wx_pair[None, :, None, :]).reshape(n, 4)
    return ys, xs, weights


def ragged_sample_points(in_sizes: list[tuple[int, int]], grids: list[tuple[int, int]]
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``sample_points`` for a batch, padded: ys, xs (B, most, 4) int64, weights (B, most, 4) float64 and a
    (B, most) mask of real tokens. Computed once per distinct (size, grid), then gathered."""
    keys = [(tuple(size), tuple(grid)) for size, grid in zip(in_sizes, grids, strict=True)]
    distinct = sorted(set(keys))
    which = torch.tensor([distinct.index(key) for key in keys], dtype=torch.long)
    lengths = torch.tensor([rows * cols for _, (rows, cols) in keys])
    most = int(lengths.max())
    tables = [sample_points(*key) for key in distinct]
    ys, xs, weights = (torch.stack([F.pad(table[i], (0, 0, 0, most - table[i].shape[0])) for table in tables])[which]
                       for i in range(3))
    return ys, xs, weights, torch.arange(most)[None, :] < lengths[:, None]


@lru_cache(maxsize=256)
def _sample_table(out_size: int, in_size: int, most: int) -> tuple[Tensor, Tensor]:
    """Source pixels (most, 2) and weights (most, 2) of one axis, padded to ``most`` lines; cached, as training
    meets the same few (grid, frame) pairs every step. Callers must not write into them."""
    low, high, weight = source_coords(out_size, in_size)
    pad = (0, 0, 0, most - out_size)
    return F.pad(torch.stack([low, high], -1), pad), F.pad(torch.stack([1 - weight, weight], -1), pad)


def ragged_separable_points(in_sizes: list[tuple[int, int]], grids: list[tuple[int, int]]
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The sample points of a batch as separate rows and columns: rows (B, R, 2) and columns (B, C, 2) int64
    source pixels with weights (B, R, 2) and (B, C, 2) float64 (R, C the largest grid's; padding repeats
    pixel 0 with weight 0), and a (B, R * C) mask of the real tokens in row-major order."""
    count = len(grids)
    most_rows = max(rows for rows, _ in grids)
    most_cols = max(cols for _, cols in grids)
    keys = list(zip(map(tuple, in_sizes), map(tuple, grids), strict=True))
    distinct = sorted(set(keys))
    which = torch.tensor([distinct.index(key) for key in keys], dtype=torch.long)

    row_tables = [_sample_table(grid[0], size[0], most_rows) for size, grid in distinct]
    col_tables = [_sample_table(grid[1], size[1], most_cols) for size, grid in distinct]
    rows_px, row_w = (torch.stack([t[i] for t in row_tables])[which] for i in range(2))
    cols_px, col_w = (torch.stack([t[i] for t in col_tables])[which] for i in range(2))
    row_real = torch.arange(most_rows)[None, :] < torch.tensor([r for r, _ in grids])[:, None]
    col_real = torch.arange(most_cols)[None, :] < torch.tensor([c for _, c in grids])[:, None]
    return rows_px, cols_px, row_w, col_w, (row_real[:, :, None] & col_real[:, None, :]).reshape(count, -1)


def sample_maps(maps: list[Tensor], grids: list[tuple[int, int]]) -> Tensor:
    """Per-token values of ragged maps sampled onto their grids, (sum rows*cols,) in the maps' dtype, image
    after image, row-major: one gather over the concatenated maps."""
    if not maps:
        return torch.zeros(0)
    device, dtype = maps[0].device, maps[0].dtype
    ys, xs, weights, real = ragged_sample_points([tuple(m.shape) for m in maps], grids)
    widths = torch.tensor([m.shape[1] for m in maps])
    offsets = torch.tensor([m.numel() for m in maps]).cumsum(0) - torch.tensor([m.numel() for m in maps])
    index = (offsets[:, None, None] + ys * widths[:, None, None] + xs)[real]  # (N, 4)
    flat = torch.cat([m.reshape(-1) for m in maps])
    return (flat[index.to(device)] * weights[real].to(device=device, dtype=dtype)).sum(-1)
