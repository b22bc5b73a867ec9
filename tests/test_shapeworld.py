"""ShapeWorld's world and training tasks: prompts, splits, scenes that satisfy their prompts, hard negatives."""

from __future__ import annotations

import random

import pytest
import torch

from srum.shapeworld.tasks import SHAPEWORLD_INSTRUCTIONS, ShapeWorldTasks, corpus, perturb, wanted
from srum.shapeworld.world import (
    CATEGORIES,
    GRID,
    HELD_OUT,
    SIZE,
    Spec,
    Thing,
    prompts,
    relation_holds,
    render,
    sample_spec,
    scene_for,
)


def _satisfies(scene, spec: Spec) -> bool:
    counts = {}
    for obj in scene.objects:
        counts[(obj.colour, obj.shape)] = counts.get((obj.colour, obj.shape), 0) + 1
    if counts != {(t.colour, t.shape): t.count for t in spec.things}:
        return False
    if spec.relation is None:
        return True
    first = [o.cell for o in scene.objects if (o.colour, o.shape) == (spec.things[0].colour, spec.things[0].shape)]
    second = [o.cell for o in scene.objects if (o.colour, o.shape) == (spec.things[1].colour, spec.things[1].shape)]
    return all(relation_holds(spec.relation, a, b) for a in first for b in second)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_scenes_satisfy_their_prompts(split):
    rng = random.Random(0)
    for prompt in prompts(split, 200, seed=1):
        scene = scene_for(prompt.spec, rng)
        assert _satisfies(scene, prompt.spec), prompt.text
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        assert all(0 <= r < GRID and 0 <= c < GRID for o in scene.objects for r, c in [o.cell])


def test_splits_hold_out_colour_shape_pairs():
    def pairs(prompt):
        return {(t.colour, t.shape) for t in prompt.spec.things}

    assert not any(pairs(p) & HELD_OUT for p in prompts("train", 500))
    test = prompts("test", 2000)
    assert all(p.unseen == bool(pairs(p) & HELD_OUT) for p in test)
    assert 0.2 < sum(p.unseen for p in test) / len(test) < 0.3  # UNSEEN_SHARE of 0.25
    assert {p.category for p in prompts("val", 8)} == set(CATEGORIES)
    assert [p.text for p in prompts("test", 20, seed=3)] == [p.text for p in prompts("test", 20, seed=3)]


def test_render_paints_each_object_in_its_cell():
    spec = Spec((Thing("red", "square"), Thing("blue", "circle")), relation="left of", category="spatial")
    scene = scene_for(spec, random.Random(2))
    image = render(scene)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype.is_floating_point is False
    for obj in scene.objects:
        centre = image[obj.cell[0] * 12 + 6, obj.cell[1] * 12 + 6]
        assert centre.tolist() != [0, 0, 0]
    assert int((image.sum(-1) > 0).sum()) > 0


def test_hard_negatives_break_the_prompt():
    rng, kinds = random.Random(5), set()
    for _ in range(300):
        spec = sample_spec(rng.choice(CATEGORIES), rng)
        scene = scene_for(spec, rng)
        wrong, kind = perturb(scene, spec, rng)
        assert not _satisfies(wrong, spec)
        kinds.add(kind)
        change = len(wrong.objects) - len(scene.objects)
        assert change == {"extra": 1, "remove": -1}.get(kind, 0)
        if kind == "swap":
            assert sorted(o.cell for o in wrong.objects) == sorted(o.cell for o in scene.objects)  # same cells
    assert kinds == {"colour", "shape", "extra", "remove", "swap"}


def test_tasks_answer_from_the_ground_truth():
    from srum.model.autoencoder import build_autoencoder
    from srum.model.config import BagelConfig
    from srum.model.packing import Text, VaeImage, VitImage

    config = BagelConfig.from_name("shapeworld")
    tasks = ShapeWorldTasks(lambda text: [len(text)], build_autoencoder(config.ae))
    rng = random.Random(0)
    spec = Spec((Thing("red", "square", 2),), category="numeracy")
    scene = scene_for(spec, rng)
    image = tasks.text_to_image(spec, scene, random.Random(1))
    assert isinstance(image[-1], VaeImage) and image[-1].latent.shape == (108, 6, 6)
    vit, question, answer = tasks.global_score(spec, scene, random.Random(2))
    assert isinstance(vit, VitImage) and isinstance(answer, Text) and answer.loss
    assert all(wanted(o.colour, o.shape, spec) for o in scene.objects)
    texts = corpus(count=20)
    prefix = SHAPEWORLD_INSTRUCTIONS.global_instruction("X").split("X")[0]
    assert sum(text.startswith(prefix) for text in texts) == 20
    assert "How many red squares are there? zero one two three four five six" in texts
    assert "Is every red square left of every" in texts
    vit, question, answer = tasks.question(spec, scene, random.Random(3))
    assert isinstance(vit, VitImage) and not question.loss and answer.loss


def test_pretraining_schedule_warms_up_holds_and_decays_to_zero():
    from srum.shapeworld.pretrain import lr_factor

    factors = [lr_factor(step, warmup_steps=4, decay_steps=5, total_steps=20) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4:15] == [1.0] * 11
    assert factors[15:] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert lr_factor(19, 4, 0, 20) == 1.0  # no decay: constant to the end
    assert lr_factor(0, 0, 0, 20) == 1.0  # no warm-up


def test_pretrain_writes_a_checkpoint_that_generates_and_judges(tmp_path):
    from srum.cli import main
    from srum.generation.pipeline import Pipeline
    from srum.generation.sampler import SamplerConfig
    from srum.model.checkpoint import load_checkpoint
    from srum.shapeworld.evaluate import agreement_with_checker, evaluate_generation, evaluate_judge

    main(["shapeworld", "pretrain", "--config", "configs/shapeworld_pretrain.yaml", "--trainer.max_steps", "2",
          "--model.batch_size", "4", "--model.out", str(tmp_path / "base"), "--trainer.default_root_dir",
          str(tmp_path / "run"), "--trainer.enable_progress_bar", "false"])
    assert load_checkpoint(tmp_path / "base").config.latent_downsample == 12
    assert sum(f.stat().st_size for f in (tmp_path / "base").iterdir()) < 25 * 2**20
    pipeline = Pipeline.from_checkpoint(tmp_path / "base")
    test_prompts = prompts("test", 4)
    result = evaluate_generation(pipeline, test_prompts, SamplerConfig(num_timesteps=3), batch_size=4)
    assert result.report["benchmark"] == "shapeworld" and len(result.verdicts) == 4
    assert all(image.shape == (SIZE, SIZE, 3) for image in result.images)
    judge = evaluate_judge(pipeline, count=8)
    assert judge["balanced_accuracy"] == pytest.approx((judge["clean_accepted"] + judge["wrong_rejected"]) / 2)
    by_kind = judge["wrong_rejected_by_kind"].values()  # the overall share lies among the kinds' shares
    assert min(by_kind) - 1e-9 <= judge["wrong_rejected"] <= max(by_kind) + 1e-9
    agreement = agreement_with_checker(pipeline, result, test_prompts)
    assert agreement * 4 == pytest.approx(round(agreement * 4))  # a share of the 4 images


def test_pretrain_writes_the_checkpoint_in_the_asked_dtype_and_it_loads_in_float32(tmp_path):
    from safetensors.torch import load_file

    from srum.cli import main
    from srum.model.checkpoint import load_checkpoint

    main(["shapeworld", "pretrain", "--config", "configs/shapeworld_pretrain_v3.yaml", "--trainer.max_steps", "1",
          "--model.batch_size", "2", "--model.out", str(tmp_path / "base"), "--trainer.default_root_dir",
          str(tmp_path / "run"), "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
          "--trainer.callbacks", "[]"])
    written = load_file(tmp_path / "base" / "ema.safetensors")
    assert {tensor.dtype for tensor in written.values() if tensor.is_floating_point()} == {torch.float16}
    loaded = load_checkpoint(tmp_path / "base")
    assert loaded.config.llm.hidden_size == 256
    weights = dict(loaded.model.named_parameters())
    assert all(weights[name].dtype == torch.float32 and torch.equal(weights[name], tensor.float())
               for name, tensor in written.items() if name in weights)
    assert sum(f.stat().st_size for f in (tmp_path / "base").iterdir()) < 25 * 2**20


def test_generation_stops_at_generation_steps_while_understanding_trains_on(tmp_path):
    from safetensors.torch import load_file

    from srum.cli import main

    def pretrain(name, steps, *extra):
        main(["shapeworld", "pretrain", "--config", "configs/shapeworld_pretrain.yaml", "--trainer.max_steps",
              str(steps), "--model.batch_size", "4", "--model.decay_steps", "0", "--model.out", str(tmp_path / name),
              "--trainer.default_root_dir", str(tmp_path / f"{name}-run"), "--trainer.enable_progress_bar", "false",
              *extra])
        return load_file(tmp_path / name / "ema.safetensors")

    stopped, continued = pretrain("stopped", 1), pretrain("continued", 3, "--model.generation_steps", "1")
    generation = [name for name in stopped if "moe_gen" in name or name.startswith(("vae2llm", "llm2vae",
                                                                                     "time_embedder"))]
    assert len(generation) > 10
    assert all(torch.equal(stopped[name], continued[name]) for name in generation)
    assert not all(torch.equal(stopped[name], continued[name]) for name in stopped if name not in generation)



def test_understanding_samples_may_show_held_out_pairs_text_to_image_never():
    from srum.model.autoencoder import build_autoencoder
    from srum.model.config import BagelConfig
    from srum.shapeworld.tasks import TaskMix
    from srum.shapeworld.world import HELD_OUT

    texts: list[str] = []
    config = BagelConfig.from_name("shapeworld")
    tasks = ShapeWorldTasks(lambda text: texts.append(text) or [1], build_autoencoder(config.ae), text_dropout=0.0)
    rng = random.Random(0)

    def named_held_out(text: str) -> bool:
        return any(f"{colour} {shape}" in text for colour, shape in HELD_OUT)

    for kind, mix in (("text_to_image", TaskMix(1, 0, 0, 0, 0)), ("caption", TaskMix(0, 0, 0, 0, 1))):
        for split in (None, "any"):
            texts.clear()
            for _ in range(200):
                tasks.sample(rng, mix=mix, understanding_split=split)
            shown = sum(map(named_held_out, texts))
            assert (shown > 0) == (kind == "caption" and split == "any"), (kind, split)
