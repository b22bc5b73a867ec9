"""The ShapeWorld checker: exact on renders, blind to nothing a one-object edit changes, and robust to mild noise,
blur and upscaling."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from srum.shapeworld.checker import Detection, Verdict, classify_pixels, detect, in_relation, report, score
from srum.shapeworld.world import (
    CELL,
    COLOURS,
    GRID,
    RELATIONS,
    SHAPES,
    SIZE,
    Obj,
    Scene,
    Spec,
    Thing,
    prompts,
    relation_holds,
    render,
    scene_for,
)

CELLS = [(row, col) for row in range(GRID) for col in range(GRID)]


# The distortions avoid round, pad and pooling ops: on a busy 2-core machine each call of those can wait ~8 ms
# for torch's worker threads, which would dominate the suite's time.


def _to_uint8(values: Tensor) -> Tensor:
    """Round half up and saturate."""
    return (values.clamp(0, 255) + 0.5).to(torch.uint8)


def _noisy(image: Tensor, std: float = 8.0, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return _to_uint8(image.float() + std * torch.randn(image.shape, generator=generator))


def _blurred(image: Tensor) -> Tensor:
    """3 x 3 box blur, edges replicated."""
    pixels = image.float()
    pixels = torch.cat([pixels[:1], pixels, pixels[-1:]], 0)
    pixels = torch.cat([pixels[:, :1], pixels, pixels[:, -1:]], 1)  # (H + 2, W + 2, 3)
    height, width = image.shape[:2]
    total = sum(pixels[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3))
    return _to_uint8(total / 9)


def _upscaled(image: Tensor, factor: int = 2) -> Tensor:
    return image.repeat_interleave(factor, 0).repeat_interleave(factor, 1)


DISTORTIONS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "clean": lambda image, seed: image,
    "noise": lambda image, seed: _noisy(image, 8.0, seed),
    "blur": lambda image, seed: _blurred(image),
    "upscale": lambda image, seed: _upscaled(image),
}
# Every STRIDE-th case per distortion: a 72 x 72 image costs ~3 ms to check on an idle CPU but up to ~50 ms on a
# busy one (``label_components``' pointer jumping indexes with ``parent[parent]``, whose worker threads then wait
# for a core), so upscaled renders use a quarter of the cases to keep the suite well inside its time budget.
STRIDE = {"clean": 1, "noise": 1, "blur": 1, "upscale": 4}


def _scene_matches(scene: Scene, spec: Spec) -> bool:
    """The ground truth from the scene's objects, independent of any pixel: exact counts, nothing unnamed, the
    relation between every pair (cell coordinates, ``world.relation_holds``)."""
    pairs = [(obj.colour, obj.shape) for obj in scene.objects]
    named = {(thing.colour, thing.shape) for thing in spec.things}
    if any(pair not in named for pair in pairs):
        return False
    if any(pairs.count((thing.colour, thing.shape)) != thing.count for thing in spec.things):
        return False
    if spec.relation is None:
        return True
    first, second = ([obj.cell for obj in scene.objects if (obj.colour, obj.shape) == (thing.colour, thing.shape)]
                     for thing in spec.things[:2])
    return all(relation_holds(spec.relation, a, b) for a in first for b in second)


def _wrong_scenes(spec: Spec, scene: Scene, rng: random.Random) -> dict[str, Scene]:
    """One-thing-wrong edits of a scene that satisfies ``spec``, by kind."""
    objects = list(scene.objects)
    free = [cell for cell in CELLS if cell not in {obj.cell for obj in objects}]
    i = rng.randrange(len(objects))
    target = objects[i]
    colour = rng.choice([c for c in COLOURS if c != target.colour])
    shape = rng.choice([s for s in SHAPES if s != target.shape])
    extra = Obj(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(free))
    thing = rng.choice(spec.things)
    same = [obj for obj in objects if (obj.colour, obj.shape) == (thing.colour, thing.shape)]
    if thing.count > 1 and rng.random() < 0.5:
        recounted = [obj for obj in objects if obj is not same[0]]
    else:
        recounted = objects + [Obj(thing.colour, thing.shape, rng.choice(free))]
    edits = {
        "colour": Scene(tuple(objects[:i] + [Obj(colour, target.shape, target.cell)] + objects[i + 1:])),
        "shape": Scene(tuple(objects[:i] + [Obj(target.colour, shape, target.cell)] + objects[i + 1:])),
        "missing": Scene(tuple(objects[:i] + objects[i + 1:])),
        "extra": Scene(tuple(objects + [extra])),
        "count": Scene(tuple(recounted)),
    }
    if spec.relation is not None:
        # mirror the scene along the relation's axis: every pair's offset flips sign, so no pair keeps the relation
        axis = 1 if spec.relation in ("left of", "right of") else 0
        edits["relation"] = Scene(tuple(
            Obj(obj.colour, obj.shape, tuple(GRID - 1 - v if k == axis else v for k, v in enumerate(obj.cell)))
            for obj in objects))
    return edits


@pytest.fixture(scope="module")
def cases() -> list[tuple[Spec, Scene]]:
    """240 prompts, 80 per split, 60 per category, each with a scene that satisfies it."""
    rng = random.Random(11)
    return [(p.spec, scene_for(p.spec, rng)) for split in ("train", "val", "test") for p in prompts(split, 80, seed=5)]


@pytest.fixture(scope="module")
def wrong_cases(cases) -> list[tuple[str, Spec, Scene]]:
    """One-thing-wrong scenes of the first 24 prompts of each split (every category), each edit kind."""
    rng = random.Random(12)
    chosen = cases[:24] + cases[80:104] + cases[160:184]
    return [(kind, spec, edited) for spec, scene in chosen for kind, edited in _wrong_scenes(spec, scene, rng).items()]


def test_cases_cover_every_category_and_the_oracle_agrees(cases, wrong_cases):
    assert {spec.category for spec, _ in cases} == {"binding", "spatial", "numeracy", "complex"}
    assert {spec.relation for spec, _ in cases} >= set(RELATIONS)
    assert max(thing.count for spec, _ in cases for thing in spec.things) == 4
    assert all(_scene_matches(scene, spec) for spec, scene in cases)
    # every edit really changes the truth
    assert not [kind for kind, spec, scene in wrong_cases if _scene_matches(scene, spec)]
    assert {kind for kind, _, _ in wrong_cases} == {"colour", "shape", "missing", "extra", "count", "relation"}


@pytest.mark.parametrize("distortion", list(DISTORTIONS))
def test_renders_that_match_pass_with_full_score(cases, distortion):
    distort, cases = DISTORTIONS[distortion], cases[::STRIDE[distortion]]
    verdicts = [score(distort(render(scene), seed), spec) for seed, (spec, scene) in enumerate(cases)]
    failed = [(spec.text(), v.reasons) for (spec, _), v in zip(cases, verdicts, strict=True) if not v.passed]
    assert not failed, f"{len(failed)}/{len(cases)} failed under {distortion}: {failed[:3]}"
    assert all(v.score == 100.0 and v.reasons == () for v in verdicts)
    assert [v.category for v in verdicts] == [spec.category for spec, _ in cases]


@pytest.mark.parametrize("distortion", list(DISTORTIONS))
def test_one_thing_wrong_renders_fail(wrong_cases, distortion):
    distort, wrong_cases = DISTORTIONS[distortion], wrong_cases[::STRIDE[distortion]]
    assert {kind for kind, _, _ in wrong_cases} == {"colour", "shape", "missing", "extra", "count", "relation"}
    passed = [(kind, spec.text()) for seed, (kind, spec, scene) in enumerate(wrong_cases)
              if score(distort(render(scene), seed), spec).passed]
    assert not passed, f"{len(passed)}/{len(wrong_cases)} wrong renders passed under {distortion}: {passed[:5]}"


@pytest.mark.parametrize("distortion", list(DISTORTIONS))
def test_detect_reads_every_object_of_random_scenes(distortion):
    """All colours and shapes in every cell, 0 to 9 objects: colour, shape and cell exactly."""
    rng = random.Random(distortion)
    for seed in range(60 // STRIDE[distortion]):
        objects = tuple(Obj(rng.choice(list(COLOURS)), rng.choice(SHAPES), cell)
                        for cell in rng.sample(CELLS, rng.randint(0, 9)))
        image = DISTORTIONS[distortion](render(Scene(objects)), seed)
        pixel = image.shape[0] / SIZE  # image pixels per scene pixel
        found = sorted((d.colour, d.shape, (int(d.centre[0] // (CELL * pixel)), int(d.centre[1] // (CELL * pixel))))
                       for d in detect(image))
        assert found == sorted((obj.colour, obj.shape, obj.cell) for obj in objects)


def test_detections_describe_the_render():
    scene = Scene((Obj("red", "square", (0, 0)), Obj("blue", "circle", (1, 2)), Obj("white", "triangle", (2, 1))))
    for factor in (1, 2, 3):
        detections = {d.shape: d for d in detect(_upscaled(render(scene), factor))}
        assert set(detections) == {"square", "circle", "triangle"}
        square, circle, triangle = detections["square"], detections["circle"], detections["triangle"]
        assert (square.colour, circle.colour, triangle.colour) == ("red", "blue", "white")
        # objects fill their 12 px cell less a 2 px margin: an 8 x 8 box centred in the cell
        assert square.box == tuple(factor * v for v in (2, 2, 10, 10)) and square.area == (8 * factor) ** 2
        assert square.centre == (6.0 * factor, 6.0 * factor) and circle.centre == (18.0 * factor, 30.0 * factor)
        assert square.fill == 1.0 and 0.75 < circle.fill < 0.85 and 0.5 < triangle.fill < 0.65
        # the triangle's apex row is empty at this size, so its box starts one scene pixel low
        assert triangle.box == tuple(factor * v for v in (14, 27, 22, 34))
        assert triangle.skew < -0.5 and abs(circle.skew) < 1e-6 and abs(square.skew) < 1e-6


def test_background_noise_and_specks_are_not_objects():
    assert detect(torch.zeros(36, 36, 3, dtype=torch.uint8)) == []
    assert detect(_noisy(torch.zeros(36, 36, 3, dtype=torch.uint8), std=16.0)) == []
    image = render(Scene((Obj("green", "circle", (1, 1)),)))
    image[0:2, 0:2] = torch.tensor(COLOURS["red"], dtype=torch.uint8)  # a 4-pixel speck: 0.3% of the image
    assert [(d.colour, d.shape) for d in detect(image)] == [("green", "circle")]
    image[0:3, 0:3] = torch.tensor(COLOURS["red"], dtype=torch.uint8)  # 9 pixels: 0.7%, an object
    assert sorted(d.colour for d in detect(image)) == ["green", "red"]


def test_pixels_take_the_colour_whose_ray_they_lie_on():
    colours = list(COLOURS.values())
    image = torch.tensor([[colours[0], [c // 2 + 5 for c in colours[2]], [c // 3 for c in colours[3]],
                           [128, 128, 128], [240, 130, 40], [0, 0, 0]]], dtype=torch.uint8)
    # full red; blue at 0.52 of its intensity; yellow at a third (background); grey = dim white; orange is off
    # every ray by more than MAX_RESIDUAL; black
    assert classify_pixels(image).tolist() == [[0, 2, -1, 5, -1, -1]]


def test_touching_shapes_of_different_colours_stay_apart():
    # whole-cell squares: each touches the others along edges or corners, none its own colour
    scene = Scene((Obj("red", "square", (0, 0)), Obj("green", "square", (0, 1)), Obj("blue", "square", (1, 1)),
                   Obj("red", "square", (1, 2))))
    found = sorted((d.colour, d.shape, d.box) for d in detect(render(scene, margin=0)))
    assert found == [("blue", "square", (12, 12, 24, 24)), ("green", "square", (12, 0, 24, 12)),
                     ("red", "square", (0, 0, 12, 12)), ("red", "square", (24, 12, 36, 24))]
    # same colour touching at a corner is one blob (8-connectivity), as it should be for a pixel reader
    merged = Scene((Obj("red", "square", (0, 0)), Obj("red", "square", (1, 1))))
    assert [(d.colour, d.area) for d in detect(render(merged, margin=0))] == [("red", 288)]


def test_in_relation_with_no_margin_is_the_worlds_rule_and_the_margin_ignores_jitter():
    for relation in RELATIONS:
        for a in CELLS:
            for b in CELLS:
                assert in_relation(relation, a, b) == relation_holds(relation, a, b)
    assert in_relation("above", (5.0, 0.0), (6.0, 30.0)) and not in_relation("above", (5.0, 0.0), (6.0, 30.0), 3.0)
    with pytest.raises(ValueError, match="unknown relation"):
        in_relation("near", (0.0, 0.0), (1.0, 1.0))


def _one_pass(spec: Spec, *objects: Obj) -> Verdict:
    return score(render(Scene(objects)), spec)


def test_category_scores_follow_compbench_and_passed_is_strict():
    red_square, blue_circle = Thing("red", "square"), Thing("blue", "circle")
    binding = Spec((red_square, blue_circle), category="binding")
    both = (Obj("red", "square", (0, 0)), Obj("blue", "circle", (2, 2)))
    extra = Obj("green", "triangle", (1, 1))
    # binding is a product over noun phrases of presence: an extra object or a second copy keeps 100 ...
    for objects in ((*both, extra), (*both, Obj("red", "square", (1, 1)))):
        verdict = _one_pass(binding, *objects)
        assert verdict.score == 100.0 and not verdict.passed and len(verdict.reasons) == 1
    # ... and one missing phrase zeroes it
    assert _one_pass(binding, both[0]).score == 0.0
    assert _one_pass(binding, both[0]).reasons == ("blue circle: want 1, found 0",)
    spatial = Spec((red_square, blue_circle), relation="left of", category="spatial")
    assert _one_pass(spatial, *both).score == 100.0 and _one_pass(spatial, *both).passed
    swapped = (Obj("red", "square", (0, 2)), Obj("blue", "circle", (2, 0)))
    assert _one_pass(spatial, *swapped).score == 0.0 and not _one_pass(spatial, *swapped).passed
    assert _one_pass(spatial, both[0]).score == 0.0  # thing 1 missing: no relation to check
    # same row: the square is not above the triangle, although the triangle's box centre sits half a pixel lower
    row = Spec((red_square, Thing("blue", "triangle")), relation="above", category="spatial")
    side_by_side = (Obj("red", "square", (1, 0)), Obj("blue", "triangle", (1, 2)))
    assert [d.centre[0] for d in _one_pass(row, *side_by_side).detections] == [18.0, 18.5]
    assert _one_pass(row, *side_by_side).score == 0.0
    numeracy = Spec((Thing("yellow", "triangle", 3),), category="numeracy")
    three = [Obj("yellow", "triangle", cell) for cell in CELLS[:3]]
    assert _one_pass(numeracy, *three).score == 100.0
    assert _one_pass(numeracy, *three, Obj("yellow", "triangle", (2, 2))).score == 0.0
    assert _one_pass(numeracy, *three[:2]).reasons == ("yellow triangle: want 3, found 2",)
    complex_ = Spec((red_square, Thing("blue", "circle", 2)), relation="above", category="complex")
    good = (Obj("red", "square", (0, 1)), Obj("blue", "circle", (2, 0)), Obj("blue", "circle", (2, 2)))
    assert _one_pass(complex_, *good).score == 100.0 and _one_pass(complex_, *good).passed
    verdict = _one_pass(complex_, *good, extra)  # the extra triangle sits in the middle row: relation unaffected
    assert verdict.criteria == {"presence": 100.0, "counts": 100.0, "relation": 100.0, "extras": 0.0}
    assert verdict.score == pytest.approx(200 / 3) and verdict.reasons == ("unrequested objects: green triangle",)
    verdict = _one_pass(complex_, *good[:2])  # one circle short: counts fail, relation and extras hold
    assert verdict.criteria == {"presence": 0.0, "counts": 0.0, "relation": 100.0, "extras": 100.0}
    assert verdict.score == pytest.approx(200 / 3)
    verdict = _one_pass(complex_, good[0], Obj("blue", "circle", (2, 0)), Obj("blue", "circle", (0, 2)))
    assert verdict.criteria["relation"] == 0.0 and verdict.score == pytest.approx(200 / 3)
    for spec in (binding, spatial, numeracy, complex_):
        empty = score(torch.zeros(36, 36, 3, dtype=torch.uint8), spec)
        # an empty picture has no extra objects: complex keeps that third of its mean
        assert empty.score == (100 / 3 if spec is complex_ else 0.0)
        assert not empty.passed and empty.category == spec.category


def test_verdicts_are_frozen_and_carry_their_detections():
    verdict = _one_pass(Spec((Thing("red", "square"),)), Obj("red", "square", (0, 0)))
    assert [d.colour for d in verdict.detections] == ["red"] and isinstance(verdict.detections[0], Detection)
    with pytest.raises(AttributeError):
        verdict.score = 0.0
    hash(verdict)  # criteria are left out of the hash, so verdicts can live in sets


def test_bad_images_raise():
    for image in (torch.zeros(36, 36, 3), torch.zeros(36, 36, dtype=torch.uint8), torch.zeros(0, 5, 3,
                                                                                               dtype=torch.uint8)):
        with pytest.raises(ValueError, match="uint8 image"):
            detect(image)
    with pytest.raises(ValueError, match="unknown category"):
        score(torch.zeros(4, 4, 3, dtype=torch.uint8), Spec((Thing("red", "square"),), category="colour"))


def _verdict(category: str, value: float, passed: bool) -> Verdict:
    return Verdict(score=value, passed=passed, category=category, reasons=() if passed else ("x",), criteria={})


def test_report_aggregates_per_category_and_averages_categories_equally():
    verdicts = [_verdict("numeracy", 0.0, False), _verdict("binding", 100.0, True), _verdict("binding", 0.0, False),
                _verdict("binding", 50.0, False), _verdict("complex", 100 / 3, False)]
    result = report(verdicts)
    assert list(result["categories"]) == ["binding", "numeracy", "complex"]  # the world's category order
    assert result["categories"]["binding"] == {"score": 50.0, "pass_rate": pytest.approx(1 / 3), "count": 3}
    assert result["categories"]["numeracy"] == {"score": 0.0, "pass_rate": 0.0, "count": 1}
    assert result["categories"]["complex"]["score"] == pytest.approx(100 / 3)
    # the mean of category means (83.3 / 3 = 27.8), not of images (183.3 / 5 = 36.7)
    assert result["overall"] == pytest.approx((50.0 + 0.0 + 100 / 3) / 3)
    assert result["benchmark"] == "shapeworld" and json.loads(json.dumps(result)) == result
    with pytest.raises(ValueError, match="at least one"):
        report([])


def test_checking_is_fast(cases):
    """A soft guard against accidentally quadratic code: ~2 ms an image, the bound is 5x that; the best of three
    tries, so a busy machine does not fail it."""
    images = [(render(scene), spec) for spec, scene in cases[:200]]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        verdicts = [score(image, spec) for image, spec in images]
        best = min(best, time.perf_counter() - start)
        if best < 2.0:
            break
    assert len(verdicts) == 200 and best < 2.0, f"200 images took {best:.2f} s"
