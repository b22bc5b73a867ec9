"""Reward records: the official files load and give the official maps, srum's format round-trips, and bad input
of many kinds gets the documented behaviour (a ``file:line`` error, or an entry dropped with its reason)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from srum.reward.maps import pixel_maps
from srum.reward.records import (
    RecordError,
    RegionEntry,
    RewardRecord,
    Scores,
    append_record,
    load_records,
    scored_regions,
)

GOOD = {"bad_image_file": "a.png", "good_image_file": "a.png", "prompt": "a red cube",
        "vlm_rewards": [{"object": "global_layout_reward", "bbox": [0, 0, 64, 48], "score": 0.5, "reason": "ok"},
                        {"object": "cube", "bbox": [4, 4, 20, 20], "score": 0.8}]}


def _write(tmp_path, *lines) -> object:
    path = tmp_path / "records.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _with(**changes) -> dict:
    record = json.loads(json.dumps(GOOD))
    record.update(changes)
    return record


def _with_region(**changes) -> dict:
    record = json.loads(json.dumps(GOOD))
    record["vlm_rewards"][1].update(changes)
    return record


def test_official_records_give_the_official_maps(shared_dir):
    folder = shared_dir / "data" / "srum-records"
    loaded = load_records(folder / "records.jsonl", image_dir=folder / "images")
    expected = load_file(folder / "expected_reward_maps.safetensors")
    assert len(loaded.records) == len(expected) and not loaded.problems
    for number, record in enumerate(loaded.records):
        ours = pixel_maps(scored_regions([record]), record.height, record.width)[0]
        torch.testing.assert_close(ours, expected[f"line_{number}"], rtol=0, atol=1e-7)
    assert sum(len(record.dropped) for record in loaded.records) > 0  # the inverted boxes the data holds


# Each case: a bad line, and the start of the error it must produce (``file:1: ...``).
FATAL = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"a string"', "expected a JSON object, got str"),
    (_with(vlm_rewards=None), "vlm_rewards: expected a list"),
    (_with(vlm_rewards=[1, 2]), "vlm_rewards: expected a list of objects"),
    (_with(vlm_rewards=[GOOD["vlm_rewards"][1]]), "expected a global entry"),
    (_with(vlm_rewards=[{**GOOD["vlm_rewards"][0], "bbox": [0, 0, 64]}]), "vlm_rewards[0].bbox: expected"),
    (_with(vlm_rewards=[{**GOOD["vlm_rewards"][0], "bbox": [5, 0, 64, 48]}]), "expected [0, 0, W, H]"),
    (_with(vlm_rewards=[{**GOOD["vlm_rewards"][0], "bbox": [0, 0, 64.5, 48]}]), "with whole pixel sizes"),
    (_with(vlm_rewards=[{**GOOD["vlm_rewards"][0], "score": float("nan")}]), "vlm_rewards[0].score: expected a finite"),
    (_with(vlm_rewards=[{**GOOD["vlm_rewards"][0], "score": "high"}]), "vlm_rewards[0].score: expected"),
    (_with(vlm_rewards=[{**GOOD["vlm_rewards"][0], "score": None}]), "vlm_rewards[0].score: expected"),
    (_with(prompt=""), "prompt: expected a non-empty string"),
    (_with(prompt=None), "prompt: expected a non-empty string"),
    (_with(bad_image_file=3), "bad_image_file: expected a non-empty string"),
    (_with(good_image_file=""), "good_image_file: expected a non-empty string"),
    (_with(format="other/2"), "format: expected"),
    ({"format": "srum-reward/1", "image_file": "a.png", "prompt": "p", "width": 0, "height": 4,
      "global": {"text": 0.1}}, "width: expected a positive integer"),
    ({"format": "srum-reward/1", "image_file": "a.png", "prompt": "p", "width": float("inf"), "height": 4,
      "global": {"text": 0.1}}, "width: expected a positive integer, got inf"),
    ({"format": "srum-reward/1", "image_file": "a.png", "prompt": "p", "width": 4, "height": 4,
      "global": 0.3}, "global: expected an object"),
    ({"format": "srum-reward/1", "image_file": "a.png", "prompt": "p", "width": 4, "height": 4,
      "global": {"text": float("inf")}}, "global.text: expected a finite number"),
]


@pytest.mark.parametrize("line, message", FATAL, ids=[message for _, message in FATAL])
def test_bad_records_are_reported_by_file_and_line(tmp_path, line, message):
    path = _write(tmp_path, GOOD, line)
    with pytest.raises(RecordError) as error:
        load_records(path)
    assert str(error.value).startswith(f"{path}:2: ")
    assert message in str(error.value)
    lenient = load_records(path, strict=False)
    assert len(lenient.records) == 1 and len(lenient.problems) == 1 and lenient.problems[0].startswith(f"{path}:2")


# Region entries that cannot be used are dropped with the reason, the record is kept.
DROPPED = [
    (_with_region(bbox=[20, 4, 4, 20]), "expected x1 < x2"),
    (_with_region(bbox=[4, 20, 20, 20]), "expected x1 < x2 and y1 < y2"),
    (_with_region(bbox="4,4,20,20"), "expected [x1, y1, x2, y2]"),
    (_with_region(bbox=[4, 4, "x", 20]), "expected four finite numbers"),
    (_with_region(bbox=[4, 4, float("nan"), 20]), "expected four finite numbers"),
    (_with_region(score=None), "score: expected a finite number"),
    (_with_region(score=float("-inf")), "score: expected a finite number"),
    (_with_region(score=True), "score: expected a finite number"),
]


@pytest.mark.parametrize("line, reason", DROPPED, ids=[reason for _, reason in DROPPED])
def test_unusable_region_entries_are_dropped_with_a_reason(tmp_path, line, reason):
    (record,) = load_records(_write(tmp_path, line)).records
    assert record.regions == () and len(record.dropped) == 1 and reason in record.dropped[0]


def test_out_of_range_scores_are_clamped_and_counted(tmp_path):
    line = _with_region(score=5)
    line["vlm_rewards"][0]["score"] = -3
    (record,) = load_records(_write(tmp_path, line)).records
    assert record.regions[0].scores.text == 1.0 and record.global_scores.text == -1.0 and record.clamped == 2


def test_out_of_image_boxes_are_kept_and_clamped_when_painted(tmp_path):
    (record,) = load_records(_write(tmp_path, _with_region(bbox=[-10, -10, 100, 20]))).records
    reward = pixel_maps(scored_regions([record]), 48, 64)[0]
    assert torch.allclose(reward[:20], torch.full((20, 64), 0.75 * 0.9)) and reward[30, 0] == pytest.approx(0.375)


def test_missing_image_files_and_missing_record_file(tmp_path):
    path = _write(tmp_path, GOOD)
    with pytest.raises(RecordError, match=r":1: image file 'a.png' not found"):
        load_records(path, image_dir=tmp_path)
    with pytest.raises(RecordError, match="no such record file"):
        load_records(tmp_path / "absent.jsonl")


def test_empty_region_list_gives_the_global_only_map(tmp_path):
    (record,) = load_records(_write(tmp_path, _with(vlm_rewards=GOOD["vlm_rewards"][:1]))).records
    assert torch.allclose(pixel_maps(scored_regions([record]), 4, 4)[0], torch.full((4, 4), 0.375))


def test_blank_lines_skipped_and_a_torn_last_line_named_not_cut(tmp_path):
    """A user's record file is never changed: its last line is read even without a final newline."""
    path = _write(tmp_path, GOOD, "", GOOD)
    with path.open("a") as file:
        file.write('{"bad_image_file": "b.p')
    before = path.read_bytes()
    with pytest.raises(RecordError, match=r"records.jsonl:4: not valid JSON"):
        load_records(path)
    loaded = load_records(path, strict=False)
    assert len(loaded.records) == 2 and len(loaded.problems) == 1 and path.read_bytes() == before


def test_srum_format_round_trips_and_converts_to_official(tmp_path):
    record = RewardRecord("x.png", "x.png", "two cats", 96, 64, Scores(0.25, 0.3),
                          (RegionEntry((0.1, 0.2, 0.5, 0.75), "cat", Scores(0.8, None)),
                           RegionEntry((0.5, 0.0, 1.0, 0.5), "", Scores(None, -0.4))),
                          prompt_id="7", scorer={"method": "both"}, answers={"global": "Score: 0.25"})
    path = tmp_path / "out.jsonl"
    append_record(path, record)
    append_record(path, record)
    loaded = load_records(path).records
    assert loaded == [record, record]
    official = record.to_official("text")
    assert official["vlm_rewards"][1]["bbox"] == [10, 13, 48, 48] and len(official["vlm_rewards"]) == 2
    (back,) = load_records(_write(tmp_path, official)).records
    assert back.global_scores.text == 0.25 and back.regions[0].scores.text == 0.8


def test_offline_images_must_lie_in_their_folder_and_have_the_records_size(tmp_path):
    from PIL import Image

    from srum.reward.records import RewardRecord, Scores
    from srum.reward.rollouts import read_record_image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (30, 20)).save(folder / "a.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "outside.png")

    def record(name: str, width: int = 30, height: int = 20) -> RewardRecord:
        return RewardRecord(image_file=name, good_image_file=name, prompt="p", width=width, height=height,
                            global_scores=Scores(0.5, 0.5), regions=())

    assert read_record_image(folder, record("a.png")).shape == (20, 30, 3)
    with pytest.raises(ValueError, match=r"a.png: expected 40x20 pixels as its record says, got 30x20"):
        read_record_image(folder, record("a.png", width=40))
    with pytest.raises(ValueError, match=r"\.\./outside.png: image_file: expected a path inside"):
        read_record_image(folder, record("../outside.png"))
