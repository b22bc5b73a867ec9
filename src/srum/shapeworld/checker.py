"""A weight-free ShapeWorld checker: what a picture shows, and whether it matches its prompt.

``detect`` reads the objects of a uint8 (H, W, 3) picture of any size: every pixel is matched to a palette colour
or the background, same-colour pixels form 8-connected components, and each component is named a square,
circle or triangle from two descriptors of its mask. ``score`` compares the detections with a ``Spec`` the way
T2I-CompBench scores its categories (``shared/reference/peers-and-benchmarks.md`` §2.1, with exact detections in
place of BLIP-VQA and UniDet confidences): binding is a product over the noun phrases, spatial a position rule on
object centres, numeracy an exact count, complex a mean of sub-scores. Next to that graded score, ``passed`` is
the strict verdict: the picture holds exactly what the prompt asks for and nothing else. ``report`` aggregates
verdicts per category.

Everything is measured relative to the image size, so a 36 x 36 render, its 2x upscale and a generated image
of another size are read alike.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor

from srum.reward.proposals import label_components
from srum.shapeworld.world import BACKGROUND, CATEGORIES, COLOURS, GRID, Spec

_COLOUR_NAMES = tuple(COLOURS)
# Palette colours as offsets from the background (3 channels, float): a pixel is read as a point on the ray from
# the background towards one of them, so a shape's anti-aliased or blurred rim (a blend with the background)
# keeps its colour and is cut at half intensity instead of drifting to whichever palette colour is nearest.
_BACKGROUND = torch.tensor(BACKGROUND, dtype=torch.float32)
_PALETTE = torch.tensor([COLOURS[name] for name in _COLOUR_NAMES], dtype=torch.float32) - _BACKGROUND

MIN_INTENSITY = 0.5
"""A pixel is foreground when its projection on its colour's ray is at least this fraction of the colour: a
pixel half covered by a shape belongs to it."""
MAX_RESIDUAL = 48.0
"""Largest distance (uint8 units) of a foreground pixel from its colour's ray. The two closest rays (blue and
purple) are 116 apart, so 48 keeps a margin from the halfway point; noise of std 8 leaves a residual above 48
with probability exp(-18)."""
MIN_AREA_FRACTION = 0.004
"""Components smaller than this fraction of the image (5 px of a 36 x 36 render, whose smallest object, a
triangle, has 32) are specks, not objects."""
SQUARE_FILL = 0.88
"""Fill ratio of the bounding box from which a component is a square. Measured on 36 x 36 renders, clean, with
gaussian noise of std 16, 3 x 3 box blur, and blur plus noise of std 8: squares 0.94-1.0, circles 0.75-0.81,
triangles 0.52-0.83."""
TRIANGLE_SKEW = -0.15
"""Vertical skewness of the mass at or below which a non-square component is a triangle. An upward triangle
holds most of its mass low with a thin tail up to the apex: skewness -0.55 as rendered (a continuous one:
-2 * 2^0.5 / 5 = -0.57), -0.34 after a 3 x 3 blur, at worst -0.23 with blur and noise of std 8; circles
measure within +-0.08 under the same distortions. Unlike a top/bottom split of the bounding box it needs no box,
so one pixel lost at the apex or added at the rim barely moves it."""
RELATION_MARGIN = 1 / (2 * GRID)
"""Centres must differ by more than this fraction of the image (half a grid cell) along the relation's axis:
objects side by side in one row are neither above nor below each other, however their centres jitter."""


@dataclass(frozen=True)
class Detection:
    """One object read from a picture."""

    colour: str
    shape: str
    centre: tuple[float, float]
    """(row, col) in pixels: the centre of the bounding box (shape-independent, unlike the mass centre)."""
    box: tuple[int, int, int, int]
    """x1, y1, x2, y2 in pixels, x2/y2 exclusive (the ``Region`` convention of ``srum.reward.proposals``)."""
    area: int
    """Pixel count of the component."""
    fill: float
    """area / box area: square ~1.0, circle ~0.8, triangle ~0.5."""
    skew: float
    """Skewness of the pixels' rows: ~-0.55 for an upward triangle, ~0 for squares and circles."""


@dataclass(frozen=True)
class Verdict:
    """How one picture answers one spec."""

    score: float
    """0-100, the spec's category metric."""
    passed: bool
    """The detections match the spec exactly: each phrase with exactly its count, the relation, nothing else."""
    category: str
    reasons: tuple[str, ...]
    """What breaks the exact match; empty exactly when ``passed``."""
    criteria: dict[str, float] = field(hash=False)
    """Every sub-score, 0-100: ``presence`` (each phrase with at least its count), ``counts`` (exactly its
    count), ``relation`` (only for specs with one) and ``extras`` (no object outside the named phrases)."""
    detections: tuple[Detection, ...] = ()


def _check_image(image: Tensor) -> tuple[int, int]:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        raise ValueError(f"expected a non-empty uint8 image (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    return int(image.shape[0]), int(image.shape[1])


def classify_pixels(image: Tensor) -> Tensor:
    """(H, W) int64 palette index of each pixel of a uint8 (H, W, 3) image (order of ``COLOURS``), -1 for
    background: the colour whose ray from the background passes nearest the pixel, if the pixel lies within
    ``MAX_RESIDUAL`` of that ray and at least ``MIN_INTENSITY`` of the way along it."""
    _check_image(image)
    offset = image.float() - _BACKGROUND.to(image.device)  # (H, W, 3)
    palette = _PALETTE.to(image.device)  # (K, 3)
    # channel by channel, neither a matmul nor an (H, W, K, 3) product: on a busy CPU either can cost milliseconds
    # for a 72 x 72 image (BLAS and intra-op threads waiting for a core), three (H, W, K) products do not
    dot = sum(offset[..., c, None] * palette[:, c] for c in range(3))  # (H, W, K)
    squared = (palette * palette).sum(1)  # (K,)
    along = (dot / squared).clamp(min=0)  # (H, W, K) position on each ray, 1 at the palette colour
    # |p - a c|^2 expanded, so no (H, W, K, 3) difference is built; compared squared, as a square root on a
    # small tensor can cost milliseconds when torch's worker threads wait for a busy CPU
    residual = (offset * offset).sum(-1, keepdim=True) - 2 * along * dot + along * along * squared  # (H, W, K)
    nearest = residual.argmin(-1)  # (H, W)
    kept_along = along.gather(-1, nearest[..., None]).squeeze(-1)
    kept_residual = residual.gather(-1, nearest[..., None]).squeeze(-1)
    foreground = (kept_along >= MIN_INTENSITY) & (kept_residual <= MAX_RESIDUAL ** 2)
    return torch.where(foreground, nearest, -1)


def _shape_of(fill: float, skew: float) -> str:
    if skew <= TRIANGLE_SKEW:
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def detect(image: Tensor) -> list[Detection]:
    """The objects of a uint8 (H, W, 3) picture, in raster order of their first pixel.

    Each is an 8-connected component of pixels of one palette colour (``classify_pixels``) of at least
    ``MIN_AREA_FRACTION`` of the image; touching shapes of different colours stay apart.
    """
    height, width = _check_image(image)
    colour = classify_pixels(image)
    foreground = colour >= 0
    labels = label_components(foreground, colour[..., None], link_tolerance=0).view(-1)
    where = foreground.view(-1).nonzero().squeeze(1)  # (P,) flat indices of foreground pixels
    if len(where) == 0:
        return []
    # index_select, not labels[where]: advanced indexing of a few thousand elements can cost milliseconds when
    # torch's worker threads wait for a busy CPU
    roots, member, areas = torch.unique(labels.index_select(0, where), return_inverse=True, return_counts=True)
    rows, cols = where // width, where % width
    count = len(roots)
    y1 = torch.full((count,), height).scatter_reduce(0, member, rows, "amin")
    x1 = torch.full((count,), width).scatter_reduce(0, member, cols, "amin")
    y2 = torch.zeros(count, dtype=torch.long).scatter_reduce(0, member, rows + 1, "amax")
    x2 = torch.zeros(count, dtype=torch.long).scatter_reduce(0, member, cols + 1, "amax")
    fill = areas / ((y2 - y1) * (x2 - x1))
    mass_row = torch.zeros(count).scatter_add(0, member, rows.float()) / areas
    centred = rows.float() - mass_row.index_select(0, member)  # (P,)
    variance = torch.zeros(count).scatter_add(0, member, centred ** 2) / areas
    skew = torch.zeros(count).scatter_add(0, member, centred ** 3) / areas / variance.clamp(min=1e-6) ** 1.5
    names = colour.view(-1).index_select(0, roots)
    keep = (areas >= max(1.0, MIN_AREA_FRACTION * height * width)).nonzero().squeeze(1)
    stats = torch.stack([x1, y1, x2, y2, areas, names, fill, skew], 1).double().index_select(0, keep).tolist()
    detections = []
    for left, top, right, bottom, area, name, fill_ratio, skewness in stats:
        box = (int(left), int(top), int(right), int(bottom))
        detections.append(Detection(
            colour=_COLOUR_NAMES[int(name)], shape=_shape_of(fill_ratio, skewness),
            centre=((top + bottom) / 2, (left + right) / 2), box=box, area=int(area), fill=fill_ratio,
            skew=skewness))
    return detections


def in_relation(relation: str, first: tuple[float, float], second: tuple[float, float], margin: float = 0.0) -> bool:
    """Whether centre ``first`` (row, col) is ``relation`` centre ``second`` by more than ``margin`` pixels
    along the relation's axis; with ``margin=0`` exactly ``world.relation_holds``."""
    (row_a, col_a), (row_b, col_b) = first, second
    offsets = {"left of": col_b - col_a, "right of": col_a - col_b, "above": row_b - row_a, "below": row_a - row_b}
    if relation not in offsets:
        raise ValueError(f"unknown relation {relation!r}; choose from {sorted(offsets)}")
    return offsets[relation] > margin


def score(image: Tensor, spec: Spec) -> Verdict:
    """The picture's verdict on ``spec``.

    Sub-scores (0 or 100): ``presence`` = every phrase's colour + shape detected at least its count times;
    ``counts`` = exactly its count; ``relation`` = every detected object of thing 0 in the relation to every
    detected object of thing 1 (centres, ``RELATION_MARGIN``), 0 when either is missing; ``extras`` = no
    detected object outside the named colour + shape pairs. Category scores: binding = presence (the product
    over noun phrases), spatial = relation (presence for a spec without one), numeracy = counts, complex = mean
    of counts, relation and extras.
    """
    height, width = _check_image(image)
    detections = detect(image)
    found = Counter((d.colour, d.shape) for d in detections)
    reasons = []
    for thing in spec.things:
        have = found[(thing.colour, thing.shape)]
        if have != thing.count:
            reasons.append(f"{thing.colour} {thing.shape}: want {thing.count}, found {have}")
    presence = all(found[(t.colour, t.shape)] >= t.count for t in spec.things)
    counts = not reasons
    named = {(t.colour, t.shape) for t in spec.things}
    extras = sorted(f"{colour} {shape}" for colour, shape in found.elements() if (colour, shape) not in named)
    if extras:
        reasons.append(f"unrequested objects: {', '.join(extras)}")
    criteria = {"presence": 100.0 * presence, "counts": 100.0 * counts}
    if spec.relation is not None:
        first, second = spec.things[0], spec.things[1]
        centres_a = [d.centre for d in detections if (d.colour, d.shape) == (first.colour, first.shape)]
        centres_b = [d.centre for d in detections if (d.colour, d.shape) == (second.colour, second.shape)]
        margin = {"left of": width, "right of": width, "above": height, "below": height}.get(spec.relation, 0)
        holds = bool(centres_a) and bool(centres_b) and all(
            in_relation(spec.relation, a, b, RELATION_MARGIN * margin) for a in centres_a for b in centres_b)
        if not holds:
            reasons.append(f"not every {first.colour} {first.shape} is {spec.relation} every "
                           f"{second.colour} {second.shape}")
        criteria["relation"] = 100.0 * holds
    criteria["extras"] = 100.0 * (not extras)
    if spec.category == "binding":
        value = criteria["presence"]
    elif spec.category == "spatial":
        value = criteria.get("relation", criteria["presence"])
    elif spec.category == "numeracy":
        value = criteria["counts"]
    elif spec.category == "complex":
        parts = [criteria["counts"], criteria["extras"]] + ([criteria["relation"]] if "relation" in criteria else [])
        value = sum(parts) / len(parts)
    else:
        raise ValueError(f"unknown category {spec.category!r}; choose from {CATEGORIES}")
    return Verdict(score=value, passed=not reasons, category=spec.category, reasons=tuple(reasons),
                   criteria=criteria, detections=tuple(detections))


def report(verdicts: list[Verdict]) -> dict:
    """Per-category mean score (0-100), pass rate (0-1) and count, and the overall score: the mean of the
    category means (CompBench's way: each category weighs the same however many prompts it has)."""
    if not verdicts:
        raise ValueError("report needs at least one verdict")
    order = [c for c in CATEGORIES if any(v.category == c for v in verdicts)]
    order += sorted({v.category for v in verdicts} - set(order))
    categories = {}
    for category in order:
        members = [v for v in verdicts if v.category == category]
        categories[category] = {"score": sum(v.score for v in members) / len(members),
                                "pass_rate": sum(v.passed for v in members) / len(members),
                                "count": len(members)}
    overall = sum(c["score"] for c in categories.values()) / len(categories)
    return {"benchmark": "shapeworld", "categories": categories, "overall": overall}


__all__ = ["Detection", "Verdict", "classify_pixels", "detect", "in_relation", "report", "score"]
