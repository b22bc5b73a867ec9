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
Ablation = Literal["none", "global_only", "local_only"]


@dataclass(frozen=True)
class MapConfig:
    """How scores become a map."""

    rule: CombineRule = "max_floor"
    """``max_floor``: official, regions can only raise a 0.5 floor (R in [0, 1]). ``signed``: background 0,
    each pixel takes the covering score of largest magnitude, so bad regions are negative (R in [-1, 1]).
    ``mean``: background 0.5, covered pixels the mean of (s_k + 1) / 2 over their boxes (R in [0, 1])."""
    ablation: Ablation = "none"
    """``global_only``: ignore regions. ``local_only``: ignore the global score (factor 1)."""

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
        count, most = len(global_scores), max((len(b) for b in boxes), default=0) or 1  # K >= 1: reductions
        padded_boxes = torch.zeros(count, most, 4, dtype=torch.float64)
        padded_scores = torch.zeros(count, most, dtype=torch.float64)
        valid = torch.zeros(count, most, dtype=torch.bool)
        for row, (image_boxes, image_scores) in enumerate(zip(boxes, scores, strict=True)):
            if image_boxes:
                padded_boxes[row, : len(image_boxes)] = torch.tensor(image_boxes, dtype=torch.float64)
                padded_scores[row, : len(image_scores)] = torch.tensor(image_scores, dtype=torch.float64)
                valid[row, : len(image_boxes)] = True
        return cls(padded_boxes, padded_scores, valid, torch.tensor(global_scores, dtype=torch.float64),
                   torch.tensor(sizes, dtype=torch.float64))

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


MAX_BITMASK_BOXES = 52  # box sets are packed into the bits of one int64 and read back through float64 log2


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
    boxes = pixel_boxes(regions, heights, widths)  # (B, K, 4)
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
    """``max_floor`` and ``signed`` pick one covering box per pixel, the first in an order of preference; with
    the boxes sorted that way, each row's and column's box set is a bitmask and a pixel's first covering box is
    the lowest set bit of (row mask & column mask): one int64 per pixel instead of K membership flags."""
    if config.rule == "max_floor":
        values, background = (scores + 1) / 2, 0.5
        order = values.argsort(dim=-1, descending=True, stable=True)
    else:  # signed: largest magnitude first, ties to the higher score
        values, background = scores, 0.0
        order = (scores.abs() + 1e-6 * scores).argsort(dim=-1, descending=True, stable=True)
    values = torch.gather(values, 1, order)  # (B, K) in preference order
    bits = torch.ones(scores.shape[1], dtype=torch.long) << torch.arange(scores.shape[1])  # (K,)
    row_masks = (torch.gather(in_rows, 2, order[:, None, :].expand_as(in_rows)).long() * bits).sum(-1)  # (B, R)
    col_masks = (torch.gather(in_cols, 2, order[:, None, :].expand_as(in_cols)).long() * bits).sum(-1)  # (B, C)
    cover = row_masks[:, :, None] & col_masks[:, None, :]  # (B, R, C)
    first = torch.log2((cover & -cover).double()).round().long().clamp(min=0)  # index of the lowest set bit
    chosen = torch.gather(values, 1, first.flatten(1)).view_as(first)
    painted = torch.where(cover != 0, chosen, background)
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

    Only the two pixel rows and two pixel columns around each token's sample point are painted, for all images
    and boxes at once; the sample points are computed once per distinct (frame, grid).
    """
    count = len(regions)
    rows_px, cols_px, row_w, col_w, real = ragged_separable_points(frames, grids)  # (B, R, 2), (B, C, 2), ...
    heights = torch.tensor([h for h, _ in frames])
    widths = torch.tensor([w for _, w in frames])
    values = grid_values(regions, config, rows_px.reshape(count, -1), cols_px.reshape(count, -1), heights, widths)
    rows, cols = rows_px.shape[1], cols_px.shape[1]
    values = values.reshape(count, rows, 2, cols, 2)
    # Bilinear interpolation of the float32 map, with PyTorch's float32 weights.
    sampled = torch.einsum("brpcq,brp,bcq->brc", values, row_w.float(), col_w.float())  # (B, R, C)
    return sampled.reshape(count, -1)[real]  # row-major, image after image


def sample_map(reward_map: Tensor, rows: int, cols: int) -> Tensor:
    """The official token map of one pixel map (H, W): ``F.interpolate`` bilinear, align_corners=False,
    flattened row-major. (rows*cols,)."""
    return F.interpolate(reward_map[None, None], size=(rows, cols), mode="bilinear", align_corners=False).flatten()
