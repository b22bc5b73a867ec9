"""ShapeWorld's yes/no questions: pretraining draws them balanced, their answers are the scene's truth, and the
atomic questions of a prompt all hold exactly when the checker passes a picture."""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict

import pytest

from srum.shapeworld.checker import score
from srum.shapeworld.questions import (
    COUNT_WORDS,
    QUESTION_KINDS,
    BalancedQuestions,
    ShapeWorldDecomposer,
    atomic_questions,
    atomic_truths,
)
from srum.shapeworld.tasks import cell_box, perturb
from srum.shapeworld.world import CATEGORIES, Scene, parse_spec, render, sample_spec, scene_for

_BOX = re.compile(r"\[(\d+), (\d+), (\d+), (\d+)\]")


def _scenes(count: int, seed: int = 0):
    """Scenes as pretraining shows them: half clean, half with one thing wrong."""
    rng = random.Random(seed)
    for _ in range(count):
        spec = sample_spec(rng.choice(CATEGORIES), rng)
        scene = scene_for(spec, rng)
        yield spec, (perturb(scene, spec, rng)[0] if rng.random() < 0.5 else scene), rng


def _drawn(count: int = 4000):
    questions = BalancedQuestions(lambda obj: "[{}, {}, {}, {}]".format(*cell_box(obj)))
    return [(scene, questions.draw(scene, rng)) for _, scene, rng in _scenes(count)]


def _count(scene: Scene, colour: str, shape: str) -> int:
    return sum((o.colour, o.shape) == (colour, shape) for o in scene.objects)


def _true_answer(scene: Scene, text: str) -> str:
    """The answer read off the scene from the question's words alone (independent of how it was drawn);
    relations are checked against the checker instead."""
    words = re.findall(r"[a-z]+", text.lower())
    numbers = {word: n for n, word in enumerate(COUNT_WORDS)}
    if text.startswith("How many"):
        return COUNT_WORDS[_count(scene, words[2], words[3].removesuffix("s"))]
    if text.startswith("Is the object in"):
        x1, y1, _, _ = map(int, _BOX.search(text).groups())
        (obj,) = [o for o in scene.objects if o.cell == (y1 // 12, x1 // 12)]
        return "yes" if (obj.colour, obj.shape) == (words[-2], words[-1]) else "no"
    if "objects" in words or words[-1] == "object":
        return "yes" if len(scene.objects) == numbers[words[-2]] else "no"
    if "exactly" in words:
        n = numbers[words[3]]
        return "yes" if _count(scene, words[4], words[5].removesuffix("s")) == n else "no"
    return "yes" if _count(scene, words[3], words[4]) else "no"


def test_every_question_kind_is_balanced():
    answers = defaultdict(Counter)
    for _, question in _drawn():
        answers[question.kind][question.answer] += 1
    assert set(answers) == set(QUESTION_KINDS)
    for kind, counts in answers.items():
        total = sum(counts.values())
        assert total > 400, kind
        if kind == "how_many":  # spread over the range: no answer a majority, every count asked
            assert max(counts.values()) / total < 0.55 and set(counts) == set(COUNT_WORDS[:5])
        else:
            assert set(counts) == {"yes", "no"} and 0.4 <= counts["yes"] / total <= 0.6, (kind, counts)


def test_every_drawn_answer_is_the_scenes_truth():
    checked = Counter()
    for scene, question in _drawn(1500):
        if question.kind == "relation":
            continue  # checked against the checker below
        assert question.answer == _true_answer(scene, question.text), question
        checked[question.kind] += 1
    assert min(checked.values()) > 100


def test_drawn_relation_answers_agree_with_the_checker():
    seen = 0
    for scene, question in _drawn(3000):
        if question.kind != "relation":
            continue
        first, relation, second = re.fullmatch(r"Is every (\w+ \w+) (.+) every (\w+ \w+)\?", question.text).groups()
        spec = parse_spec(f"a {first} {relation} a {second}")
        assert score(render(scene), spec).criteria["relation"] == 100.0 * (question.answer == "yes")
        seen += 1
    assert seen > 300


def test_atomic_questions_all_hold_exactly_when_the_checker_passes():
    verdicts = Counter()
    for spec, scene, _ in _scenes(1500, seed=1):
        passed = score(render(scene), spec).passed
        assert all(atomic_truths(spec, scene)) == passed
        verdicts[passed] += 1
    assert verdicts[True] > 300 and verdicts[False] > 300


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a red square", ["Is there exactly one red square?", "Is there exactly one object?"]),
    ("three blue circles", ["Are there exactly three blue circles?", "Are there exactly three objects?"]),
    ("two red squares left of a green circle",
     ["Are there exactly two red squares?", "Is there exactly one green circle?", "Are there exactly three objects?",
      "Is every red square left of every green circle?"]),
])
def test_atomic_questions_of_a_prompt(prompt, expected):
    assert atomic_questions(parse_spec(prompt)) == expected
    assert ShapeWorldDecomposer().questions([prompt]) == [expected]


def test_region_questions_ask_once_per_colour_shape_pair():
    questions = ShapeWorldDecomposer().region_questions("a red square and a blue circle", [0, 12, 12, 24], 36, 36)
    assert questions == ["Is the object in [0, 12, 12, 24] a red square?",
                         "Is the object in [0, 12, 12, 24] a blue circle?"]
