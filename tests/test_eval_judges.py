"""The judges and resumable judging: a genuine transformers vision-language model (a tiny random LLaVA saved
with save_pretrained) loaded from a local folder, the unified model judging itself, and a judgement file that a
second run leaves alone."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from srum.eval.judges import UnifiedJudge, VLMJudge
from srum.eval.judging import judge_folder, retry_seed
from srum.eval.rubric import RUBRIC_VERSION, official_score, parse_verdict
from srum.generation.pipeline import Pipeline
from srum.generation.writer import RECORDS
from tests.eval_helpers import make_checkpoint, make_vlm_judge


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    return make_vlm_judge(tmp_path_factory.mktemp("judge"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt")


def _images(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (20 + 4 * i, 30, 3), generator=generator, dtype=torch.uint8) for i in range(count)]


@pytest.fixture()
def generated(tmp_path):
    """A folder as ``srum generate`` writes it: PNGs and their records."""
    folder = tmp_path / "images"
    folder.mkdir()
    prompts = [("1", "color", "a red cube"), ("2", "numeracy", "two very small green cats on a wall"),
               ("3", "complex_spatial", "a bird")]
    with (folder / RECORDS).open("w") as file:
        for (prompt_id, category, prompt), image in zip(prompts, _images(3), strict=True):
            Image.fromarray(image.numpy()).save(folder / f"{prompt_id}_0.png")
            file.write(json.dumps({"prompt_id": prompt_id, "category": category, "prompt": prompt,
                                   "image_index": 0, "image_file": f"{prompt_id}_0.png"}) + "\n")
    return folder


def test_vlm_judge_loads_locally_and_answers_batch_independently(vlm_folder):
    judge = VLMJudge(vlm_folder, "LlavaForConditionalGeneration", max_new_tokens=6)
    assert judge.settings == {"judge": "vlm", "folder": str(vlm_folder.resolve()),
                              "class": "LlavaForConditionalGeneration", "dtype": "float32", "max_new_tokens": 6,
                              "rubric": RUBRIC_VERSION}
    images, questions = _images(2), ["rate this picture", "rate this picture of two cats, please"]
    together = judge.answer(images, questions)  # prompts of different lengths: left padding must not leak
    alone = [judge.answer([image], [question])[0] for image, question in zip(images, questions, strict=True)]
    assert together == alone and all(isinstance(answer, str) for answer in together)


def test_vlm_judge_refuses_what_it_cannot_load(vlm_folder, tmp_path):
    with pytest.raises(ValueError, match="judge_class: expected the name of a transformers model class"):
        VLMJudge(vlm_folder, "NoSuchModel")
    with pytest.raises(ValueError, match="judge_class: expected the name of a transformers model class"):
        VLMJudge(vlm_folder, "AutoProcessor")
    with pytest.raises(FileNotFoundError, match="judge folder not found"):
        VLMJudge(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot load the judge's processor"):
        VLMJudge(tmp_path)


def test_judging_is_resumable_and_locked_to_one_judge(vlm_folder, generated, tmp_path):
    judge = VLMJudge(vlm_folder, "LlavaForConditionalGeneration", max_new_tokens=4)
    calls = []
    answer = judge.answer
    judge.answer = lambda images, instructions, *sampling: calls.append(len(images)) or answer(images, instructions,
                                                                                                *sampling)
    out = tmp_path / "judgements.jsonl"
    judgements = judge_folder(judge, generated, out, batch_size=2)
    assert calls == [2, 1] and [j["image_file"] for j in judgements] == ["1_0.png", "2_0.png", "3_0.png"]
    for judgement in judgements:  # the raw answer and both readings of it
        verdict = parse_verdict(judgement["raw"])
        assert (judgement["score"], judgement["status"]) == (verdict.score, verdict.status)
        assert judgement["official_score"] == official_score(judgement["raw"])
        assert judgement["settings"] == judge.settings
    assert judgements[1]["prompt"] == "two very small green cats on a wall"
    before = out.read_bytes()
    assert judge_folder(judge, generated, out) == judgements and calls == [2, 1] and out.read_bytes() == before

    lines = out.read_text().splitlines()  # a run killed after the first judgement
    out.write_text(lines[0] + "\n" + lines[1][:10])
    assert len(judge_folder(judge, generated, out)) == 3 and calls == [2, 1, 1, 1]

    other = VLMJudge(vlm_folder, "LlavaForConditionalGeneration", max_new_tokens=5)
    with pytest.raises(ValueError, match=r"judgements.jsonl: holds judgements made with other settings "
                                         r"\(max_new_tokens\); move judgements.jsonl away to judge the images again"):
        judge_folder(other, generated, out)


class CannedJudge:
    """Answers from a script keyed by (prompt, temperature, seed): a stand-in for a model's answers, so the
    re-asking logic is checked against known answers."""

    settings = {"judge": "canned"}

    def __init__(self, script) -> None:
        self.script, self.calls = script, []

    def answer(self, images, instructions, temperature=0.0, seed=0):
        self.calls.append((len(images), temperature))
        return [self.script(text.split('"')[1], temperature, seed) for text in instructions]


def test_unreadable_judgements_are_re_asked_sampled_and_superseded(generated, tmp_path):
    def script(prompt, temperature, seed):
        if prompt == "a red cube":
            return '{"score": 90}'
        if temperature == 0:
            return "no idea"
        if prompt.startswith("two") and seed == retry_seed("2_0.png", 2):
            return '{"score": 40}'
        return "still no"

    judge, out = CannedJudge(script), tmp_path / "judgements.jsonl"
    judgements = judge_folder(judge, generated, out, batch_size=3, retries=2, retry_temperature=0.5)
    assert judge.calls == [(3, 0.0), (1, 0.5), (1, 0.5), (1, 0.5), (1, 0.5)]
    first, second, third = judgements
    assert (first["score"], first["failed_answers"], first["official_score"]) == (90, [], 90)
    assert (second["score"], second["raw"], second["failed_answers"]) == (40, '{"score": 40}', ["no idea", "still no"])
    assert second["official_score"] == -1  # the official number reads the greedy answer
    assert (third["score"], third["status"], third["failed_answers"]) == (None, "missing", ["no idea", "still no"])
    assert len(out.read_text().splitlines()) == 3 + 4  # re-asks are appended, nothing is rewritten

    assert judge_folder(judge, generated, out, retries=2) == judgements and len(judge.calls) == 5  # all done
    judge_folder(judge, generated, out, retries=3)
    assert judge.calls[5:] == [(1, 0.7)]  # only the image still failing, once more

    with pytest.raises(ValueError, match="judge_retries: expected a whole number >= 0, got -1"):
        judge_folder(judge, generated, out, retries=-1)
    with pytest.raises(ValueError, match="retry_temperature: expected a positive number, got 0"):
        judge_folder(judge, generated, out, retry_temperature=0)


def test_sampled_answers_are_seeded(vlm_folder, checkpoint):
    images, questions = _images(2), ["rate this picture", "rate it again"]
    for judge in (VLMJudge(vlm_folder, "LlavaForConditionalGeneration", max_new_tokens=8),
                  UnifiedJudge(Pipeline.from_checkpoint(checkpoint), checkpoint, max_new_tokens=8)):
        sampled = [judge.answer(images, questions, temperature=5.0, seed=seed) for seed in (1, 1, 2)]
        assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
        assert judge.answer(images, questions) == judge.answer(images, questions, seed=3)  # greedy ignores seeds


def test_the_unified_model_judges_its_images(checkpoint, generated, tmp_path):
    judge = UnifiedJudge(Pipeline.from_checkpoint(checkpoint), checkpoint, max_new_tokens=3)
    assert judge.settings == {"judge": "unified", "checkpoint": str(checkpoint.resolve()), "max_new_tokens": 3,
                              "rubric": RUBRIC_VERSION}
    judgements = judge_folder(judge, generated, tmp_path / "self.jsonl", batch_size=3)
    assert len(judgements) == 3 and all(isinstance(j["raw"], str) for j in judgements)
