"""The VLM reader: a genuine transformers vision-language model (a tiny random LLaVA) read through the self-scorer's
interface. Batched candidate scores equal a plain one-candidate-at-a-time forward, answers equal a plain greedy
``generate``, and the reader drives ``SelfScorer`` and the ``vlm`` reward judge end to end."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

from srum.generation.text import DecodingConfig
from srum.model.autoencoder import from_uint8_image
from srum.reward.instructions import DEFAULT_INSTRUCTIONS, SCORE_PREFIX
from srum.reward.judges import ScoringConfig, build_judge
from srum.reward.proposals import build_proposer
from srum.reward.scorer import ScorerConfig, SelfScorer
from srum.reward.vlm_reader import VLMReader, to_picture
from tests.eval_helpers import make_vlm_judge

LLAVA = "LlavaForConditionalGeneration"
# Expected scores over five candidates instead of 21: the tiny tokenizer makes an instruction ~900 tokens long.
FAST = ScorerConfig(method="expected", score_step=0.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_vlm_judge(tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def reader(folder):
    return VLMReader(folder, LLAVA)


def _blocks(height: int, width: int) -> torch.Tensor:
    """A uint8 image: grey background, a red and a blue block (two connected components)."""
    image = torch.full((height, width, 3), 200, dtype=torch.uint8)
    image[2:8, 3:10] = torch.tensor([220, 30, 30], dtype=torch.uint8)
    image[10:15, 14:22] = torch.tensor([30, 30, 220], dtype=torch.uint8)
    return image


def _reference_logprob(reader: VLMReader, image: torch.Tensor, question: str, candidate: str) -> float:
    """One candidate alone: prompt ids (the processor's) then the candidate's own ids, one full forward, the
    log-softmax at the candidate positions summed in float64."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = reader.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = reader.processor(text=[text], images=[to_picture(image)], return_tensors="pt")
    tail = torch.tensor([reader.tokenizer(candidate, add_special_tokens=False)["input_ids"]])
    ids = torch.cat([inputs["input_ids"], tail], dim=1)
    logits = reader.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                          pixel_values=inputs["pixel_values"]).logits[0].double()
    start = inputs["input_ids"].shape[1]
    logprobs = torch.log_softmax(logits[start - 1:-1], dim=-1)
    return logprobs.gather(-1, tail[0].unsqueeze(-1)).sum().item()


def test_picture_round_trip_is_exact():
    image = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.tensor(numpy.array(to_picture(from_uint8_image(image)))), image)


@torch.no_grad()
def test_score_equals_one_candidate_at_a_time(reader):
    images = [from_uint8_image(_blocks(16, 24)), from_uint8_image(_blocks(20, 28))]
    questions = ["rate this picture", "how well does it show a red cube left of a blue ball?"]
    # Lengths differ (right padding must not leak); "Score: 0.5" may merge with the prompt's "\n" if tokenized
    # jointly, so the reference uses the candidate's own ids too.
    candidates = [[SCORE_PREFIX + c for c in ("-1.0", "0.5", "1.0")], ["yes", "no, it does not", SCORE_PREFIX + "0.3"]]
    scores = reader.score(images, questions, candidates)
    assert len(scores) == 2
    for image, question, options, got in zip(images, questions, candidates, scores, strict=True):
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (len(options),)
        expected = torch.tensor([_reference_logprob(reader, image, question, option) for option in options],
                                dtype=torch.float64)
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)
        assert (got < 0).all()


@torch.no_grad()
def test_answer_equals_plain_greedy_generate(reader):
    images = [_blocks(16, 24), _blocks(20, 28)]
    questions = ["rate this picture", "rate this picture of a red cube left of a blue ball, please"]
    answers = reader.answer([from_uint8_image(image) for image in images], questions, DecodingConfig(max_new_tokens=5))
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    for image, question, answer in zip(images, questions, answers, strict=True):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = reader.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        inputs = reader.processor(text=[text], images=[to_picture(from_uint8_image(image))], return_tensors="pt")
        output = reader.model.generate(**inputs, max_new_tokens=5, do_sample=False)
        plain = reader.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert answer == plain[0].strip()


def test_answer_refuses_think_and_sampling(reader):
    image = [from_uint8_image(_blocks(16, 24))]
    with pytest.raises(ValueError, match="no think mode"):
        reader.answer(image, ["rate"], DecodingConfig(max_new_tokens=2), think=True)
    with pytest.raises(ValueError, match="decodes greedily"):
        reader.answer(image, ["rate"], DecodingConfig(max_new_tokens=2, do_sample=True))


def test_vit_frame_is_the_image_frame(reader):
    assert reader.vit_frame(20, 28) == (20, 28)


def _assert_expected_records(records, count: int) -> None:
    assert len(records) == count
    for record in records:
        assert record.regions, "the components proposer should find the coloured blocks"
        values = [record.global_scores.expected] + [region.scores.expected for region in record.regions]
        assert all(value is not None and math.isfinite(value) and -1 <= value <= 1 for value in values)
        assert record.global_scores.text is None


def test_self_scorer_reads_with_the_vlm(reader):
    scorer = SelfScorer(reader, build_proposer("components", max_regions=3), FAST, DEFAULT_INSTRUCTIONS)
    records = scorer.score([_blocks(16, 24), _blocks(20, 28)], ["a red cube", "a blue ball"], ["a.png", "b.png"])
    _assert_expected_records(records, 2)
    assert [len(record.regions) for record in records] == [2, 2]
    assert records[1].scorer["seen_frame"] == [20, 28]


def test_build_judge_vlm(folder):
    config = ScoringConfig(judge="vlm", vlm_dir=str(folder), vlm_class=LLAVA, max_regions=3, scorer=FAST)
    judge = build_judge(config, pipeline=None)
    assert isinstance(judge, SelfScorer) and isinstance(judge.pipeline, VLMReader)
    _assert_expected_records(judge.score([_blocks(16, 24)], ["a red cube"], ["a.png"]), 1)
