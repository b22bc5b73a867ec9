"""Self-scoring: the probability-weighted score agrees with the free-text score when the model is certain;
``srum score`` writes valid, resumable records."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from srum.cli import main
from srum.generation.pipeline import Pipeline, resize_for_vit
from srum.model.autoencoder import from_uint8_image
from srum.model.overfit import overfit
from srum.model.packing import Text, VitImage, pack
from srum.reward.decompose import ModelDecomposer, parse_questions, whole_prompt_question
from srum.reward.instructions import DEFAULT_INSTRUCTIONS
from srum.reward.proposals import GridProposer, WholeImageProposer
from srum.reward.records import load_records
from srum.reward.scorer import ScorerConfig, SelfScorer, expected_scores
from srum.shapeworld.questions import ShapeWorldDecomposer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    main(["model", "init", "--preset", "tiny", "--out", str(folder), "--seed", "0"])
    return folder


def test_expected_score_is_the_renormalised_expectation():
    logprobs = torch.log(torch.tensor([[0.1, 0.1, 0.3], [0.0, 0.5, 0.0]]).clamp(min=1e-30))
    values = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(expected_scores(logprobs, values), torch.tensor([(0.3 - 0.1) / 0.5, 0.0]))


def test_expected_score_agrees_with_the_text_score_when_the_model_is_certain(checkpoint):
    """Teach a tiny model to answer the global instruction with one score, then read it both ways."""
    pipeline = Pipeline.from_checkpoint(checkpoint)
    image = (torch.rand(28, 42, 3) * 255).to(torch.uint8)
    prompt = "a red cube left of a blue ball"
    question = DEFAULT_INSTRUCTIONS.global_instruction(prompt)
    answer = "Score: 0.7\nReason: the cube is left of the ball."
    pixels = resize_for_vit(from_uint8_image(image), *pipeline.vit_transform)
    batch = pack([[VitImage(pixels), Text(pipeline.encode(question)), Text(pipeline.encode(answer), loss=True)]],
                 pipeline.model.config, pipeline.special)
    losses = overfit(pipeline.model, batch, steps=60, lr=3e-3)
    assert losses[-1] < 0.05 * losses[0]
    pipeline.model.eval()

    scorer = SelfScorer(pipeline, WholeImageProposer(), ScorerConfig(max_new_tokens_global=24,
                                                                      max_new_tokens_regions=4))
    (record,) = scorer.score([image], [prompt], ["x.png"])
    assert record.global_scores.text == pytest.approx(0.7)
    assert record.global_scores.expected == pytest.approx(0.7, abs=0.02)
    assert len(pipeline.encode("Score: 0.7")) > 2  # the number spans several BPE tokens


def _rollouts(checkpoint, folder):
    prompts = folder / "prompts.txt"
    prompts.write_text("a red cube\ntwo blue balls\n")
    main(["generate", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--out", str(folder / "gen"),
          "--steps", "3", "--height", "16", "--width", "24", "--device", "cpu"])
    return folder / "gen"


def test_score_command_writes_valid_resumable_records(checkpoint, tmp_path, caplog):
    rollouts = _rollouts(checkpoint, tmp_path)
    out = tmp_path / "scores.jsonl"
    command = ["score", "--checkpoint", str(checkpoint), "--rollouts", str(rollouts), "--out", str(out),
               "--proposer", "grid", "--max_new_tokens_global", "4", "--max_new_tokens_regions", "8",
               "--device", "cpu"]
    with caplog.at_level("INFO", logger="srum"):
        main(command)
    records = load_records(out, image_dir=rollouts).records
    assert [r.image_file for r in records] == ["1_0.png", "2_0.png"]
    missing = sum(s.get(kind) is None for r in records for s in [r.global_scores, *(g.scores for g in r.regions)]
                  for kind in ("text", "expected"))  # a random tiny model's free text rarely holds a score
    summary = f"wrote 2 reward records ({missing} scores unparsed or missing, 0 clamped to [-1, 1]) to {out}"
    assert summary in caplog.text
    for record in records:
        assert (record.width, record.height) == (24, 16) and len(record.regions) == 4
        assert all(r.scores.expected is not None and -1 <= r.scores.expected <= 1 for r in record.regions)
        assert record.scorer["proposer"] == "GridProposer" and record.scorer["instructions"]
        assert all(0 <= c <= 1 for r in record.regions for c in r.box)
    before = out.read_bytes()
    main(command)
    assert out.read_bytes() == before

    (rollouts / "2_0.png").unlink()
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n")
    with caplog.at_level("WARNING"):
        main(command)
    assert "2_0.png is missing" in caplog.text
    assert len(out.read_text().splitlines()) == 1


def test_text_only_and_expected_only_methods(checkpoint):
    pipeline = Pipeline.from_checkpoint(checkpoint)
    image = (torch.rand(16, 24, 3) * 255).to(torch.uint8)
    text_only = SelfScorer(pipeline, GridProposer(1, 2), ScorerConfig(method="text", max_new_tokens_global=2,
                                                                      max_new_tokens_regions=2))
    (record,) = text_only.score([image], ["a cat"], ["a.png"])
    assert record.global_scores.expected is None and all(r.scores.expected is None for r in record.regions)
    assert "global" in record.answers and "regions" in record.answers
    expected_only = SelfScorer(pipeline, GridProposer(1, 2), ScorerConfig(method="expected"))
    (record,) = expected_only.score([image], ["a cat"], ["a.png"])
    assert record.answers == {} and record.global_scores.expected is not None
    json.dumps(record.to_srum())


@pytest.mark.parametrize("readout", ["instruction", "questions"])
def test_scores_read_a_few_contexts_at_a_time_equal_those_read_all_at_once(checkpoint, readout):
    pipeline = Pipeline.from_checkpoint(checkpoint)
    generator = torch.Generator().manual_seed(3)
    images = [(torch.rand(16, 24, 3, generator=generator) * 255).to(torch.uint8) for _ in range(3)]
    prompts = ["a red square left of a blue circle", "two green triangles", "a yellow circle"]
    method = "expected" if readout == "questions" else "both"
    decomposer = ShapeWorldDecomposer() if readout == "questions" else None

    def records(max_contexts):
        config = ScorerConfig(method=method, readout=readout, max_new_tokens_global=3, max_new_tokens_regions=3,
                              max_contexts=max_contexts)
        return SelfScorer(pipeline, GridProposer(1, 2), config, decomposer=decomposer).score(
            images, prompts, [f"{i}.png" for i in range(3)])

    together, apart = records(None), records(2)
    for whole, parts in zip(together, apart, strict=True):
        assert whole.answers == parts.answers
        assert parts.global_scores.expected == pytest.approx(whole.global_scores.expected, abs=1e-6)
        for region, region_parts in zip(whole.regions, parts.regions, strict=True):
            assert region_parts.scores.expected == pytest.approx(region.scores.expected, abs=1e-6)
    with pytest.raises(ValueError, match="max_contexts: expected at least 1"):
        ScorerConfig(max_contexts=0)


def test_instructions_file_replaces_templates(tmp_path):
    from srum.reward.instructions import read_instructions

    path = tmp_path / "instructions.yaml"
    path.write_text("global_template: |\n  Judge the layout of '{prompt}'. Answer 'Score: <number>'.\n")
    instructions = read_instructions(path)
    assert instructions.global_instruction("a cat").startswith("Judge the layout of 'a cat'")
    assert instructions.version != DEFAULT_INSTRUCTIONS.version
    assert instructions.region_template == DEFAULT_INSTRUCTIONS.region_template
    path.write_text("global_template: 'no prompt field here'\n")
    with pytest.raises(ValueError, match=r"instructions.yaml: .*global_template"):
        read_instructions(path)


def test_score_command_with_the_whole_image_proposer(checkpoint, tmp_path):
    """The CLI passes --max_regions to every proposer; the whole-image one takes it and keeps one region."""
    rollouts = _rollouts(checkpoint, tmp_path)
    out = tmp_path / "scores.jsonl"
    main(["score", "--checkpoint", str(checkpoint), "--rollouts", str(rollouts), "--out", str(out),
          "--proposer", "whole", "--max_regions", "10", "--method", "expected", "--device", "cpu"])
    records = load_records(out, image_dir=rollouts).records
    assert [len(r.regions) for r in records] == [1, 1]
    assert records[0].regions[0].box == (0.0, 0.0, 1.0, 1.0) and records[0].scorer["proposer"] == "WholeImageProposer"


def test_score_command_refuses_a_missing_rollouts_folder(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match=r"nothing: expected a folder written by srum generate \(with records.jsonl\)"):
        main(["score", "--checkpoint", str(checkpoint), "--rollouts", str(tmp_path / "nothing"), "--out",
              str(tmp_path / "scores.jsonl"), "--device", "cpu"])
    assert not (tmp_path / "scores.jsonl").exists()


def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(checkpoint, tmp_path):
    from srum.io.lock import exclusive

    rollouts = _rollouts(checkpoint, tmp_path)
    out = tmp_path / "scores.jsonl"
    command = ["score", "--checkpoint", str(checkpoint), "--rollouts", str(rollouts), "--out", str(out),
               "--proposer", "grid", "--method", "expected", "--device", "cpu"]
    with exclusive(out):  # what a running `srum score` holds
        with pytest.raises(SystemExit, match=r"scores.jsonl: another srum run is writing it"):
            main(command)
        with exclusive(rollouts), pytest.raises(SystemExit, match="another srum run"):  # a running generate
            main(["generate", "--checkpoint", str(checkpoint), "--prompts", str(tmp_path / "prompts.txt"),
                  "--out", str(rollouts), "--steps", "3", "--height", "16", "--width", "24", "--device", "cpu"])
    assert out.read_text() == ""  # nothing was written while the lock was held
    main(command)  # released: the run goes ahead
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize("aggregate", ["product", "mean"])
def test_decomposed_scores_aggregate_each_questions_yes_probability(checkpoint, aggregate):
    """Batched over images, questions and regions, the scores equal one question at a time, in float64."""
    pipeline = Pipeline.from_checkpoint(checkpoint)
    generator = torch.Generator().manual_seed(0)
    images = [(torch.rand(24, 24, 3, generator=generator) * 255).to(torch.uint8) for _ in range(2)]
    prompts = ["a red square left of a blue circle", "two green triangles"]
    decomposer = ShapeWorldDecomposer()
    scorer = SelfScorer(pipeline, GridProposer(1, 2), ScorerConfig(method="expected", readout="questions",
                                                                   aggregate=aggregate), decomposer=decomposer)
    records = scorer.score(images, prompts, ["a.png", "b.png"])

    def yes(image, question):
        (logprobs,) = pipeline.score([from_uint8_image(image)], [question], [["yes", "no"]])
        return torch.softmax(logprobs.double(), 0)[0]

    for image, prompt, record in zip(images, prompts, records, strict=True):
        answers = torch.stack([yes(image, q) for q in decomposer.questions([prompt])[0]])
        joint = answers.prod() if aggregate == "product" else answers.mean()
        assert record.global_scores.expected == pytest.approx(float(2 * joint - 1), abs=1e-5)
        assert record.global_scores.text is None and len(record.answers["questions"].splitlines()) == len(answers)
        frame = pipeline.vit_frame(24, 24)
        for region in record.regions:
            box = [round(c * s) for c, s in zip(region.box, (frame[1], frame[0], frame[1], frame[0]), strict=True)]
            best = max(yes(image, q) for q in decomposer.region_questions(prompt, box, frame[1], frame[0]))
            assert region.scores.expected == pytest.approx(float(2 * best - 1), abs=1e-5)


def test_questions_readout_needs_probabilities_and_a_decomposer(checkpoint):
    with pytest.raises(ValueError, match="method: readout questions"):
        ScorerConfig(method="both", readout="questions")
    with pytest.raises(ValueError, match="decomposer"):
        SelfScorer(Pipeline.from_checkpoint(checkpoint), GridProposer(), ScorerConfig(method="expected",
                                                                                     readout="questions"))


def test_parse_questions_keeps_the_questions_of_a_written_list():
    text = "1. Is there a red cube?\n- Is the cube left of the ball?\nsome words\n2) Is there a red cube?"
    assert parse_questions(text, "p") == ["Is there a red cube?", "Is the cube left of the ball?"]
    assert parse_questions("no questions here", "a red cube") == [whole_prompt_question("a red cube")]


def test_a_model_taught_to_decompose_writes_its_questions(checkpoint):
    pipeline = Pipeline.from_checkpoint(checkpoint)
    prompt = "a red cube left of a blue ball"
    written = "1. Is there a red cube?\n2. Is the cube left of the ball?"
    batch = pack([[Text(pipeline.encode(DEFAULT_INSTRUCTIONS.decompose_instruction(prompt))),
                   Text(pipeline.encode(written), loss=True)]], pipeline.model.config, pipeline.special)
    losses = overfit(pipeline.model, batch, steps=80, lr=3e-3)
    assert losses[-1] < 0.05 * losses[0]
    pipeline.model.eval()
    decomposer = ModelDecomposer(pipeline, DEFAULT_INSTRUCTIONS, max_new_tokens=40)
    assert decomposer.questions([prompt, prompt]) == [["Is there a red cube?", "Is the cube left of the ball?"]] * 2
    assert list(decomposer.cache) == [prompt]


def test_score_refuses_another_checkpoint_other_settings_and_unreadable_lines(checkpoint, tmp_path):
    rollouts = _rollouts(checkpoint, tmp_path)
    out = tmp_path / "scores.jsonl"

    def score(folder, *extra):
        main(["score", "--checkpoint", str(folder), "--rollouts", str(rollouts), "--out", str(out), "--proposer",
              "grid", "--method", "expected", "--device", "cpu", *extra])

    score(checkpoint, "--max_regions", "2")
    (record, _) = load_records(out).records
    assert record.scorer["checkpoint"] == str(checkpoint.resolve()) and record.scorer["max_regions"] == 2
    written = out.read_bytes()
    out.unlink()
    score(checkpoint, "--max_regions", "2")
    assert out.read_bytes() == written  # the settings recorded do not depend on what was written before
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    with pytest.raises(SystemExit, match=r"scores.jsonl: record 1 \(1_0.png\): scorer: expected the settings of "
                                         r"this run, got other checkpoint; use another --out"):
        score(other, "--max_regions", "2")
    with pytest.raises(SystemExit, match="got other max_regions; use another --out"):
        score(checkpoint, "--max_regions", "3")
    out.write_bytes(written + b"not json\n")
    with pytest.raises(SystemExit, match=r"scores.jsonl:3: not valid JSON"):
        score(checkpoint, "--max_regions", "2")
    assert out.read_bytes() == written + b"not json\n"


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_an_image_that_cannot_be_decoded_is_named(checkpoint, tmp_path, damage):
    rollouts = _rollouts(checkpoint, tmp_path)
    image = rollouts / "2_0.png"
    image.write_bytes(image.read_bytes()[:60] if damage == "truncated" else b"not a png")
    with pytest.raises(SystemExit, match=f"srum: error: {image}: expected a readable image file"):
        main(["score", "--checkpoint", str(checkpoint), "--rollouts", str(rollouts), "--out",
              str(tmp_path / "s.jsonl"), "--method", "expected", "--device", "cpu"])


def test_score_also_writes_the_official_training_format(checkpoint, tmp_path):
    rollouts = _rollouts(checkpoint, tmp_path)
    out, official = tmp_path / "scores.jsonl", tmp_path / "official.jsonl"
    main(["score", "--checkpoint", str(checkpoint), "--rollouts", str(rollouts), "--out", str(out), "--proposer",
          "grid", "--method", "expected", "--device", "cpu", "--official_out", str(official)])
    ours, theirs = load_records(out).records, load_records(official).records
    lines = [json.loads(line) for line in official.read_text().splitlines()]
    assert all(line.keys() >= {"bad_image_file", "vlm_rewards"} and "format" not in line for line in lines)
    assert len(ours) == len(theirs) == 2
    for mine, read_back in zip(ours, theirs, strict=True):
        assert read_back.image_file == mine.image_file and (read_back.width, read_back.height) == (24, 16)
        assert read_back.global_scores.text == pytest.approx(mine.global_scores.expected)  # official: one kind
        assert [r.scores.text for r in read_back.regions] == pytest.approx([r.scores.expected for r in mine.regions])
    with pytest.raises(SystemExit, match="--official_out: expected a file other than --out"):
        main(["score", "--checkpoint", str(checkpoint), "--rollouts", str(rollouts), "--out", str(out),
              "--device", "cpu", "--official_out", str(out)])
