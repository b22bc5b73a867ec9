"""The SRUM CompBench judge protocol without models: both readings of canned judge answers, the official
aggregation (checked against the published table), reports and their comparison, and the benchmark files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from srum.eval.compbench import category_key, columns, summarise
from srum.eval.geneval import read_geneval
from srum.eval.metrics import GroupedMean
from srum.eval.report import comparison_table, make_report, read_report, report_tables, save_report
from srum.eval.rubric import FAILED, JUDGE_INSTRUCTION, official_score, parse_verdict
from srum.eval.understanding import read_choice, read_questions
from srum.eval.understanding import summarise as understanding_summary

# ------------------------------------------------------------------------------------------------ judge answers

# (raw answer, srum's score, srum's status, the official script's score)
CANNED = [
    ('{"score": 85, "explanation": "the cube is red but too small"}', 85.0, "ok", 85),
    ('```json\n{"score": 72, "explanation": "one cat missing"}\n```', 72.0, "ok", 72),
    ('{"score": 85.5, "explanation": "fine"}', 85.5, "ok", 85),  # official truncates fractions
    ('{"score": 0, "explanation": "unrelated"}', 0.0, "ok", 0),  # a genuine zero is a score, not a failure
    ('{"score": "90", "explanation": "quoted"}', 90.0, "lenient", 90),
    # malformed: truncated JSON, unquoted key, prose
    ('{"score": 64, "explanation": "the dog is', 64.0, "lenient", 64),
    ("{score: 70, explanation: missing quotes}", 70.0, "lenient", FAILED),
    ("Score: 55. The colours are right.", 55.0, "lenient", FAILED),
    # missing score
    ('{"explanation": "nice picture"}', None, "missing", FAILED),
    ("I cannot judge this image.", None, "missing", FAILED),
    ('{"score": null}', None, "missing", FAILED),
    ("", None, "missing", FAILED),
    # out of range: never averaged by srum; the official script keeps what it reads (no clamping)
    ('{"score": 150, "explanation": "excellent"}', None, "out_of_range", 150),
    ('{"score": -5, "explanation": "awful"}', None, "out_of_range", FAILED),
]


@pytest.mark.parametrize("raw, score, status, official", CANNED)
def test_both_readings_of_canned_answers(raw, score, status, official):
    verdict = parse_verdict(raw)
    assert (verdict.score, verdict.status, verdict.failed) == (score, status, score is None)
    assert official_score(raw) == official


def test_explanation_and_think_are_read():
    verdict = parse_verdict('<think>the cube looks red {"score": 3}</think>\n{"score": 60, "explanation": "ok"}')
    assert (verdict.score, verdict.explanation) == (60.0, "ok")


def test_instruction_quotes_the_prompt_and_asks_for_json():
    text = JUDGE_INSTRUCTION.format(prompt="a red cube left of a blue ball")
    assert '"a red cube left of a blue ball"' in text and '{"score":' in text and "0-20" in text


# ---------------------------------------------------------------------------------------------------- aggregation

# The official README's table (srum-method.md §9.1): 8 columns, then Overall.
OFFICIAL_TABLE = {
    "BAGEL": ([77.98, 89.30, 83.32, 85.03, 70.40, 81.94, 81.52, 87.93], 82.18),
    "BAGEL + SRUM": ([83.10, 92.90, 88.69, 88.47, 78.52, 84.23, 86.92, 89.57], 86.55),
    "BAGEL, think": ([84.66, 88.85, 86.10, 85.64, 75.36, 84.33, 82.71, 88.07], 84.46),
    "BAGEL + SRUM, think": ([88.60, 92.90, 91.31, 90.48, 80.12, 84.47, 89.93, 89.15], 88.37),
}
FILE_CATEGORIES = ["3d_spatial", "color", "complex", "non-spatial", "numeracy", "shape", "spatial", "texture"]


@pytest.mark.parametrize("row", OFFICIAL_TABLE)
def test_overall_equals_the_published_table(row):
    values, overall = OFFICIAL_TABLE[row]
    means = dict(zip(FILE_CATEGORIES, values, strict=True))
    means.update(complex_action=means["complex"], complex_spatial=means["complex"])  # the table gives Complex only
    table = columns(means)
    assert round(table["Overall"], 2) == overall
    assert [round(table[c], 2) for c in ("3D spatial", "Color", "Complex", "2D spatial")] == [
        values[0], values[1], values[2], values[6]]


def test_complex_is_the_unweighted_mean_of_its_three_parts():
    judgements = [{"category": category, "score": score, "official_score": score}
                  for category, score, count in (("complex", 80, 300), ("complex_action", 90, 212),
                                                 ("complex_spatial", 100, 58)) for _ in range(count)]
    metrics, details = summarise(judgements)
    assert metrics["Complex"] == {"score": 90.0, "official": 90.0}  # weighted by prompts it would be 86.3
    assert details["complex_action"]["images"] == 212
    assert metrics["Overall"]["score"] is None  # the base categories are missing


def test_failures_count_as_minus_one_officially_and_are_left_out_by_srum():
    judgements = [{"category": "color", "score": 90.0, "official_score": 90},
                  {"category": "color", "score": 70.0, "official_score": 70},
                  {"category": "color", "score": None, "official_score": FAILED},
                  {"category": "Color", "score": None, "official_score": 150}]
    metrics, details = summarise(judgements)
    assert details["color"] == {"images": 4, "failures": 2, "score": 80.0, "official": (90 + 70 - 1 + 150) / 4}
    assert metrics["Color"] == {"score": 80.0, "official": 77.25}


def test_category_spellings_and_float64_means():
    assert [category_key(c) for c in ("non-spatial", "3d spatial", "Complex_Action", None)] == [
        "non_spatial", "3d_spatial", "complex_action", "uncategorised"]
    means = GroupedMean()
    for value in (82.18, 82.19, 82.17):
        means.update("a", value)
    assert means.compute() == {"a": pytest.approx(82.18, abs=1e-12)} and means.counts == {"a": 3}


# --------------------------------------------------------------------------------------------------------- reports

def _report(score: float) -> dict:
    return make_report("t2i-compbench", {"checkpoint": "x"}, {"Overall": {"score": score, "official": score - 1}},
                       {"color": {"images": 3, "failures": 0, "score": score}}, ["note"])


def test_reports_round_trip_and_compare(tmp_path):
    save_report(tmp_path / "a.json", _report(80.0))
    save_report(tmp_path / "b.json", _report(83.5))
    before, after = read_report(tmp_path / "a.json"), read_report(tmp_path / "b.json")
    console = Console(width=200, record=True)
    for table in report_tables(after, "b"):
        console.print(table)
    console.print(comparison_table(before, after, "a.json", "b.json"))
    text = console.export_text()
    assert "83.50" in text and "+3.50" in text and "color" in text


@pytest.mark.parametrize("content, message", [
    ("{", r"bad.json:1: not valid JSON"),
    ('{"metrics": {}}', r"bad.json: benchmark: expected a report of srum validate"),
    ('{"benchmark": "x", "metrics": [], "details": {}}', r"bad.json: metrics: expected an object of rows"),
])
def test_bad_report_files_name_the_file_and_the_field(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_report(tmp_path / "bad.json")


def test_reports_of_different_benchmarks_do_not_compare():
    other = {**_report(1.0), "benchmark": "understanding"}
    with pytest.raises(ValueError, match="b.json: benchmark: expected 't2i-compbench'"):
        comparison_table(_report(1.0), other, "a.json", "b.json")


# --------------------------------------------------------------------------------------------------------- GenEval

def test_geneval_metadata_parses(shared_dir):
    prompts = read_geneval(shared_dir / "data" / "geneval" / "evaluation_metadata.jsonl")
    tags: dict[str, int] = {}
    for prompt in prompts:
        tags[prompt.tag] = tags.get(prompt.tag, 0) + 1
    assert tags == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                    "color_attr": 100}
    first = prompts[0]
    assert (first.prompt_id, first.text, first.include) == ("00000", "a photo of a bench",
                                                            ({"class": "bench", "count": 1},))
    assert first.as_prompt().category == "single_object" and prompts[-1].prompt_id == "00552"


@pytest.mark.parametrize("line, message", [
    ('{"tag": "colors", "include": [{"class": "cat", "count": 1}]}', r"m.jsonl:2: prompt: expected a non-empty"),
    ('{"prompt": "a cat", "tag": "colors", "include": []}', r"m.jsonl:2: include: expected a non-empty list"),
    ('{"prompt": "a cat", "tag": "colors", "include": [{"class": "cat", "count": "2"}]}',
     r"m.jsonl:2: include\[0\].count: expected a positive integer, got '2'"),
    ('{"prompt": "a cat", "tag": "colors", "include": [{"count": 1}]}', r"m.jsonl:2: include\[0\].class"),
    ('{"prompt": "a cat", "tag": "colors", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "dog"}]}',
     r"m.jsonl:2: exclude\[0\].count: expected a positive integer, got None"),
    ('["a cat"]', r"m.jsonl:2: expected an object with prompt, tag and include"),
    ('{"prompt": "a cat",', r"m.jsonl:2: not valid JSON"),
])
def test_bad_geneval_lines_name_the_line_and_the_field(tmp_path, line, message):
    path = tmp_path / "m.jsonl"
    path.write_text('{"prompt": "a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]}\n'
                    + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_geneval(path)


# --------------------------------------------------------------------------------------------------- understanding

@pytest.mark.parametrize("answer, choice", [
    ("(b)", 1), ("b", 1), ("B.", 1), ("The answer is (a).", 0), ("closed", 1), ("Open", 0),
    ("(a) or (b)", None), ("(e)", None), ("I am not sure", None), ("It is a door", None), ("a", 0),
])
def test_decoded_answers_name_an_option_or_none(answer, choice):
    assert read_choice(answer, ("open", "closed")) == choice


def _questions_file(tmp_path, *entries) -> Path:
    (tmp_path / "img.png").write_bytes(b"")
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path


GOOD = {"image": "img.png", "question": "Is the door open?", "options": ["open", "closed"], "answer": "(b)"}


@pytest.mark.parametrize("change, message", [
    ({"answer": "(c)"}, r"q.jsonl:2: answer: expected an option letter \(a to b\) or the text of an option"),
    ({"options": ["open"]}, r"q.jsonl:2: options: expected a list of 2 to 26 non-empty strings"),
    ({"question": ""}, r"q.jsonl:2: question: expected a non-empty string"),
    ({"image": "missing.png"}, r"q.jsonl:2: image: expected an image file, .*missing.png does not exist"),
    ({"id": 1}, r"q.jsonl:2: id: expected a unique id, '1' repeats"),
])
def test_bad_questions_name_the_line_and_the_field(tmp_path, change, message):
    path = _questions_file(tmp_path, {**GOOD, "id": 1}, {**GOOD, "id": 2, **change})
    with pytest.raises(ValueError, match=message):
        read_questions(path)


def test_questions_parse_and_pair_accuracy(tmp_path):
    path = _questions_file(tmp_path, {**GOOD, "pair": 1, "category": "state"}, {**GOOD, "answer": "open", "pair": 1},
                           {**GOOD, "answer": "closed"})
    questions = read_questions(path)
    assert [(q.question_id, q.answer, q.category, q.pair) for q in questions] == [
        ("1", 1, "state", "1"), ("2", 0, "uncategorised", "1"), ("3", 1, "uncategorised", None)]
    assert questions[0].prompt() == ("Is the door open?\n(a) open\n(b) closed\n"
                                     "Answer with the letter of the right option.")
    predictions = [{"id": "1", "category": "state", "pair": "1", "choice": 1, "correct": True},
                   {"id": "2", "category": "other", "pair": "1", "choice": None, "correct": False},
                   {"id": "3", "category": "other", "pair": None, "choice": 1, "correct": True}]
    metrics, details = understanding_summary(predictions)
    assert metrics["Accuracy"] == {"accuracy": pytest.approx(200 / 3), "questions": 3, "unreadable": 1}
    assert metrics["Pair accuracy"] == {"accuracy": 0.0, "pairs": 1}
    assert details["state"] == {"accuracy": 100.0, "questions": 1, "unreadable": 0}
