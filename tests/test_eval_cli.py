"""``srum validate BENCHMARK`` end to end on tiny models: CompBench images judged by the model itself or by a
transformers VLM, with a baseline and the difference; GenEval images in GenEval's layout; the understanding check;
``compare`` of two reports; every run resumable and every bad input a one-line error naming file and field."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from srum.cli import main
from srum.eval.judging import latest_judgements
from srum.eval.report import read_report
from srum.generation.writer import RECORDS
from tests.eval_helpers import make_checkpoint, make_vlm_judge

TINY_GENERATION = ["--generation.height", "16", "--generation.width", "16", "--generation.sampler.num_timesteps", "3",
                   "--device", "cpu"]
PROMPTS = [{"Question": "a red cube", "Category": "color", "Question_id": 1},
           {"Question": "two cats", "Category": "numeracy", "Question_id": 2},
           {"Question": "a bird left of a dog", "Category": "complex_spatial", "Question_id": 3}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"after": make_checkpoint(root / "after", seed=0), "before": make_checkpoint(root / "before", seed=1),
            "vlm": make_vlm_judge(root / "vlm")}


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "val.json"
    path.write_text(json.dumps(PROMPTS))
    return path


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_compbench_self_judged_with_a_baseline_resumes(models, prompts, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    command = ["validate", "compbench", "--checkpoint", str(models["after"]), "--baseline", str(models["before"]),
               "--out", str(out), "--prompts", str(prompts), "--max_judge_tokens", "3", "--judge_batch_size", "3",
               *TINY_GENERATION]
    main(command)
    printed = capsys.readouterr().out
    assert "t2i-compbench: before (no_think, judge self) ->" in printed and "change" in printed
    for name in ("before", "after"):
        folder = out / name / "compbench-no_think"
        assert sorted(p.name for p in folder.glob("*.png")) == ["1_0.png", "2_0.png", "3_0.png"]
        judgements = latest_judgements(_lines(folder / "judgements-self.jsonl"))
        assert [j["image_file"] for j in judgements] == ["1_0.png", "2_0.png", "3_0.png"]
        report = read_report(out / name / "compbench-no_think-self.json")
        assert report["run"]["checkpoint"] == str(models[name].resolve())
        assert report["run"]["judge"]["judge"] == "unified" and report["details"]["all"]["images"] == 3
        assert list(report["metrics"]) == ["3D spatial", "Color", "Complex", "Non-spatial", "Numeracy", "Shape",
                                           "2D spatial", "Texture", "Overall"]
        failed = sum(j["score"] is None for j in judgements)
        assert report["details"]["all"]["failures"] == failed
        assert all(len(j["failed_answers"]) == 2 for j in judgements if j["score"] is None)  # re-asked twice
    files = {path: path.read_bytes() for path in out.rglob("*.jsonl")}
    with caplog.at_level("INFO"):
        main(command)
    assert {path: path.read_bytes() for path in out.rglob("*.jsonl")} == files
    assert caplog.text.count("0 images to generate (3 already") == 2
    assert caplog.text.count("0 images to judge (3 already") == 2

    fewer = tmp_path / "one.json"  # a smaller prompt file on the same folder reports its own images only
    fewer.write_text(json.dumps(PROMPTS[:1]))
    main([str(fewer) if part == str(prompts) else part for part in command])
    report = read_report(out / "after" / "compbench-no_think-self.json")
    assert report["details"]["all"]["images"] == 1
    assert report["run"]["re_ask"] == {"retries": 2, "temperature": 0.7}


def test_compbench_think_mode_has_its_own_folder_and_a_vlm_judge(models, prompts, tmp_path):
    out = tmp_path / "out"
    main(["validate", "compbench", "--checkpoint", str(models["after"]), "--out", str(out), "--prompts",
          str(prompts), "--generation.think", "true", "--generation.max_think_tokens", "2", "--judge",
          str(models["vlm"]), "--judge_class", "LlavaForConditionalGeneration", "--max_judge_tokens", "3",
          "--judge_batch_size", "2", *TINY_GENERATION])
    folder = out / "after" / "compbench-think"
    assert all(record["settings"]["think"] and "plan" in record for record in _lines(folder / RECORDS))
    judgements = latest_judgements(_lines(folder / "judgements-vlm.jsonl"))
    assert len(judgements) == 3 and judgements[0]["settings"]["class"] == "LlavaForConditionalGeneration"
    report = read_report(out / "after" / "compbench-think-vlm.json")
    assert report["run"]["generation"]["think"] is True and not (out / "after" / "compbench-no_think").exists()


def test_another_srum_checkpoint_judges(models, tmp_path):
    prompts = tmp_path / "one.json"
    prompts.write_text(json.dumps(PROMPTS[:1]))
    main(["validate", "compbench", "--checkpoint", str(models["after"]), "--out", str(tmp_path / "out"), "--prompts",
          str(prompts), "--judge", str(models["before"]), "--max_judge_tokens", "2", "--judge_retries", "0",
          *TINY_GENERATION])
    (judgement,) = _lines(tmp_path / "out" / "after" / "compbench-no_think" / "judgements-before.jsonl")
    assert judgement["settings"]["judge"] == "unified"
    assert judgement["settings"]["checkpoint"] == str(models["before"].resolve())


def test_images_of_another_checkpoint_are_not_mixed_in(models, tmp_path):
    other = make_checkpoint(tmp_path / "elsewhere" / "after", seed=2)  # same folder name, other model
    prompts = tmp_path / "one.json"
    prompts.write_text(json.dumps(PROMPTS[:1]))
    command = ["validate", "compbench", "--out", str(tmp_path / "out"), "--prompts", str(prompts),
               "--max_judge_tokens", "1", *TINY_GENERATION]
    main([*command, "--checkpoint", str(models["after"])])
    with pytest.raises(SystemExit, match=r"records.jsonl: holds images made with other settings \(checkpoint\)"):
        main([*command, "--checkpoint", str(other)])


BAD_PROMPTS = '[{"Question": "a cat", "Question_id": 1}, {"Category": "color", "Question_id": 2}]'


@pytest.mark.parametrize("content, extra, message", [
    (BAD_PROMPTS, [], r"val.json:1: expected an object with a string Question and a Question_id"),
    ("[]", [], r"val.json: no prompts"),
    (None, ["--judge", "missing-judge"], r"missing-judge: judge folder not found \(expected self, a srum"),
    (None, ["--judge", "VLM", "--judge_class", "AutoTokenizer"], r"judge_class: expected the name of a transformers"),
    (None, ["--judge_batch_size", "0"], r"judge_batch_size: expected a positive integer, got 0"),
    (None, ["--generation.images_per_prompt", "0"], r"generation.images_per_prompt: expected a positive integer"),
])
def test_bad_inputs_are_one_line_errors(models, prompts, tmp_path, content, extra, message):
    if content is not None:
        prompts.write_text(content)
    extra = [str(models["vlm"]) if word == "VLM" else word for word in extra]
    with pytest.raises(SystemExit, match=rf"^srum: error: .*{message}") as error:
        main(["validate", "compbench", "--checkpoint", str(models["after"]), "--out", str(tmp_path / "out"),
              "--prompts", str(prompts), *TINY_GENERATION, *extra])
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_an_unknown_benchmark_is_a_one_line_error():
    with pytest.raises(SystemExit, match=r"^srum: error: validate nonsense: expected one of compbench, geneval, "
                                         r"understanding, compare"):
        main(["validate", "nonsense"])


def test_geneval_images_in_genevals_layout(models, shared_dir, tmp_path, caplog):
    metadata = tmp_path / "metadata.jsonl"
    lines = (shared_dir / "data" / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()
    metadata.write_text("\n".join([lines[0], lines[200]]) + "\n")
    command = ["validate", "geneval", "--checkpoint", str(models["after"]), "--out", str(tmp_path / "out"),
               "--metadata", str(metadata), "--generation.images_per_prompt", "2", *TINY_GENERATION]
    main(command)
    folder = tmp_path / "out" / "after" / "geneval-no_think"
    layout = folder / "geneval"
    assert sorted(str(p.relative_to(layout)) for p in layout.rglob("*.*")) == [
        "00000/metadata.jsonl", "00000/samples/00000.png", "00000/samples/00001.png",
        "00001/metadata.jsonl", "00001/samples/00000.png", "00001/samples/00001.png"]
    assert json.loads((layout / "00001" / "metadata.jsonl").read_text()) == json.loads(lines[200])
    assert (layout / "00001" / "samples" / "00001.png").read_bytes() == (folder / "00001_1.png").read_bytes()
    report = read_report(tmp_path / "out" / "after" / "geneval-no_think.json")
    assert report["metrics"]["All"] == {"prompts": 2, "images": 4}
    assert {record["settings"]["cfg_interval"][0] for record in _lines(folder / RECORDS)} == {0.0}
    files = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    with caplog.at_level("INFO"):
        main(command)
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == files
    assert "0 images to generate (4 already" in caplog.text and "0 images newly laid out" in caplog.text


@pytest.fixture()
def questions(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
    entries = [{"image": "0.png", "question": "Is the door open?", "options": ["open", "closed"], "answer": "(a)",
                "pair": "door"},
               {"image": "1.png", "question": "Is the door open?", "options": ["open", "closed"], "answer": "closed",
                "pair": "door", "category": "state"},
               {"image": "2.png", "question": "How many cats?", "options": ["one", "two", "three"], "answer": "c"}]
    path = tmp_path / "mmvp.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path


@pytest.mark.parametrize("method", ["logprob", "decode"])
def test_understanding_before_and_after(models, questions, tmp_path, capsys, method):
    out = tmp_path / "out"
    command = ["validate", "understanding", "--checkpoint", str(models["after"]), "--baseline",
               str(models["before"]), "--questions", str(questions), "--out", str(out), "--method", method,
               "--max_new_tokens", "3", "--batch_size", "2", "--device", "cpu"]
    main(command)
    assert "understanding: before understanding" in capsys.readouterr().out
    predictions = _lines(out / "after" / f"understanding-mmvp-{method}.jsonl")
    assert [p["id"] for p in predictions] == ["1", "2", "3"]
    if method == "logprob":
        assert all(len(p["logprobs"]) == n and p["choice"] is not None for p, n in zip(predictions, (2, 2, 3),
                                                                                        strict=True))
    report = read_report(out / "after" / f"understanding-mmvp-{method}.json")
    correct = sum(p["correct"] for p in predictions)
    assert report["metrics"]["Accuracy"]["accuracy"] == pytest.approx(100 * correct / 3)
    assert report["metrics"]["Pair accuracy"]["pairs"] == 1
    before = (out / "after" / f"understanding-mmvp-{method}.jsonl").read_bytes()
    main(command)
    assert (out / "after" / f"understanding-mmvp-{method}.jsonl").read_bytes() == before


def test_compare_two_report_files(tmp_path, capsys):
    for name, score in (("a", 80.0), ("b", 82.5)):
        (tmp_path / f"{name}.json").write_text(json.dumps({
            "benchmark": "t2i-compbench", "metrics": {"Overall": {"score": score, "official": score - 2}},
            "details": {"all": {"images": 3, "failures": 1 if name == "a" else 0}}}))
    main(["validate", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    printed = capsys.readouterr().out
    assert "+2.50" in printed and "-1" in printed
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"^srum: error: .*c.json: benchmark: expected a report"):
        main(["validate", "compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")])
