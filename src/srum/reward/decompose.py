"""Atomic questions for decomposed self-scoring: a prompt split into yes/no questions, each about one object,
attribute, count or relation, that a matching picture answers with yes (the TIFA / DSG / VQAScore line of
evaluation, used here as the self-reward).

``ModelDecomposer`` lets the model itself write the questions in text, once per prompt; ShapeWorld prompts are
split by their parser instead (``srum.shapeworld.questions.ShapeWorldDecomposer``). Either way scoring never fails
to parse: a written list without a single question falls back to one whole-prompt question.
"""

from __future__ import annotations

import re
from typing import Protocol

from srum.generation.text import DecodingConfig
from srum.reward.instructions import ScoringInstructions

_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\(?\d+[.):])\s*")


class Decomposer(Protocol):
    def questions(self, prompts: list[str]) -> list[list[str]]:
        """The atomic questions of each prompt (at least one each)."""
        ...

    def region_questions(self, prompt: str, box: list[int], width: int, height: int) -> list[str]:
        """Questions about the object in one box (pixels of the ``width`` x ``height`` frame the reader sees);
        the region's score is its best answer."""
        ...


def whole_prompt_question(prompt: str) -> str:
    return f'Does the picture show "{prompt}"?'


def parse_questions(text: str, prompt: str) -> list[str]:
    """The questions of a written list (one per line, list markers dropped, duplicates once); the whole-prompt
    question when the text holds none."""
    found = []
    for line in text.splitlines():
        line = _LIST_MARKER.sub("", line).strip()
        if line.endswith("?") and line not in found:
            found.append(line)
    return found or [whole_prompt_question(prompt)]


class ModelDecomposer:
    """The reader writes each prompt's questions itself (greedy, text only), cached per prompt: online training
    asks about the same prompts again and again."""

    def __init__(self, reader, instructions: ScoringInstructions, max_new_tokens: int = 256) -> None:
        if not hasattr(reader, "complete"):
            raise ValueError(f"scoring.questions model: {type(reader).__name__} cannot write text without an image; "
                             f"use the self judge or questions from a parser")
        self.reader, self.instructions = reader, instructions
        self.decoding = DecodingConfig(max_new_tokens=max_new_tokens)
        self.cache: dict[str, list[str]] = {}

    def questions(self, prompts: list[str]) -> list[list[str]]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if missing:
            written = self.reader.complete([self.instructions.decompose_instruction(p) for p in missing],
                                           self.decoding)
            for prompt, text in zip(missing, written, strict=True):
                self.cache[prompt] = parse_questions(text, prompt)
        return [self.cache[p] for p in prompts]

    def region_questions(self, prompt: str, box: list[int], width: int, height: int) -> list[str]:
        return [self.instructions.region_question(prompt, box, width, height)]
