"""ShapeWorld: procedural scenes of coloured shapes on a 3 x 3 grid, and prompts about them in categories that
mirror T2I-CompBench (attribute binding, 2-D spatial relations, numeracy, complex).

A scene is 36 x 36 px: a 3 x 3 grid of 12 x 12 cells with at most one object per cell, so with a 6x pixel-shuffle
autoencoder and 2 x 2 latent patches each latent token is exactly one cell (one object per token, the layout
that is learnable in minutes on a CPU).

Splits hold out colour-shape combinations: training prompts never name a held-out pair; a quarter of the
validation and test prompts name at least one (CompBench's "unseen" combinations), the rest are fresh prompts of
seen pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

CELL, GRID = 12, 3
SIZE = CELL * GRID
BACKGROUND = (0, 0, 0)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (240, 220, 40),
    "purple": (160, 60, 210), "white": (235, 235, 235),
}
SHAPES = ("square", "circle", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
HELD_OUT = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "triangle")})
Category = Literal["binding", "spatial", "numeracy", "complex"]
CATEGORIES: tuple[Category, ...] = ("binding", "spatial", "numeracy", "complex")
Split = Literal["train", "val", "test", "any"]
"""``train``: held-out pairs never named; ``val``/``test``: at least one held-out pair named; ``any``: every pair,
without that requirement (what understanding samples may show: the pairs are held out of drawing, not of
seeing)."""


@dataclass(frozen=True)
class Thing:
    """A noun phrase: ``count`` objects of one colour and shape."""

    colour: str
    shape: str
    count: int = 1

    def text(self) -> str:
        if self.count == 1:
            return f"a {self.colour} {self.shape}"
        return f"{NUMBERS[self.count]} {self.colour} {self.shape}s"


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: the things, and optionally a relation of the first thing to the second."""

    things: tuple[Thing, ...]
    relation: str | None = None
    category: Category = "binding"

    def text(self) -> str:
        if self.relation is not None:
            return f"{self.things[0].text()} {self.relation} {self.things[1].text()}"
        return " and ".join(thing.text() for thing in self.things)


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cell: tuple[int, int]
    """(row, col) of the grid cell."""


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...] = field(default_factory=tuple)


_WORDS = {word: count for count, word in NUMBERS.items()}


def _parse_thing(text: str, source: str) -> Thing:
    words = text.split()
    if len(words) == 3 and words[1] in COLOURS:
        count, colour, shape = (1 if words[0] == "a" else _WORDS.get(words[0], 0)), words[1], words[2]
        shape = shape[:-1] if count > 1 and shape.endswith("s") else shape
        if count and shape in SHAPES:
            return Thing(colour, shape, count)
    raise ValueError(f"prompt {source!r}: expected noun phrases like 'a red square' or 'two blue circles' "
                     f"(joined by 'and' or a relation), got {text!r}")


def parse_spec(text: str) -> Spec:
    """The spec a ShapeWorld prompt states (the inverse of ``Spec.text``). Texts do not name their category, so
    it is inferred: a relation makes it spatial (complex if a count exceeds one); otherwise one thing with a count
    is numeracy and the rest binding."""
    for relation in RELATIONS:
        first, found, second = text.partition(f" {relation} ")
        if found:
            things = (_parse_thing(first, text), _parse_thing(second, text))
            category = "complex" if any(t.count > 1 for t in things) else "spatial"
            return Spec(things, relation=relation, category=category)
    things = tuple(_parse_thing(part, text) for part in text.split(" and "))
    return Spec(things, category="numeracy" if len(things) == 1 and things[0].count > 1 else "binding")


def _shape_mask(shape: str, size: int) -> Tensor:
    """A boolean mask of a shape filling a ``size`` x ``size`` box."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    if shape == "square":
        return torch.ones(size, size, dtype=torch.bool)
    if shape == "circle":
        return (y - size / 2) ** 2 + (x - size / 2) ** 2 <= (size / 2) ** 2
    # triangle pointing up: apex at the top middle, base along the bottom
    return (x - size / 2).abs() <= y / 2


def render(scene: Scene, margin: int = 2) -> Tensor:
    """The scene as uint8 pixels (SIZE, SIZE, 3): each object fills its cell less ``margin`` on every side."""
    image = torch.tensor(BACKGROUND, dtype=torch.uint8).expand(SIZE, SIZE, 3).clone()
    inner = CELL - 2 * margin
    for obj in scene.objects:
        top, left = obj.cell[0] * CELL + margin, obj.cell[1] * CELL + margin
        mask = _shape_mask(obj.shape, inner)
        image[top:top + inner, left:left + inner][mask] = torch.tensor(COLOURS[obj.colour], dtype=torch.uint8)
    return image


def relation_holds(relation: str, first: tuple[float, float], second: tuple[float, float]) -> bool:
    """Whether the object centred at ``first`` (row, col) is ``relation`` the one at ``second``."""
    (row_a, col_a), (row_b, col_b) = first, second
    return {"left of": col_a < col_b, "right of": col_a > col_b, "above": row_a < row_b,
            "below": row_a > row_b}[relation]


def _pairs(split: Split) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return [p for p in pairs if p not in HELD_OUT] if split == "train" else pairs


def _things(rng: random.Random, count: int, split: Split, max_count: int = 1) -> tuple[Thing, ...]:
    """Distinct colour-shape pairs; outside training at least one of them held out."""
    pairs = _pairs(split)
    while True:
        chosen = rng.sample(pairs, count)
        if split in ("train", "any") or any(pair in HELD_OUT for pair in chosen):
            return tuple(Thing(c, s, rng.randint(1, max_count)) for c, s in chosen)


def sample_spec(category: Category, rng: random.Random, split: Split = "train") -> Spec:
    if category == "binding":
        return Spec(_things(rng, rng.randint(1, 2), split), category=category)
    if category == "spatial":
        return Spec(_things(rng, 2, split), relation=rng.choice(RELATIONS), category=category)
    if category == "numeracy":
        return Spec(_things(rng, 1, split, max_count=4), category=category)
    return Spec(_things(rng, 2, split, max_count=2), relation=rng.choice(RELATIONS), category=category)


def _cells_in_relation(relation: str, rng: random.Random, first: int, second: int) -> list[tuple[int, int]] | None:
    """Cells for ``first`` objects of the first thing and ``second`` of the second, every first object in the
    relation to every second one (None if the draw fails; the caller retries)."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    split_at = rng.randint(1, GRID - 1)
    axis = 1 if relation in ("left of", "right of") else 0
    low = [cell for cell in cells if cell[axis] < split_at]
    high = [cell for cell in cells if cell[axis] >= split_at]
    near, far = (low, high) if relation in ("left of", "above") else (high, low)
    if len(near) < first or len(far) < second:
        return None
    return rng.sample(near, first) + rng.sample(far, second)


def scene_for(spec: Spec, rng: random.Random) -> Scene:
    """A scene that satisfies ``spec`` exactly (no other objects)."""
    counts = [thing.count for thing in spec.things]
    while True:
        if spec.relation is None:
            cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], sum(counts))
        else:
            cells = _cells_in_relation(spec.relation, rng, counts[0], counts[1])
            if cells is None:
                continue
        objects, start = [], 0
        for thing in spec.things:
            objects += [Obj(thing.colour, thing.shape, cell) for cell in cells[start:start + thing.count]]
            start += thing.count
        return Scene(tuple(objects))


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    spec: Spec

    @property
    def text(self) -> str:
        return self.spec.text()

    @property
    def category(self) -> str:
        return self.spec.category

    @property
    def unseen(self) -> bool:
        """Names a colour-shape pair held out of training."""
        return any((t.colour, t.shape) in HELD_OUT for t in self.spec.things)


UNSEEN_SHARE = 0.25
"""Share of validation and test prompts that name a held-out colour-shape pair (CompBench's unseen combinations);
the others name only pairs seen in training."""


def prompts(split: Split, count: int, seed: int = 0) -> list[Prompt]:
    """``count`` prompts of the split, categories in turn, reproducible from ``seed``; ids unique per split."""
    offsets = {"train": 0, "val": 1, "test": 2}
    rng = random.Random(seed * 7919 + offsets[split])
    drawn = []
    for index in range(count):
        unseen = split != "train" and rng.random() < UNSEEN_SHARE
        spec = sample_spec(CATEGORIES[index % len(CATEGORIES)], rng, split if unseen else "train")
        drawn.append(Prompt(f"{split}-{index}", spec))
    return drawn


def ground_truth_image(text: str, seed: int) -> Tensor:
    """A clean render of a prompt, its scene drawn from ``seed``: the perfect training data of the ceiling arm."""
    return render(scene_for(parse_spec(text), random.Random(seed)))
