"""Self-judging through the model's own description: descriptions read back into scenes exactly, and the judge's
scores follow from the atomic questions answered on the described scene."""

from __future__ import annotations

import random

import pytest
import torch

from srum.generation.pipeline import Pipeline
from srum.model.autoencoder import from_uint8_image
from srum.model.overfit import overfit
from srum.model.packing import Text, VitImage, pack
from srum.shapeworld.describe import DescriptionJudge, read_description
from srum.shapeworld.tasks import CAPTION_QUESTION, caption, perturb
from srum.shapeworld.world import CATEGORIES, Obj, Scene, render, sample_spec, scene_for


def test_a_caption_reads_back_into_its_scene():
    rng = random.Random(0)
    for _ in range(300):
        spec = sample_spec(rng.choice(CATEGORIES), rng)
        scene = perturb(scene_for(spec, rng), spec, rng)[0] if rng.random() < 0.5 else scene_for(spec, rng)
        read, unread = read_description(caption(scene))
        assert unread == 0 and sorted(read.objects, key=lambda o: o.cell) == sorted(scene.objects, key=lambda o: o.cell)
    assert read_description("nothing") == (Scene(), 0)


def test_parts_that_do_not_read_are_counted_and_left_out():
    scene, unread = read_description("top left red square, left red, bottom right purple hexagon, top left blue circle")
    assert scene == Scene((Obj("red", "square", (0, 0)),)) and unread == 2


@pytest.mark.parametrize("aggregate", ["product", "mean"])
def test_a_model_that_describes_a_picture_is_judged_by_its_description(tmp_path, aggregate):
    """Teach a tiny model one description, then judge the picture against prompts it does and does not match."""
    from srum.cli import main

    main(["model", "init", "--preset", "shapeworld", "--out", str(tmp_path), "--seed", "0"])
    pipeline = Pipeline.from_checkpoint(tmp_path)
    scene = Scene((Obj("red", "square", (0, 0)), Obj("blue", "circle", (0, 2))))
    image = render(scene)
    batch = pack([[VitImage(from_uint8_image(image)), Text(pipeline.encode(CAPTION_QUESTION)),
                   Text(pipeline.encode(caption(scene)), loss=True)]], pipeline.model.config, pipeline.special)
    losses = overfit(pipeline.model, batch, steps=80, lr=3e-3)
    assert losses[-1] < 0.05 * losses[0]
    pipeline.model.eval()
    judge = DescriptionJudge(pipeline, aggregate)
    right, wrong = judge.score([image, image], ["a red square left of a blue circle", "two red squares"],
                               ["a.png", "b.png"])
    assert right.answers["description"] == caption(scene) and right.global_scores.expected == 1.0
    # "two red squares": exactly two red squares (no), exactly two objects (yes)
    assert wrong.global_scores.expected == (-1.0 if aggregate == "product" else 0.0)
    assert [r.scores.expected for r in wrong.regions] == [1.0, -1.0]  # the red square is wanted, the circle not
    assert torch.tensor(right.regions[1].box).tolist() == pytest.approx([2 / 3, 0.0, 1.0, 1 / 3])


def test_the_shipped_base_judges_by_what_it_sees():
    """The shipped base's description follows the picture: a clean render is accepted for its own prompt and
    rejected for the same prompt with one colour word changed."""
    from srum.shapeworld.world import COLOURS, prompts

    judge = DescriptionJudge(Pipeline.from_checkpoint("srum:shapeworld-base"))
    rng = random.Random(0)
    chosen = [p for p in prompts("val", 40) if not p.unseen][:24]
    images = [render(scene_for(p.spec, rng)) for p in chosen]
    first = [p.spec.things[0].colour for p in chosen]
    recoloured = [p.text.replace(colour, next(c for c in COLOURS if c != colour and c not in p.text), 1)
                  for p, colour in zip(chosen, first, strict=True)]
    right = [r.global_scores.expected for r in judge.score(images, [p.text for p in chosen], ["x"] * len(images))]
    wrong = [r.global_scores.expected for r in judge.score(images, recoloured, ["x"] * len(images))]
    assert sum(v > 0 for v in right) >= 0.6 * len(right) and sum(v < 0 for v in wrong) >= 0.9 * len(wrong)
