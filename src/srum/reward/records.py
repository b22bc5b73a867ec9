"""Reward records: the official SRUM training JSONL and srum's richer format, read, validated and written.

Official line: ``{bad_image_file, good_image_file, prompt, vlm_rewards}``, where ``vlm_rewards[0]`` is the global
entry (``object: "global_layout_reward"``, ``bbox: [0, 0, W, H]``, ``score``) and the rest are regions
(``object``, pixel ``bbox [x1, y1, x2, y2]``, ``score``).

srum line (``format: "srum-reward/1"``): the image size, boxes normalised to [0, 1] (so they are right in any
frame), both score kinds (parsed from free text, probability-weighted) with parse status, the raw answers and
the scorer's settings. Either format loads into ``RewardRecord``.

Validation: a line that is not a valid record is reported by file and line (``RecordError``, or collected with
``strict=False``); a region entry that cannot be used (inverted or non-numeric box, missing or non-finite score)
is dropped with its reason in ``RewardRecord.dropped``; scores outside [-1, 1] are clamped and counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from srum.io.jsonl import append_jsonl, read_jsonl_lines
from srum.reward.maps import ScoredRegions

SRUM_FORMAT = "srum-reward/1"
GLOBAL_OBJECT = "global_layout_reward"
ScoreKind = Literal["text", "expected"]


class RecordError(ValueError):
    """A record that cannot be used; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class Scores:
    """One judgement read two ways: parsed from the free-text answer, and the expectation under the model's
    distribution over score strings. Either may be missing (None)."""

    text: float | None = None
    expected: float | None = None

    def get(self, kind: ScoreKind) -> float | None:
        return self.text if kind == "text" else self.expected


@dataclass(frozen=True)
class RegionEntry:
    box: tuple[float, float, float, float]
    """``[x1, y1, x2, y2]`` normalised by the image width and height (x right, y down, x2/y2 exclusive)."""
    object: str
    scores: Scores


@dataclass(frozen=True)
class RewardRecord:
    image_file: str
    """The scored image (the official ``bad_image_file``): noised and weighted in training."""
    good_image_file: str
    """The constraint target (equal to ``image_file`` in all official data)."""
    prompt: str
    width: int
    height: int
    global_scores: Scores
    regions: tuple[RegionEntry, ...] = ()
    prompt_id: str | None = None
    scorer: dict[str, Any] = field(default_factory=dict)
    """Scorer settings: instruction version, proposer, decoding."""
    answers: dict[str, Any] = field(default_factory=dict)
    """Raw answers of the scorer, by instruction."""
    dropped: tuple[str, ...] = ()
    """Why region entries were left out when the record was read."""
    clamped: int = 0
    """Scores that were outside [-1, 1] when read."""

    def pixel_boxes(self) -> list[list[float]]:
        return [[b[0] * self.width, b[1] * self.height, b[2] * self.width, b[3] * self.height]
                for b in (region.box for region in self.regions)]

    def to_srum(self) -> dict[str, Any]:
        def scores(s: Scores) -> dict[str, float | None]:
            return {"text": s.text, "expected": s.expected}

        return {"format": SRUM_FORMAT, "image_file": self.image_file, "good_image_file": self.good_image_file,
                "prompt": self.prompt, "prompt_id": self.prompt_id, "width": self.width, "height": self.height,
                "global": scores(self.global_scores),
                "regions": [{"box": list(r.box), "object": r.object, "scores": scores(r.scores)}
                            for r in self.regions],
                "scorer": self.scorer, "answers": self.answers}

    def to_official(self, kind: ScoreKind = "text") -> dict[str, Any]:
        """The official training line (pixel boxes, one score kind). Regions without that score are left out;
        a missing global score is written as 0.0, the only value the official format has for it."""
        g = self.global_scores.get(kind)
        rewards = [{"object": GLOBAL_OBJECT, "bbox": [0, 0, self.width, self.height], "score": 0.0 if g is None else g,
                    "reason": ""}]
        for region, box in zip(self.regions, self.pixel_boxes(), strict=True):
            if region.scores.get(kind) is not None:
                rewards.append({"object": region.object, "bbox": [round(c) for c in box],
                                "score": region.scores.get(kind)})
        return {"bad_image_file": self.image_file, "good_image_file": self.good_image_file, "prompt": self.prompt,
                "vlm_rewards": rewards}


def scored_regions(records: list[RewardRecord], kind: ScoreKind = "text") -> ScoredRegions:
    """The records' scores as a batch for ``srum.reward.maps`` (a missing global score counts as 0, as
    officially; regions without a score of that kind are left out)."""
    boxes, scores = [], []
    for record in records:
        kept = [(box, r.scores.get(kind)) for box, r in zip(record.pixel_boxes(), record.regions, strict=True)
                if r.scores.get(kind) is not None]
        boxes.append([box for box, _ in kept])
        scores.append([score for _, score in kept])
    globals_ = [record.global_scores.get(kind) or 0.0 for record in records]
    return ScoredRegions.from_lists(globals_, boxes, scores, [(r.width, r.height) for r in records])


# ------------------------------------------------------------------------------------------------- validation


class _Reader:
    """Checks one line's fields, raising ``RecordError`` with the location, or noting dropped entries."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.dropped: list[str] = []
        self.clamped = 0

    def fail(self, message: str) -> RecordError:
        return RecordError(f"{self.where}: {message}")

    def string(self, data: dict, name: str) -> str:
        value = data.get(name)
        if not isinstance(value, str) or not value:
            raise self.fail(f"{name}: expected a non-empty string, got {value!r}")
        return value

    def size(self, data: dict, name: str) -> int:
        value = data.get(name)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value) or value < 1):
            raise self.fail(f"{name}: expected a positive integer, got {value!r}")
        return int(value)

    def score(self, value: Any, name: str, required: bool) -> float | None:
        """A score in [-1, 1], clamped; None when absent (allowed only if not ``required``)."""
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"{name}: expected a finite number in [-1, 1], got {value!r}")
        if not -1.0 <= value <= 1.0:
            self.clamped += 1
            return min(max(float(value), -1.0), 1.0)
        return float(value)

    def box(self, value: Any, name: str) -> list[float]:
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            raise self.fail(f"{name}: expected [x1, y1, x2, y2], got {value!r}")
        if any(isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) for c in value):
            raise self.fail(f"{name}: expected four finite numbers, got {value!r}")
        if value[0] >= value[2] or value[1] >= value[3]:
            raise self.fail(f"{name}: expected x1 < x2 and y1 < y2, got {value!r}")
        return [float(c) for c in value]

    def region(self, build: Any, index: int) -> RegionEntry | None:
        """Run ``build`` for one region entry; an unusable entry is dropped with its reason, not fatal."""
        try:
            return build()
        except RecordError as error:
            self.dropped.append(f"region {index}: {str(error).removeprefix(self.where + ': ')}")
            return None


def _official(data: dict, reader: _Reader) -> RewardRecord:
    rewards = data.get("vlm_rewards")
    if not isinstance(rewards, list):
        raise reader.fail(f"vlm_rewards: expected a list, got {type(rewards).__name__}")
    entries = [entry for entry in rewards if isinstance(entry, dict)]
    if len(entries) != len(rewards):
        raise reader.fail("vlm_rewards: expected a list of objects")
    global_entries = [entry for entry in entries if entry.get("object") == GLOBAL_OBJECT]
    if not global_entries:
        raise reader.fail(f"vlm_rewards: expected a global entry (object {GLOBAL_OBJECT!r}) giving the image size")
    first = global_entries[0]
    frame = reader.box(first.get("bbox"), "vlm_rewards[0].bbox")
    if frame[0] != 0 or frame[1] != 0 or frame[2] != int(frame[2]) or frame[3] != int(frame[3]):
        raise reader.fail(f"vlm_rewards[0].bbox: expected [0, 0, W, H] with whole pixel sizes, got "
                          f"{first.get('bbox')!r}")
    width, height = int(frame[2]), int(frame[3])
    g = reader.score(first.get("score"), "vlm_rewards[0].score", required=True)
    regions = []
    for index, entry in enumerate(entries):
        if entry.get("object") == GLOBAL_OBJECT:
            continue

        def build(entry: dict = entry, index: int = index) -> RegionEntry:
            x1, y1, x2, y2 = reader.box(entry.get("bbox"), f"vlm_rewards[{index}].bbox")
            score = reader.score(entry.get("score"), f"vlm_rewards[{index}].score", required=True)
            label = entry.get("object")
            return RegionEntry((x1 / width, y1 / height, x2 / width, y2 / height),
                               label if isinstance(label, str) else "", Scores(text=score))

        region = reader.region(build, index)
        if region is not None:
            regions.append(region)
    image = reader.string(data, "bad_image_file")
    good = data.get("good_image_file", image)
    if not isinstance(good, str) or not good:
        raise reader.fail(f"good_image_file: expected a non-empty string, got {good!r}")
    return RewardRecord(image, good, reader.string(data, "prompt"), width, height, Scores(text=g), tuple(regions),
                        dropped=tuple(reader.dropped), clamped=reader.clamped)


def _srum(data: dict, reader: _Reader) -> RewardRecord:
    def scores(value: Any, name: str) -> Scores:
        if not isinstance(value, dict):
            raise reader.fail(f"{name}: expected an object with text and expected scores, got {value!r}")
        return Scores(reader.score(value.get("text"), f"{name}.text", required=False),
                      reader.score(value.get("expected"), f"{name}.expected", required=False))

    regions_data = data.get("regions", [])
    if not isinstance(regions_data, list):
        raise reader.fail(f"regions: expected a list, got {type(regions_data).__name__}")
    regions = []
    for index, entry in enumerate(regions_data):

        def build(entry: Any = entry, index: int = index) -> RegionEntry:
            if not isinstance(entry, dict):
                raise reader.fail(f"regions[{index}]: expected an object")
            box = reader.box(entry.get("box"), f"regions[{index}].box")
            label = entry.get("object", "")
            return RegionEntry(tuple(box), label if isinstance(label, str) else "",
                               scores(entry.get("scores"), f"regions[{index}].scores"))

        region = reader.region(build, index)
        if region is not None:
            regions.append(region)
    image = reader.string(data, "image_file")
    prompt_id = data.get("prompt_id")
    return RewardRecord(
        image, data.get("good_image_file") or image, reader.string(data, "prompt"), reader.size(data, "width"),
        reader.size(data, "height"), scores(data.get("global"), "global"), tuple(regions),
        prompt_id=None if prompt_id is None else str(prompt_id),
        scorer=data.get("scorer") if isinstance(data.get("scorer"), dict) else {},
        answers=data.get("answers") if isinstance(data.get("answers"), dict) else {},
        dropped=tuple(reader.dropped), clamped=reader.clamped)


def parse_record(data: Any, where: str) -> RewardRecord:
    """One record of either format; ``where`` (``file:line``) prefixes every error."""
    reader = _Reader(where)
    if not isinstance(data, dict):
        raise reader.fail(f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") == SRUM_FORMAT:
        return _srum(data, reader)
    if "format" in data:
        raise reader.fail(f"format: expected {SRUM_FORMAT!r} or none (official), got {data['format']!r}")
    return _official(data, reader)


@dataclass
class LoadedRecords:
    records: list[RewardRecord]
    problems: list[str]
    """``file:line: reason`` of every line that was left out (``strict=False``)."""


def load_records(path: str | Path, image_dir: str | Path | None = None, strict: bool = True) -> LoadedRecords:
    """Every record of a JSONL file, validated; with ``image_dir``, the image files must exist there.

    ``strict``: the first bad line raises ``RecordError``; otherwise bad lines are left out and reported.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such record file")
    records, problems = [], []
    for number, line in read_jsonl_lines(path):
        where = f"{path}:{number}"
        try:
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordError(f"{where}: not valid JSON ({error.msg})") from None
            record = parse_record(data, where)
            if image_dir is not None:
                for name in {record.image_file, record.good_image_file}:
                    if not (Path(image_dir) / name).is_file():
                        raise RecordError(f"{where}: image file {name!r} not found in {image_dir}")
            records.append(record)
        except RecordError as error:
            if strict:
                raise
            problems.append(str(error))
    return LoadedRecords(records, problems)


def append_record(path: str | Path, record: RewardRecord) -> None:
    """Append one srum-format line (one synced write: a killed run never leaves half a record)."""
    append_jsonl(Path(path), record.to_srum())
