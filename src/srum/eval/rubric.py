"""The judge's instruction for T2I-CompBench images and the two ways of reading its answer.

The instruction follows the structure of the official SRUM judge (srum-method.md §9.3): a 0-100 score in five
bands and a JSON answer with ``score`` and a short ``explanation``; the wording is srum's own, and 0 belongs to the
lowest band. Two readings of every answer are kept side by side:

- :func:`official_score` reads it as the official script does (§9.4): a failure is -1, a fraction is truncated,
  nothing is clamped. Its means are the numbers comparable with published tables.
- :func:`parse_verdict` is srum's reading: a failure is no score at all (counted, never averaged, §11 item 26),
  fractions are kept and a score outside 0-100 is a failure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from srum.reward.parsing import answer_text, parse_number

RUBRIC_VERSION = "srum-compbench-judge-1"
"""Recorded with every judgement: answers to another wording are not mixed into the same file."""

JUDGE_INSTRUCTION = (
    'You are grading a generated picture against the text it was drawn from: "{prompt}"\n'
    "Check every object the text names, its attributes (colour, shape, material or texture), how many of each "
    "there are, where they are relative to each other, and any action or interaction the text describes.\n"
    "Give one whole number from 0 to 100:\n"
    "81-100: the picture matches the text in every respect.\n"
    "61-80: most objects, attributes and relations are right; a few small details are off.\n"
    "41-60: part of the content is there, but important objects or details are missing or wrong.\n"
    "21-40: objects may be present, but none of the described relations, actions or events are.\n"
    "0-20: the picture has essentially nothing to do with the text.\n"
    'Reply with JSON only, in this form: {{"score": <whole number>, "explanation": "<at most 20 words>"}}'
)
"""Format with ``prompt=``."""

FAILED = -1
"""The official score of an answer it cannot read."""

# The official reading (§9.4): a braced object holding `"score": <digits>`, else the digits after `"score":`.
_OFFICIAL_OBJECT_RE = re.compile(r'\{[^{}]*"score"\s*:\s*\d+[^{}]*\}')
_OFFICIAL_DIGITS_RE = re.compile(r'"score"\s*:\s*"?(\d+)')
_FENCE_RE = re.compile(r"```[\w+-]*")
# srum's lenient fallback when no JSON object decodes: `score: 85`, `'score' = 85`, `{score: "85.5"}`.
_LENIENT_SCORE_RE = re.compile(r"""\bscore\b["'\s*_`]*[:=]\s*["']?([+\-\u2212]?[0-9.]+)""", re.IGNORECASE)

Status = Literal["ok", "lenient", "missing", "out_of_range"]


def official_score(raw: str) -> int:
    """The answer's score as the official script reads it: an integer, :data:`FAILED` when it finds none."""
    text = _FENCE_RE.sub("", raw)
    found = _OFFICIAL_OBJECT_RE.search(text)
    if found:
        try:
            value = json.loads(found.group()).get("score")
        except json.JSONDecodeError:
            value = None
        if type(value) is int:
            return value
    digits = _OFFICIAL_DIGITS_RE.search(text)
    return int(digits.group(1)) if digits else FAILED


@dataclass(frozen=True)
class Verdict:
    score: float | None
    """In [0, 100]; None when the answer gave no usable score."""
    status: Status
    """``ok`` (a JSON object with a numeric score), ``lenient`` (a score found outside valid JSON), ``missing``
    (no score) or ``out_of_range`` (a number outside 0-100)."""
    explanation: str

    @property
    def failed(self) -> bool:
        return self.score is None


def _json_objects(text: str):
    """Every JSON object that decodes, starting at each ``{`` in turn."""
    decoder = json.JSONDecoder()
    for start in (index for index, char in enumerate(text) if char == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            yield value


def _number(value: object) -> tuple[float | None, Status]:
    """A JSON value as a score: numbers are ``ok``, numbers written as strings ``lenient``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), "ok"
    return (parse_number(value) if isinstance(value, str) else None), "lenient"


def parse_verdict(raw: str) -> Verdict:
    """srum's reading of a judge answer (after any ``</think>``, without code fences)."""
    text = answer_text(raw)
    for candidate in _json_objects(text):
        if "score" in candidate:
            (score, status), explanation = _number(candidate["score"]), str(candidate.get("explanation", ""))
            break
    else:
        found = _LENIENT_SCORE_RE.search(text)
        score, status, explanation = parse_number(found.group(1)) if found else None, "lenient", text
    if score is None:
        return Verdict(None, "missing", explanation)
    if not 0 <= score <= 100:
        return Verdict(None, "out_of_range", explanation)
    return Verdict(score, status, explanation)
