"""JSONL reading never changes a file: a user's last line without a final newline is a line like any other. Only
srum's own resumable outputs get a torn last line (a killed write) cut off, just before a run appends to them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srum.eval.geneval import read_geneval
from srum.eval.understanding import answer_questions, read_questions
from srum.generation.writer import RECORDS
from srum.io.jsonl import append_jsonl, read_jsonl, repair_torn_tail
from srum.reward.records import RewardRecord, Scores, load_records
from srum.reward.rollouts import score_rollouts
from srum.reward.scorer import ScorerConfig

REWARD = {"bad_image_file": "a.png", "good_image_file": "a.png", "prompt": "a red cube",
          "vlm_rewards": [{"object": "global_layout_reward", "bbox": [0, 0, 64, 48], "score": 0.5}]}
GENEVAL = {"prompt": "a photo of a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]}
QUESTION = {"image": "img.png", "question": "Is the door open?", "options": ["open", "closed"], "answer": "(b)"}


def _without_final_newline(path: Path, *entries: dict) -> bytes:
    """Write ``entries`` as a user might: no newline after the last one; returns the bytes written."""
    data = "\n".join(json.dumps(entry) for entry in entries).encode()
    path.write_bytes(data)
    return data


def _png(path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)


# ------------------------------------------------------------------------------------------- reading a user's file

def test_read_jsonl_keeps_a_last_line_without_newline_and_leaves_the_file(tmp_path):
    path = tmp_path / "records.jsonl"
    data = _without_final_newline(path, {"a": 1}, {"b": 2})
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]
    assert path.read_bytes() == data


def test_reward_records_keep_a_last_line_without_newline_and_leave_the_file(tmp_path):
    path = tmp_path / "records.jsonl"
    data = _without_final_newline(path, REWARD, {**REWARD, "prompt": "a blue cube"})
    assert [record.prompt for record in load_records(path).records] == ["a red cube", "a blue cube"]
    assert path.read_bytes() == data


def test_geneval_metadata_keeps_a_last_line_without_newline_and_leaves_the_file(tmp_path):
    path = tmp_path / "metadata.jsonl"
    data = _without_final_newline(path, GENEVAL, {**GENEVAL, "prompt": "a photo of two dogs"})
    assert [prompt.text for prompt in read_geneval(path)] == ["a photo of a dog", "a photo of two dogs"]
    assert path.read_bytes() == data


def test_questions_keep_a_last_line_without_newline_and_leave_the_file(tmp_path):
    _png(tmp_path / "img.png")
    path = tmp_path / "q.jsonl"
    data = _without_final_newline(path, {**QUESTION, "id": 1}, {**QUESTION, "id": 2})
    assert [question.question_id for question in read_questions(path)] == ["1", "2"]
    assert path.read_bytes() == data


@pytest.mark.parametrize("read, first, message", [
    (read_jsonl, {"a": 1}, r"u.jsonl:2: not a JSON record"),
    (load_records, REWARD, r"u.jsonl:2: not valid JSON"),
    (read_geneval, GENEVAL, r"u.jsonl:2: not valid JSON"),
])
def test_a_last_line_that_is_not_json_is_named_and_the_file_left(tmp_path, read, first, message):
    path = tmp_path / "u.jsonl"
    data = json.dumps(first).encode() + b'\n{"prompt": "a ca'
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        read(path)
    assert path.read_bytes() == data


# ----------------------------------------------------------------------------------- appending to srum's own output

def test_repair_cuts_only_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    repair_torn_tail(path)  # nothing yet: nothing to do, nothing made
    assert not path.exists()
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    repair_torn_tail(path)
    assert path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c"')
    repair_torn_tail(path)
    append_jsonl(path, {"c": 3})
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}, {"c": 3}]


class _Scorer:
    """Stands in for ``SelfScorer``: one record per image, and the names it was asked about."""

    settings = {"method": "stand-in"}
    config = ScorerConfig(method="both")

    def __init__(self) -> None:
        self.asked: list[str] = []

    def score(self, images, prompts, image_files, prompt_ids):
        self.asked += image_files
        return [RewardRecord(name, name, prompt, 8, 8, Scores(0.5, 0.5), prompt_id=prompt_id)
                for name, prompt, prompt_id in zip(image_files, prompts, prompt_ids, strict=True)]


def test_score_resumes_after_a_torn_record_and_leaves_the_rollouts_file(tmp_path):
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    entries = [{"prompt_id": str(i), "prompt": f"prompt {i}", "image_file": f"{i}_0.png"} for i in range(3)]
    for entry in entries:
        _png(rollouts / entry["image_file"])
    rollouts_data = _without_final_newline(rollouts / RECORDS, *entries)  # a hand-made folder: no final newline
    out, scorer = tmp_path / "scores.jsonl", _Scorer()
    assert score_rollouts(scorer, rollouts, out).written == 3 and scorer.asked == ["0_0.png", "1_0.png", "2_0.png"]

    lines = out.read_text().splitlines()  # a run killed while appending the third record
    out.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:20])
    assert score_rollouts(scorer, rollouts, out).written == 1 and scorer.asked[3:] == ["2_0.png"]
    assert out.read_text().splitlines() == lines
    assert (rollouts / RECORDS).read_bytes() == rollouts_data


class _Pipeline:
    """Stands in for ``Pipeline``: always prefers the second option."""

    def score(self, images, prompts, candidates):
        return [torch.tensor([-2.0, -1.0]) for _ in images]


def test_answers_resume_after_a_torn_prediction(tmp_path):
    _png(tmp_path / "img.png")
    _without_final_newline(tmp_path / "q.jsonl", *({**QUESTION, "id": i} for i in range(3)))
    questions = read_questions(tmp_path / "q.jsonl")
    out = tmp_path / "predictions.jsonl"
    predictions = answer_questions(_Pipeline(), questions, out)
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1][:15])  # killed while appending the second prediction
    assert answer_questions(_Pipeline(), questions, out) == predictions
    assert out.read_text().splitlines() == lines


def test_judging_and_answering_hold_their_output_while_they_write(tmp_path):
    from srum.eval.judging import judge_folder
    from srum.eval.understanding import answer_questions
    from srum.io.lock import exclusive

    for name, run in (("judgements.jsonl", lambda out: judge_folder(None, tmp_path, out)),
                      ("answers.jsonl", lambda out: answer_questions(None, [], out))):
        out = tmp_path / name
        out.write_text('{"kept": 1}\n')
        with exclusive(out), pytest.raises(ValueError, match=f"{name}: another srum run is writing it"):
            run(out)  # refused before anything is read or written
        assert out.read_text() == '{"kept": 1}\n'
