"""Reward maps: a global score and scored boxes painted into a dense map over an image.

Boxes live in ``ScoredRegions`` as pixel coordinates of the frame they were scored in, with that frame's size
alongside, so a map can be drawn for any other frame (the training image, the latent-token grid) by rescaling.
The official rule (``max_floor``) is::

    R(x, y) = (g + 1) / 2 * max(0.5, max_{k: (x, y) in box_k} (s_k + 1) / 2)

with pixel boxes truncated toward zero and clamped to the frame. Other rules and ablations are options
(``MapConfig``). Everything is vectorised over images and boxes; ``official_pixel_map`` is the plain
per-record reference the tests hold the fast paths to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from srum.loss.bilinear import ragged_separable_points

CombineRule = Literal["max_floor", "signed", "mean"]
Ablation = Literal["none", "global_only", "local_only", "uniform"]


@dataclass(frozen=True)
class MapConfig:
    """How scores become a map."""

    rule: CombineRule = "max_floor"
    """``max_floor``: official, regions can only raise a 0.5 floor (R in [0, 1]). ``signed``: background 0,
    each pixel takes the covering score of largest magnitude, so bad regions are negative (R in [-1, 1]).
    ``mean``: background 0.5, covered pixels the mean of (s_k + 1) / 2 over their boxes (R in [0, 1])."""
    ablation: Ablation = "none"
    """``global_only``: ignore regions. ``local_only``: ignore the global score (factor 1). ``uniform``: every
    pixel 1 whatever the scores (the control that shows what the reward adds)."""

    @property
    def signed(self) -> bool:
        return self.rule == "signed"


@dataclass
class ScoredRegions:
    """Scores of a batch of B images with up to K boxes each (padded).

    ``boxes`` (B, K, 4) float64 pixel ``[x1, y1, x2, y2]`` in the scored frame (x right, y down, x2/y2
    exclusive); ``scores`` (B, K); ``valid`` (B, K) bool; ``global_scores`` (B,); ``sizes`` (B, 2) the scored
    frame's (width, height). Scores are in [-1, 1].
    """

    boxes: Tensor
    scores: Tensor
    valid: Tensor
    global_scores: Tensor
    sizes: Tensor

    @classmethod
    def from_lists(cls, global_scores: list[float], boxes: list[list[list[float]]], scores: list[list[float]],
                   sizes: list[tuple[int, int]]) -> ScoredRegions:
        most = max((len(b) for b in boxes), default=0) or 1  # K >= 1 keeps the reductions defined
        padded_boxes = [list(b) + [[0.0, 0.0, 0.0, 0.0]] * (most - len(b)) for b in boxes]
        padded_scores = [list(s) + [0.0] * (most - len(s)) for s in scores]
        valid = [[True] * len(b) + [False] * (most - len(b)) for b in boxes]
        return cls(torch.tensor(padded_boxes, dtype=torch.float64).reshape(len(boxes), most, 4),
                   torch.tensor(padded_scores, dtype=torch.float64).reshape(len(boxes), most),
                   torch.tensor(valid, dtype=torch.bool).reshape(len(boxes), most),
                   torch.tensor(global_scores, dtype=torch.float64), torch.tensor(sizes, dtype=torch.float64))

    def __len__(self) -> int:
        return int(self.global_scores.shape[0])


def _trunc(values: Tensor) -> Tensor:
    """``int()`` of coordinates, robust to the rounding of a rescale that should land on an integer."""
    return torch.sign(values) * torch.floor(values.abs() + 1e-9)


def pixel_boxes(regions: ScoredRegions, heights: Tensor, widths: Tensor) -> Tensor:
    """Boxes rescaled to frames of (heights, widths) (B,), truncated and clamped: (B, K, 4) int64; a box that
    ends up empty has x1 >= x2 or y1 >= y2 (and paints nothing)."""
    scale_x = (widths.double() / regions.sizes[:, 0])[:, None]
    scale_y = (heights.double() / regions.sizes[:, 1])[:, None]
    x1, y1, x2, y2 = regions.boxes.unbind(-1)
    # Boxes inverted in their own frame are skipped (the official check happens before clamping).
    x1, x2 = _trunc(x1 * scale_x), _trunc(x2 * scale_x)
    y1, y2 = _trunc(y1 * scale_y), _trunc(y2 * scale_y)
    keep = regions.valid & (x1 < x2) & (y1 < y2)
    w, h = widths.double()[:, None], heights.double()[:, None]
    zero = torch.zeros_like(x1)
    out = torch.stack([torch.clamp(x1, zero, w), torch.clamp(y1, zero, h), torch.clamp(x2, zero, w),
                       torch.clamp(y2, zero, h)], dim=-1).long()
    return torch.where(keep[..., None], out, torch.zeros_like(out))


def _global_factor(regions: ScoredRegions, config: MapConfig) -> Tensor:
    if config.ablation == "local_only":
        return torch.ones_like(regions.global_scores)
    return (regions.global_scores + 1) / 2


MAX_BITMASK_BOXES = 16  # box sets index a per-image table of 2**K values


def grid_values(regions: ScoredRegions, config: MapConfig, ys: Tensor, xs: Tensor, heights: Tensor,
                widths: Tensor) -> Tensor:
    """Map values on a grid of pixel rows x columns of frames (heights, widths) (B,).

    Box membership is separable (a pixel is in a box iff its row and its column are), so rows and columns are
    tested apart and combined once. Values are float32, as the official map is.

    Args:
        ys: (B, R) int64 pixel rows; xs: (B, C) int64 pixel columns.
    Returns:
        (B, R, C) float32.
    """
    return _values_in_boxes(regions, config, ys, xs, pixel_boxes(regions, heights, widths))


def _values_in_boxes(regions: ScoredRegions, config: MapConfig, ys: Tensor, xs: Tensor, boxes: Tensor) -> Tensor:
    """``grid_values`` with the pixel boxes (B, K, 4) already made."""
    if config.ablation == "uniform":
        return torch.ones(len(regions), ys.shape[1], xs.shape[1])
    x1, y1, x2, y2 = (c[:, None, :] for c in boxes.unbind(-1))  # (B, 1, K)
    in_rows = (ys[..., None] >= y1) & (ys[..., None] < y2)  # (B, R, K)
    in_cols = (xs[..., None] >= x1) & (xs[..., None] < x2)  # (B, C, K)
    if config.ablation == "global_only":
        in_rows = torch.zeros_like(in_rows)
    scores = regions.scores.float()
    if config.rule == "mean" or scores.shape[1] > MAX_BITMASK_BOXES:
        painted = _paint_dense(in_rows, in_cols, scores, config)
    else:
        painted = _paint_first_cover(in_rows, in_cols, scores, config)
    return painted * _global_factor(regions, config).float()[:, None, None]


def _paint_dense(in_rows: Tensor, in_cols: Tensor, scores: Tensor, config: MapConfig) -> Tensor:
    """Any rule, from the (B, R, C, K) membership tensor."""
    inside = in_rows[:, :, None, :] & in_cols[:, None, :, :]  # (B, R, C, K)
    scores = scores[:, None, None, :]  # (B, 1, 1, K)
    if config.rule == "max_floor":
        return torch.where(inside, (scores + 1) / 2, 0.5).amax(-1).clamp(min=0.5)
    if config.rule == "mean":
        covered = inside.sum(-1)
        total = torch.where(inside, (scores + 1) / 2, 0.0).sum(-1)
        return torch.where(covered > 0, total / covered.clamp(min=1), 0.5)
    magnitude = torch.where(inside, scores.abs() + 1e-6 * scores, -1.0)  # ties: the higher score
    chosen = torch.gather(scores.expand_as(magnitude), -1, magnitude.argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(inside.any(-1), chosen, 0.0)


def _paint_first_cover(in_rows: Tensor, in_cols: Tensor, scores: Tensor, config: MapConfig) -> Tensor:
    """``max_floor`` and ``signed`` pick one covering box per pixel, the first in an order of preference. With
    the boxes sorted that way, each row's and column's box set is a bitmask, a pixel's set is (row mask & column
    mask), and a per-image table over all 2**K sets gives the value: one integer and one lookup per pixel
    instead of K membership flags."""
    count, boxes = scores.shape
    if config.rule == "max_floor":
        values, background = (scores + 1) / 2, 0.5
        order = values.argsort(dim=-1, descending=True, stable=True)
    else:  # signed: largest magnitude first, ties to the higher score
        values, background = scores, 0.0
        order = (scores.abs() + 1e-6 * scores).argsort(dim=-1, descending=True, stable=True)
    values = torch.gather(values, 1, order)  # (B, K) in preference order
    bits = 1 << torch.arange(boxes)  # (K,) int64: the box sets index the table directly
    row_masks = (torch.gather(in_rows, 2, order[:, None, :].expand_as(in_rows)) * bits).sum(-1)  # (B, R)
    col_masks = (torch.gather(in_cols, 2, order[:, None, :].expand_as(in_cols)) * bits).sum(-1)  # (B, C)
    cover = row_masks[:, :, None] & col_masks[:, None, :]  # (B, R, C) box sets
    sets = torch.arange(1 << boxes)
    first = torch.log2((sets & -sets).double().clamp(min=1)).long()  # lowest set bit of every set (2**K,)
    table = torch.where(sets == 0, background, values[:, first])  # (B, 2**K)
    painted = torch.gather(table, 1, cover.flatten(1)).view(cover.shape)
    return painted.clamp(min=0.5) if config.rule == "max_floor" else painted


def pixel_maps(regions: ScoredRegions, height: int, width: int, config: MapConfig = MapConfig()) -> Tensor:
    """Full-resolution maps (B, height, width) float32, every image drawn in a frame of the same size."""
    count = len(regions)
    ys = torch.arange(height).expand(count, -1)
    xs = torch.arange(width).expand(count, -1)
    return grid_values(regions, config, ys, xs, torch.full((count,), height), torch.full((count,), width))


def token_rewards(regions: ScoredRegions, frames: list[tuple[int, int]], grids: list[tuple[int, int]],
                  config: MapConfig = MapConfig()) -> Tensor:
    """Per-token rewards without any full-resolution buffer: the map of each image drawn in its frame
    (height, width) and sampled bilinearly (align_corners=False, as ``F.interpolate``) onto its token grid
    (rows, cols), row-major. Returns (sum of rows*cols,) float32, image after image.

    A map is constant between box edges, so it is painted once per cell of the edge grid (at most 2K + 1 rows
    by 2K + 1 columns of cells for K boxes), and each token's bilinear sample is a weighted sum of the cells its
    two sample rows and two sample columns fall in: ``rows @ cells @ cols^T``, two small matmuls per image.
    """
    count = len(regions)
    rows_px, cols_px, row_w, col_w, real = ragged_separable_points(frames, grids)  # (B, R, 2), (B, C, 2), ...
    heights = torch.tensor([h for h, _ in frames])
    widths = torch.tensor([w for _, w in frames])
    boxes = pixel_boxes(regions, heights, widths)  # (B, K, 4), clamped to the frame
    zeros = torch.zeros(count, 1, dtype=torch.long)
    row_edges = torch.cat([zeros, boxes[..., 1], boxes[..., 3]], 1).sort(1).values  # (B, 2K + 1) cell starts
    col_edges = torch.cat([zeros, boxes[..., 0], boxes[..., 2]], 1).sort(1).values
    cells = _values_in_boxes(regions, config, row_edges, col_edges, boxes)  # (B, 2K + 1, 2K + 1)
    row_weights = _cell_weights(rows_px, row_w, row_edges)  # (B, R, 2K + 1)
    col_weights = _cell_weights(cols_px, col_w, col_edges)  # (B, C, 2K + 1)
    sampled = (row_weights @ cells @ col_weights.transpose(1, 2)).reshape(count, -1)  # (B, R * C)
    return sampled.flatten() if bool(real.all()) else sampled[real]  # row-major, image after image


def _cell_weights(pixels: Tensor, weights: Tensor, edges: Tensor) -> Tensor:
    """(B, N, E) float32: each of N sample lines' two (pixel, weight) pairs (B, N, 2) added into the cell
    (between sorted edges (B, E)) its pixel falls in; of equal edges the last one starts the non-empty cell."""
    cell = torch.searchsorted(edges, pixels.flatten(1), right=True).view(pixels.shape) - 1  # (B, N, 2)
    out = torch.zeros(*pixels.shape[:2], edges.shape[1])
    return out.scatter_add_(2, cell, weights.float())


def sample_map(reward_map: Tensor, rows: int, cols: int) -> Tensor:
    """The official token map of one pixel map (H, W): ``F.interpolate`` bilinear, align_corners=False,
    flattened row-major. (rows*cols,)."""
    return F.interpolate(reward_map[None, None], size=(rows, cols), mode="bilinear", align_corners=False).flatten()
