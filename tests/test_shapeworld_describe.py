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
