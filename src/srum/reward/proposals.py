"""Region proposals: the boxes of an image that the model scores one by one.

The official code runs Segment Anything's automatic mask generator on each saved image, turns every mask into
its bounding box and keeps the ``max_regions`` largest masks (method spec §3). srum offers that through
transformers (``SamProposer``) next to weight-free proposers that need no download: connected components of
the non-background pixels (exact on ShapeWorld-style images), a fixed grid, and the whole image.

Every proposer takes one uint8 image (H, W, 3), RGB, as ``srum generate`` saves it, and returns ``Region``s in
that image's pixel frame: ``box = (x1, y1, x2, y2)``, x to the right, y down, x2/y2 exclusive (the record
format of spec §5), sorted by area, largest first, ties in the proposer's own order, at most ``max_regions``.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

ProposerName = Literal["components", "grid", "whole", "sam"]

# Forward neighbour offsets (dy, dx) for 8-connectivity; each pair of pixels is visited once, both ways.
_NEIGHBOURS = ((0, 1), (1, 0), (1, 1), (1, -1))


@dataclass(frozen=True)
class Region:
    """One proposed region of an image."""

    box: tuple[int, int, int, int]
    """x1, y1, x2, y2 in pixels of the proposed image, x2/y2 exclusive."""
    area: int
    """Pixel count of the region's mask (for a box-only proposer, the box area)."""


def _check_image(image: Tensor) -> tuple[int, int]:
    """(H, W) of a uint8 (H, W, 3) image; anything else is a caller bug worth a clear message."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        raise ValueError(f"expected a non-empty uint8 image (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    return int(image.shape[0]), int(image.shape[1])


def _top_regions(boxes: Tensor, areas: Tensor, max_regions: int) -> list[Region]:
    """The ``max_regions`` largest of K regions, ties kept in input order.

    Args:
        boxes: (K, 4) int64 ``x1, y1, x2, y2``.
        areas: (K,) int64.
    """
    order = torch.sort(areas, descending=True, stable=True).indices[:max_regions]
    return [Region(box=tuple(box), area=area) for box, area in zip(boxes[order].tolist(), areas[order].tolist(),
                                                                     strict=True)]


def masks_to_regions(masks: Tensor, max_regions: int) -> list[Region]:
    """Regions of binary masks: box = the mask's bounding box, area = its pixel count; empty masks are dropped.

    Args:
        masks: (K, H, W) bool.
    """
    height, width = masks.shape[-2:]
    areas = masks.flatten(1).sum(1)
    masks = masks[areas > 0]
    rows, cols = masks.any(2), masks.any(1)  # (K, H), (K, W)
    y1 = rows.byte().argmax(1)
    x1 = cols.byte().argmax(1)
    y2 = height - rows.flip(1).byte().argmax(1)
    x2 = width - cols.flip(1).byte().argmax(1)
    return _top_regions(torch.stack([x1, y1, x2, y2], 1).long().cpu(), areas[areas > 0].long().cpu(), max_regions)


class RegionProposer(ABC):
    """Proposes up to ``max_regions`` regions per image, largest first."""

    def __init__(self, max_regions: int = 10):
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {max_regions}")
        self.max_regions = max_regions

    @abstractmethod
    def propose(self, image: Tensor) -> list[Region]:
        """Regions of one uint8 image (H, W, 3), sorted by area (largest first), at most ``max_regions``."""

    def propose_batch(self, images: list[Tensor]) -> list[list[Region]]:
        """``propose`` for each image; proposers that batch better override it."""
        return [self.propose(image) for image in images]


class WholeImageProposer(RegionProposer):
    """The whole image as its only region: region scoring degenerates to one global question. ``max_regions``
    is taken (and checked) like every proposer's, so one set of options builds any of them; one region is kept
    whatever it is."""

    def __init__(self, max_regions: int = 1):
        super().__init__(max_regions)

    def propose(self, image: Tensor) -> list[Region]:
        height, width = _check_image(image)
        return [Region(box=(0, 0, width, height), area=height * width)]


class GridProposer(RegionProposer):
    """A fixed ``rows`` x ``cols`` grid of boxes tiling the image: content-blind, so it is the control that
    shows how much the proposals themselves matter. Cell edges are ``i * H // rows`` (and likewise for
    columns), so cells differ by at most one pixel; the largest come first, ties row-major."""

    def __init__(self, rows: int = 2, cols: int = 2, max_regions: int = 10):
        super().__init__(max_regions)
        if rows < 1 or cols < 1:
            raise ValueError(f"rows and cols must be >= 1, got rows={rows}, cols={cols}")
        self.rows, self.cols = rows, cols

    def propose(self, image: Tensor) -> list[Region]:
        height, width = _check_image(image)
        if self.rows > height or self.cols > width:
            raise ValueError(f"a {self.rows}x{self.cols} grid has empty cells on a {height}x{width} image")
        ys = [i * height // self.rows for i in range(self.rows + 1)]
        xs = [j * width // self.cols for j in range(self.cols + 1)]
        boxes = torch.tensor([[xs[j], ys[i], xs[j + 1], ys[i + 1]] for i in range(self.rows) for j in range(self.cols)])
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return _top_regions(boxes, areas, self.max_regions)


def _pair_slices(dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Index pairs (a, b) of (H, W) arrays such that ``x[b]`` is the neighbour at (dy, dx) of ``x[a]``."""
    rows_a, rows_b = (slice(None, -1), slice(1, None)) if dy else (slice(None), slice(None))
    cols_a, cols_b = {1: (slice(None, -1), slice(1, None)), 0: (slice(None), slice(None)),
                      -1: (slice(1, None), slice(None, -1))}[dx]
    return (rows_a, cols_a), (rows_b, cols_b)


def label_components(foreground: Tensor, pixels: Tensor | None = None, link_tolerance: int | None = None) -> Tensor:
    """Connected components of the foreground, 8-connectivity (diagonal neighbours touch).

    Two adjacent foreground pixels are linked when ``pixels`` is None or ``link_tolerance`` is None, else only
    when their colours differ by at most ``link_tolerance`` in every channel, so touching shapes of different
    colours stay apart while a gradual shading inside one shape does not split it.

    Vectorised min-label propagation with pointer jumping: each round every pixel takes the smallest label
    among itself and its linked neighbours, hooks its root to that label, and all labels are compressed to
    roots. Labels only decrease and stay inside their component, so the fixed point labels each component by
    its smallest flat index. The work grows with the logarithm of a component's length in practice, not with
    the length: a one-pixel serpentine filling a 1024x1024 image (500k pixels) settles in 25 tensor passes.

    Args:
        foreground: (H, W) bool.
        pixels: (H, W, C) integer colours, or None.
    Returns:
        (H, W) int64: for foreground pixels the row-major flat index of their component's first pixel (so
        labels sort components in raster order of their first pixel); -1 for background.
    """
    height, width = foreground.shape
    by_colour = pixels is not None and link_tolerance is not None
    if by_colour:
        pixels = pixels.to(torch.int16)
    pairs = []
    for dy, dx in _NEIGHBOURS:
        a, b = _pair_slices(dy, dx)
        link = foreground[a] & foreground[b]
        if by_colour:
            link &= (pixels[a] - pixels[b]).abs().amax(-1) <= link_tolerance
        if link.any():
            pairs.append((a, b, link))
    unlinked = height * width  # larger than any label
    label = torch.arange(height * width, device=foreground.device).view(height, width)
    while True:
        smallest = label.clone()
        for a, b, link in pairs:
            smallest[a] = torch.minimum(smallest[a], torch.where(link, label[b], unlinked))
            smallest[b] = torch.minimum(smallest[b], torch.where(link, label[a], unlinked))
        if torch.equal(smallest, label):  # every linked pair agrees: labels are constant on components
            break
        flat, low = label.view(-1), smallest.view(-1)
        parent = low.scatter_reduce(0, flat, low, reduce="amin")  # hook each root to its tree's smallest label
        while not torch.equal(grand := parent.gather(0, parent), parent):
            parent = grand
        label = parent.view(height, width)
    return torch.where(foreground, label, -1)


class ConnectedComponentsProposer(RegionProposer):
    """Objects as connected blobs of non-background colour, without weights.

    The background colour is the most common colour of the border pixels (``background="border"``; ties: the
    smallest packed ``0xRRGGBB``) or a given RGB triple. Foreground pixels differ from it by more than
    ``tolerance`` in some channel. Foreground pixels form one region when they are 8-connected through
    neighbours whose colours differ by at most ``link_tolerance`` per channel: two touching shapes of
    different colours are two regions, as a shape-world scorer wants; ``link_tolerance=None`` joins all
    touching foreground (for textured shapes whose pattern would otherwise split them). Components smaller
    than ``min_area`` pixels (noise specks) are dropped. Ties in area keep raster order of each component's
    first pixel.
    """

    def __init__(self, max_regions: int = 10, background: Literal["border"] | tuple[int, int, int] = "border",
                 tolerance: int = 32, link_tolerance: int | None = 32, min_area: int = 8):
        super().__init__(max_regions)
        if background != "border" and (len(background) != 3 or not all(0 <= c <= 255 for c in background)):
            raise ValueError(f"background must be 'border' or an RGB triple in 0..255, got {background!r}")
        if tolerance < 0 or (link_tolerance is not None and link_tolerance < 0) or min_area < 1:
            raise ValueError(f"need tolerance >= 0, link_tolerance >= 0 or None, min_area >= 1; got "
                             f"tolerance={tolerance}, link_tolerance={link_tolerance}, min_area={min_area}")
        self.background = background
        self.tolerance, self.link_tolerance, self.min_area = tolerance, link_tolerance, min_area

    def background_colour(self, image: Tensor) -> Tensor:
        """(3,) int16 background colour of a uint8 (H, W, 3) image."""
        if self.background != "border":
            return torch.tensor(self.background, dtype=torch.int16, device=image.device)
        border = torch.zeros(image.shape[:2], dtype=torch.bool, device=image.device)
        border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
        rgb = image[border].int()  # (N, 3)
        packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
        values, counts = torch.unique(packed, return_counts=True)
        top = int(values[counts.argmax()])
        return torch.tensor([top >> 16, (top >> 8) & 255, top & 255], dtype=torch.int16, device=image.device)

    def propose(self, image: Tensor) -> list[Region]:
        height, width = _check_image(image)
        pixels = image.to(torch.int16)
        foreground = (pixels - self.background_colour(image)).abs().amax(-1) > self.tolerance
        labels = label_components(foreground, pixels, self.link_tolerance).view(-1)
        where = foreground.view(-1).nonzero().squeeze(1)  # (P,) flat indices of foreground pixels
        roots, member, areas = torch.unique(labels[where], return_inverse=True, return_counts=True)
        ys, xs = where // width, where % width
        count = len(roots)
        x1 = torch.full((count,), width, device=image.device).scatter_reduce(0, member, xs, reduce="amin")
        y1 = torch.full((count,), height, device=image.device).scatter_reduce(0, member, ys, reduce="amin")
        x2 = torch.zeros(count, dtype=torch.long, device=image.device).scatter_reduce(0, member, xs + 1, "amax")
        y2 = torch.zeros(count, dtype=torch.long, device=image.device).scatter_reduce(0, member, ys + 1, "amax")
        keep = areas >= self.min_area
        boxes = torch.stack([x1, y1, x2, y2], 1)[keep]
        return _top_regions(boxes.cpu(), areas[keep].cpu(), self.max_regions)


def box_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, as ``torchvision.ops.nms``: boxes are visited by descending score and
    each suppresses the later ones whose IoU with it exceeds ``iou_threshold``.

    Args:
        boxes: (K, 4) float ``x1, y1, x2, y2``.
        scores: (K,).
    Returns:
        (K',) int64 indices of the kept boxes, by descending score.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order].float()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)  # (K, K)
    overlaps = (inter / (areas[:, None] + areas[None, :] - inter) > iou_threshold).cpu()
    removed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if not removed[i]:
            keep.append(i)
            removed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def rle_to_mask(rle: dict[str, Any]) -> Tensor:
    """Decode an uncompressed COCO RLE (``{"size": [H, W], "counts": [...]}``, column-major runs starting
    with zeros) into an (H, W) bool mask."""
    height, width = rle["size"]
    counts = torch.tensor(rle["counts"], dtype=torch.long)
    values = torch.arange(len(counts)) % 2 == 1
    return torch.repeat_interleave(values, counts).view(width, height).T


@functools.cache
def _mask_generation_class() -> type:
    """transformers' mask-generation pipeline with its final NMS done in plain torch.

    The stock ``postprocess`` calls ``torchvision.ops.batched_nms``; torchvision is no srum dependency and
    its PyPI wheels are CUDA builds that do not load next to the CPU torch wheel. Everything else (point
    grid, image embedding once per image, batched prompts, IoU and stability filters, crop-edge filter) is
    the stock pipeline's.
    """
    from transformers.pipelines.mask_generation import MaskGenerationPipeline

    class TorchNmsMaskGenerationPipeline(MaskGenerationPipeline):
        def postprocess(self, model_outputs, crops_nms_thresh=0.7):
            scores = torch.cat([output["iou_scores"] for output in model_outputs])
            boxes = torch.cat([output["boxes"] for output in model_outputs])
            rles = [rle for output in model_outputs for rle in output["masks"]]
            keep = box_nms(boxes, scores, crops_nms_thresh).tolist()
            return {"masks": [rle_to_mask(rles[i]) for i in keep], "scores": scores[keep]}

    return TorchNmsMaskGenerationPipeline


class SamProposer(RegionProposer):
    """Segment Anything's automatic masks, the official proposer (spec §3), through transformers.

    ``model_dir`` is a local transformers SAM folder (``config.json``, weights, ``preprocessor_config.json``,
    e.g. ``facebook/sam-vit-huge`` saved with ``save_pretrained``; the official run used ViT-H). Nothing is
    downloaded. Defaults are segment-anything's: 32x32 points, predicted-IoU threshold 0.88, stability 0.95,
    box NMS 0.7, no crops. Box = the mask's bounding box with exclusive ends; area = mask pixel count.
    ``device=None`` takes CUDA when available (ViT-H over 1024 points is slow on a CPU).
    ``pipeline`` and ``call_options`` (the keyword arguments of every call) are public, so a caller can see the
    raw masks behind the regions.
    """

    def __init__(self, model_dir: str | Path, max_regions: int = 10, points_per_side: int = 32,
                 points_per_batch: int = 64, pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 nms_thresh: float = 0.7, device: str | None = None):
        super().__init__(max_regions)
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"SAM model folder {model_dir} does not exist")
        missing = [name for name in ("config.json", "preprocessor_config.json") if not (model_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(f"SAM model folder {model_dir} has no {' or '.join(missing)} "
                                    "(expected a transformers SAM model saved with save_pretrained)")
        from transformers import pipeline

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipeline = pipeline("mask-generation", model=str(model_dir), device=device, local_files_only=True,
                                 pipeline_class=_mask_generation_class())
        self.call_options = dict(points_per_crop=points_per_side, points_per_batch=points_per_batch,
                                 pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                                 crops_nms_thresh=nms_thresh, crops_n_layers=0)

    def propose(self, image: Tensor) -> list[Region]:
        return self.propose_batch([image])[0]

    def propose_batch(self, images: list[Tensor]) -> list[list[Region]]:
        from PIL import Image

        for image in images:
            _check_image(image)
        pil = [Image.fromarray(image.cpu().numpy()) for image in images]
        outputs = self.pipeline(pil, **self.call_options) if pil else []
        regions = []
        for image, output in zip(images, outputs, strict=True):
            masks = torch.stack(output["masks"]) if output["masks"] else torch.zeros(0, *image.shape[:2], dtype=bool)
            regions.append(masks_to_regions(masks, self.max_regions))
        return regions


_PROPOSERS: dict[str, type[RegionProposer]] = {
    "components": ConnectedComponentsProposer,
    "grid": GridProposer,
    "whole": WholeImageProposer,
    "sam": SamProposer,
}


def build_proposer(name: ProposerName, **options: Any) -> RegionProposer:
    """The proposer called ``name`` built with ``options`` (its constructor's keyword arguments)."""
    if name not in _PROPOSERS:
        raise ValueError(f"unknown region proposer {name!r}; choose from {sorted(_PROPOSERS)}")
    return _PROPOSERS[name](**options)
