"""Multiple-choice visual questions answered by the unified model: the MMVP-style check that post-training for
generation did not cost understanding. Run it on the model before and after; the reports compare.

A question file is JSONL, one object a line: ``image`` (a path; relative paths start at the file's folder),
``question``, ``options`` (two to 26 strings) and ``answer`` (the right option's letter, ``b`` or ``(b)``, or its
exact text); optionally ``id`` (default: the line number), ``category`` and ``pair``: questions sharing a pair
count as right only when all of them are (MMVP's pair accuracy).

Two ways to choose: ``logprob`` takes the option letter the model gives the highest log-probability to (one
teacher-forced pass, never unreadable); ``decode`` lets the model answer greedily and reads a letter or an
option's text out of the answer (an unreadable answer is wrong and counted).
"""

from __future__ import annotations

import json
import logging
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from srum.eval.metrics import GroupedMean
from srum.generation.pipeline import Pipeline
from srum.generation.text import DecodingConfig
from srum.io.jsonl import append_jsonl, check_settings, read_jsonl, read_jsonl_lines, repair_torn_tail
from srum.io.lock import exclusive
from srum.model.autoencoder import from_uint8_image
from srum.reward.rollouts import read_image

log = logging.getLogger(__name__)
Method = Literal["logprob", "decode"]
LETTERS = string.ascii_lowercase
UNCATEGORISED = "uncategorised"
_LETTER_RE = re.compile(r"^\(?([a-z])\)?$", re.IGNORECASE)
_PARENTHESISED_RE = re.compile(r"\(([a-z])\)", re.IGNORECASE)
_BARE_LETTER_RE = re.compile(r"^\(?([a-z])[).:]?$", re.IGNORECASE)


@dataclass(frozen=True)
class Question:
    question_id: str
    image: Path
    question: str
    options: tuple[str, ...]
    answer: int
    """Index of the right option."""
    category: str = UNCATEGORISED
    pair: str | None = None

    def prompt(self) -> str:
        """The question with its lettered options, as the model reads it."""
        listed = "\n".join(f"({LETTERS[i]}) {option}" for i, option in enumerate(self.options))
        return f"{self.question}\n{listed}\nAnswer with the letter of the right option."


def _answer_index(value: object, options: list[str]) -> int | None:
    if not isinstance(value, str):
        return None
    letter = _LETTER_RE.match(value.strip())
    if letter and LETTERS.index(letter.group(1).lower()) < len(options):
        return LETTERS.index(letter.group(1).lower())
    return options.index(value) if value in options else None


def _question(path: Path, number: int, entry: object) -> Question:
    where = f"{path}:{number}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with image, question, options and answer, got {entry!r}")
    for field in ("image", "question"):
        if not isinstance(entry.get(field), str) or not entry[field].strip():
            raise ValueError(f"{where}: {field}: expected a non-empty string, got {entry.get(field)!r}")
    options = entry.get("options")
    if (not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS)
            or not all(isinstance(option, str) and option.strip() for option in options)):
        raise ValueError(f"{where}: options: expected a list of 2 to {len(LETTERS)} non-empty strings, "
                         f"got {options!r}")
    answer = _answer_index(entry.get("answer"), options)
    if answer is None:
        raise ValueError(f"{where}: answer: expected an option letter (a to {LETTERS[len(options) - 1]}) or the "
                         f"text of an option, got {entry.get('answer')!r}")
    image = path.parent / entry["image"]
    if not image.is_file():
        raise ValueError(f"{where}: image: expected an image file, {image} does not exist")
    pair = entry.get("pair")
    return Question(str(entry.get("id", number)), image, entry["question"], tuple(options), answer,
                    str(entry.get("category") or UNCATEGORISED), None if pair is None else str(pair))


def read_questions(path: Path) -> list[Question]:
    """The questions of a JSONL file; ids must be unique."""
    questions, seen = [], set()
    for number, line in read_jsonl_lines(Path(path)):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        question = _question(Path(path), number, entry)
        if question.question_id in seen:
            raise ValueError(f"{path}:{number}: id: expected a unique id, {question.question_id!r} repeats")
        seen.add(question.question_id)
        questions.append(question)
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def read_choice(answer: str, options: tuple[str, ...]) -> int | None:
    """The option an answer names: one letter in parentheses (``the answer is (b)``), an answer that is a letter
    (``b``, ``B.``), else an option's exact text. A bare letter inside a sentence is not read: it may be the
    article "a"."""
    text = answer.strip()
    letters = {match.group(1).lower() for match in _PARENTHESISED_RE.finditer(text)}
    if not letters and (bare := _BARE_LETTER_RE.match(text)):
        letters = {bare.group(1).lower()}
    letters = {letter for letter in letters if LETTERS.index(letter) < len(options)}
    if len(letters) == 1:
        return LETTERS.index(letters.pop())
    named = [i for i, option in enumerate(options) if option.strip().lower() == text.rstrip(".").lower()]
    return named[0] if len(named) == 1 else None


def _choose(pipeline: Pipeline, questions: list[Question], method: Method, max_new_tokens: int) -> list[dict]:
    images = [from_uint8_image(read_image(question.image)) for question in questions]
    prompts = [question.prompt() for question in questions]
    if method == "logprob":
        candidates = [[f"({LETTERS[i]})" for i in range(len(q.options))] for q in questions]
        scores = pipeline.score(images, prompts, candidates)
        return [{"choice": int(row.argmax()), "logprobs": row.tolist()} for row in scores]
    answers = pipeline.answer(images, prompts, DecodingConfig(max_new_tokens=max_new_tokens))
    return [{"choice": read_choice(answer, q.options), "raw": answer} for answer, q in zip(answers, questions,
                                                                                              strict=True)]


def answer_questions(pipeline: Pipeline, questions: list[Question], out: Path, method: Method = "logprob",
                     batch_size: int = 8, max_new_tokens: int = 16, settings: dict | None = None) -> list[dict]:
    """Answer the questions ``out`` lacks, appending one prediction each; returns every prediction in ``out``.
    ``settings`` (what decides the answers besides the method) are locked into the file."""
    decoding = {"max_new_tokens": max_new_tokens} if method == "decode" else {}
    settings = json.loads(json.dumps({**(settings or {}), "method": method, **decoding}))
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        return _answer_missing(pipeline, questions, out, method, batch_size, max_new_tokens, settings)


def _answer_missing(pipeline: Pipeline, questions: list[Question], out: Path, method: Method, batch_size: int,
                    max_new_tokens: int, settings: dict) -> list[dict]:
    repair_torn_tail(out)
    predictions = read_jsonl(out)
    for number, prediction in enumerate(predictions, start=1):
        if not isinstance(prediction, dict) or "id" not in prediction:
            raise ValueError(f"{out}:{number}: expected a prediction record with an id")
    check_settings(out, predictions, settings, "answers")
    done = {prediction.get("id") for prediction in predictions}
    todo = [question for question in questions if question.question_id not in done]
    log.info("%d questions to answer (%d already in %s)", len(todo), len(done), out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        for question, chosen in zip(batch, _choose(pipeline, batch, method, max_new_tokens), strict=True):
            prediction = {"id": question.question_id, "category": question.category, "pair": question.pair,
                          "answer": question.answer, **chosen, "correct": chosen["choice"] == question.answer,
                          "settings": settings}
            append_jsonl(out, prediction)
            predictions.append(prediction)
    return predictions


def summarise(predictions: list[dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(overall accuracy, and pair accuracy when questions come in pairs; accuracy per category), in percent, with
    the counts of questions and of unreadable answers."""
    overall, per_category = GroupedMean(), GroupedMean()
    unreadable: dict[str, int] = {}
    pairs: dict[str, bool] = {}
    for prediction in predictions:
        category = prediction["category"]
        overall.update("all", 100.0 * prediction["correct"])
        per_category.update(category, 100.0 * prediction["correct"])
        unreadable[category] = unreadable.get(category, 0) + (prediction["choice"] is None)
        if prediction.get("pair") is not None:
            pairs[prediction["pair"]] = pairs.get(prediction["pair"], True) and prediction["correct"]
    metrics = {"Accuracy": {"accuracy": overall.compute().get("all"), "questions": len(predictions),
                            "unreadable": sum(unreadable.values())}}
    if pairs:
        metrics["Pair accuracy"] = {"accuracy": 100.0 * sum(pairs.values()) / len(pairs), "pairs": len(pairs)}
    means = per_category.compute()
    details = {category: {"accuracy": means[category], "questions": per_category.counts[category],
                          "unreadable": unreadable[category]} for category in means}
    return metrics, details
