"""Building per-token reward weights for 64 images x 10 boxes at 1024 px (64 x 64 tokens): srum's vectorised
path against a per-image, per-box loop that paints full-resolution maps and interpolates them, as the official
code does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from srum.reward.maps import ScoredRegions, token_rewards

IMAGES, BOXES, SIDE, GRID = 64, 10, 1024, 64


def _scores():
    generator = torch.Generator().manual_seed(0)
    boxes = []
    for _ in range(IMAGES):
        corner = torch.randint(-32, SIDE, (BOXES, 2), generator=generator)
        size = torch.randint(8, 480, (BOXES, 2), generator=generator)
        boxes.append(torch.cat([corner, corner + size], 1).tolist())
    scores = (torch.rand(IMAGES, BOXES, generator=generator) * 2 - 1).tolist()
    global_scores = (torch.rand(IMAGES, generator=generator) * 2 - 1).tolist()
    return global_scores, boxes, scores


def official_style(global_scores, boxes, scores) -> torch.Tensor:
    """One H x W float32 map per image, boxes painted one by one, then F.interpolate to the token grid."""
    weights = []
    for g, image_boxes, image_scores in zip(global_scores, boxes, scores, strict=True):
        reward = torch.full((SIDE, SIDE), 0.5)
        for (x1, y1, x2, y2), score in zip(image_boxes, image_scores, strict=True):
            x1, x2, y1, y2 = max(0, min(x1, SIDE)), max(0, min(x2, SIDE)), max(0, min(y1, SIDE)), max(0, min(y2, SIDE))
            if x1 < x2 and y1 < y2:
                reward[y1:y2, x1:x2] = torch.maximum(reward[y1:y2, x1:x2], torch.tensor((score + 1) / 2))
        reward = reward * ((g + 1) / 2)
        weights.append(F.interpolate(reward[None, None], size=(GRID, GRID), mode="bilinear").flatten())
    return torch.cat(weights)


def vectorised(global_scores, boxes, scores) -> torch.Tensor:
    regions = ScoredRegions.from_lists(global_scores, boxes, scores, [(SIDE, SIDE)] * IMAGES)
    return token_rewards(regions, [(SIDE, SIDE)] * IMAGES, [(GRID, GRID)] * IMAGES)


def test_both_give_the_same_weights():
    inputs = _scores()
    torch.testing.assert_close(vectorised(*inputs), official_style(*inputs), rtol=0, atol=1e-6)


@pytest.mark.benchmark(group="reward-weights-64x10")
@pytest.mark.parametrize("provider", [official_style, vectorised], ids=["official-loop", "vectorised"])
def test_token_weights(benchmark, provider):
    inputs = _scores()
    benchmark.extra_info.update(images=IMAGES, boxes=BOXES, side=SIDE, grid=GRID)
    benchmark.pedantic(provider, args=inputs, rounds=5, warmup_rounds=1)
