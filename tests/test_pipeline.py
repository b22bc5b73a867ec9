"""The public pipeline on a tiny checkpoint written by ``srum model init``."""

from __future__ import annotations

import pytest
import torch

from srum.cli import main
from srum.generation.pipeline import Pipeline, resize_for_vit
from srum.generation.sampler import SamplerConfig
from srum.generation.text import DecodingConfig, candidate_logprobs


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    folder = tmp_path_factory.mktemp("tiny")
    main(["model", "init", "--preset", "tiny", "--out", str(folder), "--seed", "0"])
    return Pipeline.from_checkpoint(folder)


def test_generate_gives_images_of_the_asked_size_per_seed(pipeline):
    sampler = SamplerConfig(num_timesteps=3)
    first = pipeline.generate(["a red cube", "a blue ball"], seeds=[1, 2], sampler=sampler, height=16, width=24)
    again = pipeline.generate(["a red cube"], seeds=[1], sampler=sampler, height=16, width=24)
    assert [tuple(image.shape) for image in first.images] == [(16, 24, 3)] * 2
    assert first.images[0].dtype == torch.uint8
    assert torch.equal(first.images[0], again.images[0])
    assert not torch.equal(first.images[0], first.images[1])
    with pytest.raises(ValueError, match="multiples of 4"):
        pipeline.generate(["x"], seeds=[0], sampler=sampler, height=18, width=24)


def test_answer_and_score(pipeline):
    images = [torch.rand(3, 28, 42) * 2 - 1, torch.rand(3, 14, 14) * 2 - 1]
    answers = pipeline.answer(images, ["what colour is the cube?", "how many?"], DecodingConfig(max_new_tokens=3))
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    scores = pipeline.score(images, ["score?", "score?"], [["-1", "0", "1"], ["yes", "no"]])
    assert [tuple(score.shape) for score in scores] == [(3,), (2,)]
    assert all(bool((score < 0).all()) for score in scores)
    contexts = pipeline._image_contexts(images, ["score?", "score?"], think=False)
    expected = candidate_logprobs(contexts, [[pipeline.encode(o) for o in ["-1", "0", "1"]], [pipeline.encode("no")]])
    torch.testing.assert_close(scores[0], expected[0])
    torch.testing.assert_close(scores[1][1:], expected[1])


@pytest.mark.parametrize("size, expected", [
    ((42, 28), (336, 224)),  # short side raised to 224, the long side scaled alike
    ((2000, 1000), (980, 490)),  # long side capped at 980
    ((490, 700), (490, 700)),  # already valid: untouched
])
def test_vit_resize_follows_bagel_rules(size, expected):
    image = torch.rand(3, *size) * 2 - 1
    resized = resize_for_vit(image, patch=14, max_side=980)
    assert tuple(resized.shape[-2:]) == expected
    assert all(side % 14 == 0 for side in resized.shape[-2:])


def test_options_scored_on_a_shared_context_equal_one_copy_of_the_context_per_option(pipeline):
    """The reference: every option gets its own copy of its context's cache and is scored alone, in float64."""
    model = pipeline.model.double()
    try:
        images = [torch.rand(3, *size, dtype=torch.float64) * 2 - 1 for size in ((28, 42), (14, 14))]
        contexts = pipeline._image_contexts(images, ["score?", "how many?"], think=False)
        options = [[pipeline.encode(o) for o in ["-1.0", "0.5", "1", "no"]], [pipeline.encode("yes")]]
        shared = candidate_logprobs(contexts, options)
        for context, own in enumerate(options):
            for index, option in enumerate(own):
                run = [pipeline.special.bos_token_id, *option]
                alone = contexts.fork(torch.tensor([context])).score_tokens([run])[0]
                logprobs = torch.log_softmax(alone.float(), dim=-1)
                expected = logprobs[torch.arange(len(run) - 1), torch.tensor(run[1:])].sum()
                torch.testing.assert_close(shared[context][index], expected, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="non-empty runs"):
            contexts.score_runs([[[1]], []])
    finally:
        model.float()
