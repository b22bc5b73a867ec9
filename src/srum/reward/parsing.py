"""Reading scores out of the model's answers.

The parsers never raise and only ever return finite scores in [-1, 1]; everything else about an answer is a
status, so a failure is never mistaken for a score. Differences from the official parsers, each a defect they
had: a missing score is ``None`` with status ``missing`` (not 0.0, which a genuine neutral answer also gives);
scores are clamped and the clamp is flagged; numbers may be written ``+0.5``, ``.5`` or with a unicode minus;
region answers are split on their ``Region ID`` headers rather than on blank lines, so an answer laid out like
the instruction's example (no blank lines, ``---`` separators) keeps every region; a region without an
``Identified Object`` line keeps its score with an empty label.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

# Digits only: no exponents, no nan/inf words. U+2212 is the typographic minus models sometimes emit.
_NUMBER = r"[+\-\u2212]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_NUMBER_RE = re.compile(_NUMBER)
# `Score: 0.7`, `score = 0.7`, `Score: [0.7]`, `*Score:* 0.7`, `Final score: 0.7`; the number is group 1.
_SCORE_RE = re.compile(rf"\bscore\b[\s*_`]*[:=][\s*_`\[(]*({_NUMBER})", re.IGNORECASE)
_REASON_RE = re.compile(r"\breason\b[\s*_`]*:", re.IGNORECASE)
# A region header opens a line: `Region ID: 3`, `Region 2:`, `### Region 2`, `- Region #4`, `1. Region ID: [5]`.
_HEADER_RE = re.compile(
    r"^[ \t>#*+\-]*(?:[0-9]+[.)][ \t]+)?region[ \t]*(?:id[ \t]*)?(?:[:#][ \t]*)?(?:[\[(][ \t]*)?([0-9]{1,9})(?![0-9])",
    re.IGNORECASE | re.MULTILINE,
)
_OBJECT_RE = re.compile(r"\bidentified[ \t]+object\b[ \t*_`]*[:=]([^\n]*)", re.IGNORECASE)
# Where a `Score:` written on the object's own line begins (the label stops there).
_INLINE_SCORE_RE = re.compile(r"\bscore\b[ \t]*[:=]", re.IGNORECASE)
_THINK_END_RE = re.compile(r"</think\s*>", re.IGNORECASE)
_FENCE_LINE_RE = re.compile(r"^[ \t]*```[\w+-]*[ \t]*$\n?", re.MULTILINE)

Status = Literal["ok", "clamped", "missing"]
RegionsStatus = Literal["ok", "partial", "missing"]


def parse_number(text: str) -> float | None:
    """The first decimal number in ``text`` (``0.85``, ``-1``, ``1.``, ``+0.5``, ``.5``, ``−0.4``), or None when
    there is none or it overflows to infinity."""
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    value = float(match.group().replace("\u2212", "-"))
    return value if math.isfinite(value) else None


def answer_text(raw: str) -> str:
    """The answer proper: the text after the last ``</think>`` (all of it without one), with code fences and
    bold markers removed, stripped."""
    text = _THINK_END_RE.split(raw)[-1].replace("\r\n", "\n").replace("\r", "\n")
    text = _FENCE_LINE_RE.sub("", text).replace("```", "").replace("**", "")
    return text.strip()


def _clamp(value: float) -> tuple[float, bool]:
    clamped = min(1.0, max(-1.0, value))
    return clamped + 0.0, clamped != value  # + 0.0 turns -0.0 into 0.0


def _first_score(text: str) -> tuple[float, re.Match[str]] | None:
    for match in _SCORE_RE.finditer(text):
        value = parse_number(match.group(1))
        if value is not None:
            return value, match
    return None


@dataclass(frozen=True)
class ParsedScore:
    score: float | None
    """In [-1, 1]; None when the answer held no readable score."""
    reason: str
    status: Status
    """``ok``; ``clamped`` when the written number lay outside [-1, 1]; ``missing`` when there was none."""


def parse_score_answer(raw: str) -> ParsedScore:
    """A ``Score: <number>`` / ``Reason: ...`` answer (global, sample, single region). The reason is the text
    after ``Reason:`` if present, else the text after the number."""
    text = answer_text(raw)
    found = _first_score(text)
    if found is None:
        reason = _REASON_RE.search(text)
        return ParsedScore(None, text[reason.end():].strip() if reason else text, "missing")
    value, match = found
    if reason := _REASON_RE.search(text, match.end()):
        explanation = text[reason.end():]
    elif reason := _REASON_RE.search(text, 0, match.start()):
        explanation = text[reason.end():match.start()]
    else:
        explanation = text[match.end():].lstrip(" \t*_`])},;:")
    score, clamped = _clamp(value)
    return ParsedScore(score, explanation.strip(), "clamped" if clamped else "ok")


@dataclass(frozen=True)
class RegionScore:
    region_id: int
    object: str
    """The ``Identified Object`` text; empty when the block had none."""
    score: float
    """In [-1, 1]."""
    clamped: bool
    """The written number lay outside [-1, 1]."""


@dataclass(frozen=True)
class ParsedRegions:
    regions: tuple[RegionScore, ...]
    """Scored proposed regions, sorted by id; a later block for the same id replaces an earlier one."""
    status: RegionsStatus
    """``ok``: every proposed id scored; ``partial``: some; ``missing``: none."""
    unknown_ids: tuple[int, ...]
    """Ids that headed a block but were never proposed (sorted); their blocks are ignored."""


def parse_region_answer(raw: str, proposed_ids: Iterable[int]) -> ParsedRegions:
    """One block per ``Region ID`` header, up to the next header; in each, the first ``Identified Object:`` line
    and the first ``Score:`` number. Blocks without a score are skipped."""
    proposed = frozenset(proposed_ids)
    text = answer_text(raw)
    headers = list(_HEADER_RE.finditer(text))
    scored: dict[int, RegionScore] = {}
    unknown: set[int] = set()
    for index, header in enumerate(headers):
        region_id = int(header.group(1))
        if region_id not in proposed:
            unknown.add(region_id)
            continue
        block = text[header.end():headers[index + 1].start() if index + 1 < len(headers) else len(text)]
        found = _first_score(block)
        if found is None:
            continue
        label = _OBJECT_RE.search(block)
        name = _INLINE_SCORE_RE.split(label.group(1), maxsplit=1)[0].strip(" \t,;|") if label else ""
        score, clamped = _clamp(found[0])
        scored[region_id] = RegionScore(region_id, name, score, clamped)
    if len(scored) == len(proposed):
        status: RegionsStatus = "ok"
    else:
        status = "partial" if scored else "missing"
    return ParsedRegions(tuple(scored[i] for i in sorted(scored)), status, tuple(sorted(unknown)))
