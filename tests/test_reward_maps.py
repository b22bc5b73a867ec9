"""Reward maps: hand-computed values, the official records' expected maps, vectorised paths against a plain
per-record reference, every option."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import srum.reward.maps as maps
from srum.reward.maps import MapConfig, ScoredRegions, pixel_maps, sample_map, token_rewards


def official_pixel_map(global_score: float | None, regions: list[tuple[list, float | None]], height: int,
                       width: int) -> torch.Tensor:
    """The official construction, record by record and box by box (float32)."""
    reward = torch.full((height, width), 0.5)
    for box, score in regions:
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            continue
        try:
            x1, y1, x2, y2 = (int(c) for c in box)
        except (TypeError, ValueError):
            continue
        if x1 >= x2 or y1 >= y2:
            continue
        x1, x2 = max(0, min(x1, width)), max(0, min(x2, width))
        y1, y2 = max(0, min(y1, height)), max(0, min(y2, height))
        if x1 < x2 and y1 < y2:
            value = ((score if score is not None else 0.0) + 1) / 2
            reward[y1:y2, x1:x2] = torch.maximum(reward[y1:y2, x1:x2], torch.tensor(value))
    g = 0.0 if global_score is None else global_score
    return reward * ((g + 1) / 2)


def test_worked_example_of_the_method():
    # g = 0.9 -> factor 0.95; background 0.475; a region scored 0.8 -> 0.855; a region scored -0.8 -> 0.475
    regions = ScoredRegions.from_lists([0.9], [[[0, 0, 4, 4], [4, 0, 8, 4]]], [[0.8, -0.8]], [(8, 8)])
    reward = pixel_maps(regions, 8, 8)[0]
    assert reward[0, 0] == pytest.approx(0.855) and reward[0, 5] == pytest.approx(0.475)
    assert reward[6, 6] == pytest.approx(0.475)


def test_official_records_reproduce_the_official_maps(shared_dir):
    folder = shared_dir / "data" / "srum-records"
    expected = load_file(folder / "expected_reward_maps.safetensors")
    lines = (folder / "records.jsonl").read_text().splitlines()
    for number, line in enumerate(lines):
        record = json.loads(line)
        rewards = record["vlm_rewards"]
        width, height = rewards[0]["bbox"][2], rewards[0]["bbox"][3]
        target = expected[f"line_{number}"]
        assert target.shape == (height, width)
        boxes = [r["bbox"] for r in rewards[1:]]
        scores = [r["score"] for r in rewards[1:]]
        regions = ScoredRegions.from_lists([rewards[0]["score"]], [boxes], [scores], [(width, height)])
        ours = pixel_maps(regions, height, width)[0]
        torch.testing.assert_close(ours, target, rtol=0, atol=1e-7, msg=f"line {number}")
        reference = official_pixel_map(rewards[0]["score"], list(zip(boxes, scores, strict=True)), height, width)
        torch.testing.assert_close(reference, target, rtol=0, atol=1e-7, msg=f"reference, line {number}")


def _random_regions(generator: torch.Generator, count: int, frame: tuple[int, int]):
    width, height = frame
    globals_, boxes, scores, sizes = [], [], [], []
    for _ in range(count):
        k = int(torch.randint(0, 7, (1,), generator=generator))
        corners = torch.randint(-10, max(width, height) + 10, (k, 4), generator=generator).tolist()
        boxes.append(corners)  # inverted and out-of-image boxes on purpose
        scores.append((torch.rand(k, generator=generator) * 2 - 1).tolist())
        globals_.append(float(torch.rand((), generator=generator) * 2 - 1))
        sizes.append((width, height))
    return globals_, boxes, scores, sizes


@pytest.mark.parametrize("frame, grid", [((64, 64), (4, 4)), ((96, 48), (3, 6)), ((37, 23), (7, 5))])
def test_token_rewards_equal_interpolating_the_reference_map(frame, grid):
    generator = torch.Generator().manual_seed(sum(frame))
    globals_, boxes, scores, sizes = _random_regions(generator, 9, frame)
    regions = ScoredRegions.from_lists(globals_, boxes, scores, sizes)
    width, height = frame
    ours = token_rewards(regions, [(height, width)] * 9, [grid] * 9)
    expected = torch.cat([sample_map(official_pixel_map(g, list(zip(b, s, strict=True)), height, width), *grid)
                          for g, b, s in zip(globals_, boxes, scores, strict=True)])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_ragged_batches_and_other_frames():
    """Boxes scored in one frame are rescaled to another (a 2x training image), images of different sizes
    share a batch."""
    regions = ScoredRegions.from_lists([0.5, -0.2], [[[8, 8, 24, 16]], [[0, 0, 10, 30]]], [[0.9], [0.4]],
                                       [(32, 32), (20, 40)])
    frames, grids = [(64, 64), (40, 20)], [(4, 4), (5, 2)]
    ours = token_rewards(regions, frames, grids)
    first = official_pixel_map(0.5, [([16, 16, 48, 32], 0.9)], 64, 64)
    second = official_pixel_map(-0.2, [([0, 0, 10, 30], 0.4)], 40, 20)
    torch.testing.assert_close(ours, torch.cat([sample_map(first, 4, 4), sample_map(second, 5, 2)]), rtol=0,
                               atol=1e-6)


def test_sample_map_is_f_interpolate():
    reward = torch.rand(37, 23)
    torch.testing.assert_close(sample_map(reward, 7, 5), F.interpolate(reward[None, None], size=(7, 5),
                                                                       mode="bilinear").flatten())


def test_signed_rule_lets_bad_regions_go_negative():
    regions = ScoredRegions.from_lists([1.0], [[[0, 0, 4, 4], [2, 0, 6, 4]]], [[-0.8, 0.5]], [(8, 4)])
    reward = pixel_maps(regions, 4, 8, MapConfig(rule="signed"))[0]
    assert reward[0, 0] == pytest.approx(-0.8)  # only the bad box
    assert reward[0, 3] == pytest.approx(-0.8)  # overlap: the larger magnitude wins
    assert reward[0, 5] == pytest.approx(0.5) and reward[0, 7] == 0.0


def test_mean_rule_and_ablations():
    regions = ScoredRegions.from_lists([0.0], [[[0, 0, 4, 4], [2, 0, 6, 4]]], [[0.6, -0.2]], [(8, 4)])
    mean = pixel_maps(regions, 4, 8, MapConfig(rule="mean"))[0]
    assert mean[0, 3] == pytest.approx(0.5 * ((0.8 + 0.4) / 2)) and mean[0, 7] == pytest.approx(0.25)
    global_only = pixel_maps(regions, 4, 8, MapConfig(ablation="global_only"))[0]
    assert torch.allclose(global_only, torch.full((4, 8), 0.25))
    local_only = pixel_maps(regions, 4, 8, MapConfig(ablation="local_only"))[0]
    assert local_only[0, 0] == pytest.approx(0.8) and local_only[0, 7] == pytest.approx(0.5)
    uniform = token_rewards(regions, [(4, 8)], [(2, 4)], MapConfig(ablation="uniform"))
    assert torch.equal(uniform, torch.ones(8))


def test_no_regions_and_missing_global():
    """No regions: 0.5 * (g + 1) / 2 everywhere. A record without a global entry is read with g = 0."""
    regions = ScoredRegions.from_lists([0.6, 0.0], [[], []], [[], []], [(4, 4), (4, 4)])
    maps = pixel_maps(regions, 4, 4)
    assert torch.allclose(maps[0], torch.full((4, 4), 0.4)) and torch.allclose(maps[1], torch.full((4, 4), 0.25))


@pytest.mark.parametrize("rule", ["max_floor", "signed"])
def test_bitmask_painting_equals_the_dense_membership_path(monkeypatch, rule):
    generator = torch.Generator().manual_seed(4)
    globals_, boxes, scores, sizes = _random_regions(generator, 12, (40, 30))
    scores[0] = [0.5, -0.5, 0.2, -0.5]  # magnitude ties between signs, all on one box
    boxes[0] = [[0, 0, 20, 20]] * 4
    regions = ScoredRegions.from_lists(globals_, boxes, scores, sizes)
    config = MapConfig(rule=rule)
    fast = pixel_maps(regions, 30, 40, config)
    monkeypatch.setattr(maps, "MAX_BITMASK_BOXES", 0)
    torch.testing.assert_close(fast, pixel_maps(regions, 30, 40, config), rtol=0, atol=0)
