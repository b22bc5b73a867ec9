"""Yes/no questions about ShapeWorld scenes, in one wording shared by pretraining and self-scoring.

``atomic_questions`` splits a prompt into the questions whose answers decide the checker's strict verdict: each
noun phrase with exactly its count, the total number of objects (no extras), and the relation. ``region_questions``
ask what the object in a box is. ``BalancedQuestions`` draws pretraining questions of every kind with answers
balanced by construction (half yes, half no; counts spread over their range): asked pairs drawn uniformly from all
18 made "no" and "zero" the right answer 92 % of the time, and a model learned those constants.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from srum.reward.instructions import box_text
from srum.shapeworld.world import COLOURS, RELATIONS, SHAPES, Obj, Scene, Spec, parse_spec, relation_holds

COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
"""Number words of answers and questions (scenes hold up to four objects, five with an extra one)."""
QUESTION_KINDS = ("presence", "how_many", "exact_count", "total", "relation", "region")
YES, NO = "yes", "no"


def _noun(colour: str, shape: str, count: int) -> str:
    return f"{colour} {shape}" + ("s" if count != 1 else "")


def exact_count_question(colour: str, shape: str, count: int) -> str:
    if count == 1:
        return f"Is there exactly one {colour} {shape}?"
    return f"Are there exactly {COUNT_WORDS[count]} {_noun(colour, shape, count)}?"


def total_question(count: int) -> str:
    if count == 1:
        return "Is there exactly one object?"
    return f"Are there exactly {COUNT_WORDS[count]} objects?"


def relation_question(first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
    return f"Is every {first[0]} {first[1]} {relation} every {second[0]} {second[1]}?"


def presence_question(colour: str, shape: str) -> str:
    return f"Is there a {colour} {shape}?"


def how_many_question(colour: str, shape: str) -> str:
    return f"How many {colour} {shape}s are there?"


def region_question(box: str, colour: str, shape: str) -> str:
    """``box`` is the ``[x1, y1, x2, y2]`` text of the scoring instructions."""
    return f"Is the object in {box} a {colour} {shape}?"


def atomic_questions(spec: Spec) -> list[str]:
    """The questions all answered yes exactly when a picture passes the checker for ``spec``: every phrase with
    exactly its count, exactly as many objects in all (nothing else drawn), and the relation if there is one."""
    questions = [exact_count_question(t.colour, t.shape, t.count) for t in spec.things]
    questions.append(total_question(sum(t.count for t in spec.things)))
    if spec.relation is not None:
        first, second = spec.things
        questions.append(relation_question((first.colour, first.shape), spec.relation, (second.colour, second.shape)))
    return questions


def atomic_truths(spec: Spec, scene: Scene) -> list[bool]:
    """The true answers of ``atomic_questions(spec)`` about a scene, in the same order."""
    present = Counter((o.colour, o.shape) for o in scene.objects)
    truths = [present[(t.colour, t.shape)] == t.count for t in spec.things]
    truths.append(len(scene.objects) == sum(t.count for t in spec.things))
    if spec.relation is not None:
        first, second = spec.things
        truths.append(relation_in_scene(scene, (first.colour, first.shape), spec.relation,
                                        (second.colour, second.shape)))
    return truths


class ShapeWorldDecomposer:
    """Atomic questions parsed from ShapeWorld prompts (a prompt that does not parse is an error, not a guess);
    the ``srum.reward.decompose.Decomposer`` of ShapeWorld."""

    def questions(self, prompts: list[str]) -> list[list[str]]:
        return [atomic_questions(parse_spec(prompt)) for prompt in prompts]

    def region_questions(self, prompt: str, box: list[int], width: int, height: int) -> list[str]:
        """One question per colour-shape pair of the prompt: is the object in the box of that pair?"""
        pairs = dict.fromkeys((t.colour, t.shape) for t in parse_spec(prompt).things)
        return [region_question(box_text(box, width, height), *pair) for pair in pairs]


def relation_in_scene(scene: Scene, first: tuple[str, str], relation: str, second: tuple[str, str]) -> bool:
    """Whether every object of the first pair is ``relation`` every object of the second (false if either is
    absent): the checker's relation rule on grid cells."""
    cells_a = [o.cell for o in scene.objects if (o.colour, o.shape) == first]
    cells_b = [o.cell for o in scene.objects if (o.colour, o.shape) == second]
    return bool(cells_a and cells_b) and all(relation_holds(relation, a, b) for a in cells_a for b in cells_b)


def _one_word_away(obj: Obj) -> list[tuple[str, str]]:
    """Pairs one word away from an object: another colour of its shape, another shape of its colour."""
    return [(c, obj.shape) for c in COLOURS if c != obj.colour] + [(obj.colour, s) for s in SHAPES if s != obj.shape]


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str


class BalancedQuestions:
    """Draws one question about a scene: a kind uniformly from ``QUESTION_KINDS``, then, for yes/no kinds, the
    answer by a coin (asked pairs are in the scene or one word away from an object in it), and for ``how_many``
    the answer uniformly from the counts the scene can answer with (zero included). ``region`` questions need the
    box text of an object, ``box_text(obj)``."""

    def __init__(self, box_text) -> None:
        self.box_text = box_text

    def draw(self, scene: Scene, rng: random.Random) -> Question:
        present = Counter((o.colour, o.shape) for o in scene.objects)
        while True:
            kind = rng.choice(QUESTION_KINDS)
            question = getattr(self, kind)(scene, present, rng)
            if question is not None:
                return question

    @staticmethod
    def _absent_pair(scene: Scene, present: Counter, rng: random.Random) -> tuple[str, str]:
        misses = [pair for obj in scene.objects for pair in _one_word_away(obj) if not present[pair]]
        if misses:
            return rng.choice(misses)
        return rng.choice([(c, s) for c in COLOURS for s in SHAPES if not present[(c, s)]])

    def presence(self, scene: Scene, present: Counter, rng: random.Random) -> Question | None:
        if rng.random() < 0.5 and scene.objects:
            pair = rng.choice(sorted(present))
            return Question("presence", presence_question(*pair), YES)
        return Question("presence", presence_question(*self._absent_pair(scene, present, rng)), NO)

    def how_many(self, scene: Scene, present: Counter, rng: random.Random) -> Question | None:
        counts = sorted({0, *present.values()})
        count = rng.choice(counts)
        if count == 0:
            pair = self._absent_pair(scene, present, rng)
        else:
            pair = rng.choice(sorted(pair for pair, n in present.items() if n == count))
        return Question("how_many", how_many_question(*pair), COUNT_WORDS[count])

    def exact_count(self, scene: Scene, present: Counter, rng: random.Random) -> Question | None:
        if not scene.objects:
            return None
        pair = rng.choice(sorted(present))
        have = present[pair]
        if rng.random() < 0.5:
            return Question("exact_count", exact_count_question(*pair, have), YES)
        if rng.random() < 0.5:  # the wrong count of a present pair
            wrong = rng.choice([n for n in (have - 1, have + 1) if n >= 1])
            return Question("exact_count", exact_count_question(*pair, wrong), NO)
        return Question("exact_count", exact_count_question(*self._absent_pair(scene, present, rng), have), NO)

    def total(self, scene: Scene, present: Counter, rng: random.Random) -> Question | None:
        have = len(scene.objects)
        if have == 0:
            return None
        if rng.random() < 0.5:
            return Question("total", total_question(have), YES)
        return Question("total", total_question(rng.choice([n for n in (have - 1, have + 1) if n >= 1])), NO)

    def relation(self, scene: Scene, present: Counter, rng: random.Random) -> Question | None:
        if len(present) < 2:
            return None
        first, second = rng.sample(sorted(present), 2)
        want = rng.random() < 0.5
        matching = [r for r in RELATIONS if relation_in_scene(scene, first, r, second) == want]
        if not matching:
            return None
        return Question("relation", relation_question(first, rng.choice(matching), second), YES if want else NO)

    def region(self, scene: Scene, present: Counter, rng: random.Random) -> Question | None:
        if not scene.objects:
            return None
        obj = rng.choice(scene.objects)
        if rng.random() < 0.5:
            pair = (obj.colour, obj.shape)
            return Question("region", region_question(self.box_text(obj), *pair), YES)
        return Question("region", region_question(self.box_text(obj), *rng.choice(_one_word_away(obj))), NO)

