"""Training samples of ShapeWorld for the base model's unified pretraining (next-token CE + flow matching):
text-to-image pairs, questions about scenes, and the scoring instructions answered from the scene's ground truth
on clean and deliberately wrong renders (hard negatives), so the base model can judge before SRUM starts."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields, replace

import torch

from srum.model.autoencoder import from_uint8_image
from srum.model.packing import Item, Text, VaeImage, VitImage
from srum.reward.instructions import DEFAULT_INSTRUCTIONS, ScoringInstructions, box_text
from srum.shapeworld.questions import COUNT_WORDS, BalancedQuestions, atomic_questions
from srum.shapeworld.world import (
    CATEGORIES,
    CELL,
    COLOURS,
    GRID,
    RELATIONS,
    SHAPES,
    SIZE,
    Obj,
    Scene,
    Spec,
    render,
    sample_spec,
    scene_for,
)

# Short instructions: the default wording is ~900 tokens, too long to train on by the thousand on a CPU.
SHAPEWORLD_INSTRUCTIONS: ScoringInstructions = DEFAULT_INSTRUCTIONS.replace(
    global_template="Does the picture show '{prompt}', with the layout it asks for? Score from -1 to 1.",
    region_template=("Picture for '{prompt}', {width}x{height} pixels, regions:\n{regions}\n"
                     "For each region: Region ID, Identified Object, Score from -1 to 1."),
    single_region_template=("Picture for '{prompt}', {width}x{height} pixels. Is the object in {box} one the "
                            "prompt asks for? Score from -1 to 1."),
    sample_template="How well does the picture show '{prompt}'? Score from -1 to 1.",
    version="shapeworld-1",
)


def perturb(scene: Scene, spec: Spec, rng: random.Random) -> tuple[Scene, str]:
    """The scene with one thing wrong: an object recoloured or reshaped, an object removed or added, or (for
    relations) the two groups swapped; returned with the kind of change (``colour``, ``shape``, ``extra``,
    ``remove`` or ``swap``)."""
    objects = list(scene.objects)
    kinds = ["colour", "shape", "extra"] + (["remove"] if len(objects) > 1 else []) + (["swap"] if spec.relation
                                                                                      else [])
    kind = rng.choice(kinds)
    index = rng.randrange(len(objects))
    target = objects[index]
    if kind == "colour":
        objects[index] = replace(target, colour=rng.choice([c for c in COLOURS if c != target.colour]))
    elif kind == "shape":
        objects[index] = replace(target, shape=rng.choice([s for s in SHAPES if s != target.shape]))
    elif kind == "remove":
        objects.pop(index)
    elif kind == "extra":
        free = [(r, c) for r in range(GRID) for c in range(GRID) if all(o.cell != (r, c) for o in objects)]
        if not free:
            return perturb(scene, spec, rng)
        objects.append(Obj(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(free)))
    else:  # the two groups trade places, which reverses the relation (needs groups of equal size)
        first = spec.things[0].count
        if len(objects) != 2 * first:
            return perturb(scene, spec, rng)
        cells = [o.cell for o in objects]
        objects = [replace(o, cell=c) for o, c in zip(objects, cells[first:] + cells[:first], strict=True)]
    return Scene(tuple(objects)), kind


def cell_box(obj: Obj) -> list[int]:
    """The pixel box [x1, y1, x2, y2] of an object's grid cell."""
    return [obj.cell[1] * CELL, obj.cell[0] * CELL, (obj.cell[1] + 1) * CELL, (obj.cell[0] + 1) * CELL]


def wanted(colour: str, shape: str, spec: Spec) -> bool:
    """Whether the prompt asks for an object of this colour and shape."""
    return any(colour == t.colour and shape == t.shape for t in spec.things)


def _score_text(value: float) -> str:
    return f"Score: {value:.1f}"


CAPTION_QUESTION = "Describe the picture."
ROW_WORDS, COLUMN_WORDS = ("top", "middle", "bottom"), ("left", "centre", "right")


def caption(scene: Scene) -> str:
    """Every object in reading order with its cell: ``top left red square, bottom centre blue circle``."""
    objects = sorted(scene.objects, key=lambda o: o.cell)
    parts = [f"{ROW_WORDS[o.cell[0]]} {COLUMN_WORDS[o.cell[1]]} {o.colour} {o.shape}" for o in objects]
    return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class TaskMix:
    """Relative frequencies of the sample kinds."""

    text_to_image: float = 0.5
    """Prompt -> image pairs (flow matching)."""
    global_score: float = 0.2
    """The global scoring instruction on a clean or one-thing-wrong render, answered from the ground truth."""
    region_score: float = 0.15
    """The single-region scoring instruction on one object of a clean or wrong render."""
    question: float = 0.15
    """Yes/no and counting questions of every kind in ``srum.shapeworld.questions``, answers balanced, on clean
    or one-thing-wrong renders: the atomic questions decomposed self-scoring asks."""
    caption: float = 0.0
    """Describe the picture, object by object: reading colours and shapes off the image directly, which teaches
    a randomly initialised vision path far faster than questions whose answer depends on the prompt too."""


class ShapeWorldTasks:
    """Draws unified training samples; ``encode`` turns text into token ids (the tokenizer's, no markers)."""

    def __init__(self, encode, autoencoder, mix: TaskMix | None = None, text_dropout: float = 0.1) -> None:
        self.encode, self.autoencoder = encode, autoencoder
        self.mix, self.text_dropout = mix or TaskMix(), text_dropout
        self.questions = BalancedQuestions(lambda obj: box_text(cell_box(obj), SIZE, SIZE))

    def _text(self, text: str, loss: bool = False) -> Text:
        return Text(self.encode(text), loss=loss)

    def text_to_image(self, spec: Spec, scene: Scene, rng: random.Random) -> list[Item]:
        latent = self.autoencoder.encode(from_uint8_image(render(scene))[None])[0]
        timestep = float(torch.sigmoid(torch.tensor(rng.gauss(0.0, 1.0))))
        image = VaeImage(latent, timestep=timestep)
        return [image] if rng.random() < self.text_dropout else [self._text(spec.text()), image]

    def global_score(self, spec: Spec, scene: Scene, rng: random.Random) -> list[Item]:
        clean = rng.random() < 0.5
        shown = scene if clean else perturb(scene, spec, rng)[0]
        question = SHAPEWORLD_INSTRUCTIONS.global_instruction(spec.text())
        return [VitImage(from_uint8_image(render(shown))), self._text(question),
                self._text(_score_text(1.0 if clean else -1.0), loss=True)]

    def region_score(self, spec: Spec, scene: Scene, rng: random.Random) -> list[Item]:
        shown = scene if rng.random() < 0.5 else perturb(scene, spec, rng)[0]
        obj = rng.choice(shown.objects)
        question = SHAPEWORLD_INSTRUCTIONS.single_region_instruction(spec.text(), cell_box(obj), SIZE, SIZE)
        return [VitImage(from_uint8_image(render(shown))), self._text(question),
                self._text(_score_text(1.0 if wanted(obj.colour, obj.shape, spec) else -1.0), loss=True)]

    def question(self, spec: Spec, scene: Scene, rng: random.Random) -> list[Item]:
        shown = scene if rng.random() < 0.5 else perturb(scene, spec, rng)[0]
        drawn = self.questions.draw(shown, rng)
        return [VitImage(from_uint8_image(render(shown))), self._text(drawn.text),
                self._text(drawn.answer, loss=True)]

    def caption(self, spec: Spec, scene: Scene, rng: random.Random) -> list[Item]:
        return [VitImage(from_uint8_image(render(scene))), self._text(CAPTION_QUESTION),
                self._text(caption(scene), loss=True)]

    def sample(self, rng: random.Random, split: str = "train", mix: TaskMix | None = None,
               understanding_split: str | None = None) -> list[Item]:
        """One sample of a kind drawn from ``mix`` (default: the tasks' own mix). With ``understanding_split``,
        samples of the understanding kinds draw their scene from that split instead (``any``: the held-out pairs
        too), text-to-image ones still from ``split``."""
        category = rng.choice(CATEGORIES)
        spec = sample_spec(category, rng, split)
        scene = scene_for(spec, rng)
        kinds = [kind.name for kind in fields(TaskMix)]  # each mix field names the method that draws that kind
        kind = rng.choices(kinds, [getattr(mix or self.mix, kind) for kind in kinds])[0]
        if understanding_split is not None and kind != "text_to_image":
            spec = sample_spec(category, rng, understanding_split)
            scene = scene_for(spec, rng)
        return getattr(self, kind)(spec, scene, rng)


def corpus(count: int = 2000, seed: int = 0) -> list[str]:
    """Texts for the ShapeWorld tokenizer: prompts of every split, the instructions, questions and answers."""
    rng = random.Random(seed)
    texts = []
    for index in range(count):
        spec = sample_spec(CATEGORIES[index % len(CATEGORIES)], rng, ("train", "val", "test")[index % 3])
        texts += [spec.text(), SHAPEWORLD_INSTRUCTIONS.global_instruction(spec.text()),
                  SHAPEWORLD_INSTRUCTIONS.single_region_instruction(spec.text(), [0, 12, 12, 24], 36, 36),
                  _score_text(rng.choice([-1.0, 1.0]))]
        texts += atomic_questions(spec)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    texts += [f"How many {c} {s}s are there? {' '.join(COUNT_WORDS)}" for c, s in pairs]
    texts += [f"Is there a {c} {s}? yes no Is the object in [0, 12, 12, 24] a {c} {s}?" for c, s in pairs]
    texts += [f"Is every {c} {s} {relation} every" for c, s in pairs for relation in RELATIONS]
    texts += [CAPTION_QUESTION] + [f"{r} {col} {c} {s}," for r in ROW_WORDS for col in COLUMN_WORDS for c in COLOURS
                                   for s in SHAPES]
    return texts
