"""ShapeWorld's main job: prompts by name, the oracle judge, the report, the shipped base checkpoint, and a
shortened ``srum fit`` / ``srum validate --config configs/shapes.yaml`` end to end."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from srum.cli import main
from srum.generation.prompts import read_prompts
from srum.model.checkpoint import CheckpointError, checkpoint_folder, load_checkpoint
from srum.shapeworld.benchmark import BenchmarkConfig, settings_of
from srum.shapeworld.callback import MEASURED, base_summary_name
from srum.shapeworld.oracle import CheckerScorer
from srum.shapeworld.report import check_finite, markdown_table, rows
from srum.shapeworld.tasks import perturb
from srum.shapeworld.world import parse_spec, prompts, render, scene_for

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_prompt_texts_parse_back_to_their_specs(split):
    for prompt in prompts(split, 500, seed=4):
        spec = parse_spec(prompt.text)
        assert (spec.things, spec.relation, spec.text()) == (prompt.spec.things, prompt.spec.relation, prompt.text)


@pytest.mark.parametrize("text", ["a red blob", "two", "a red square near a blue circle", "five red squares", ""])
def test_unparseable_prompts_are_named(text):
    with pytest.raises(ValueError, match="expected noun phrases"):
        parse_spec(text)


def test_shapeworld_prompts_by_name():
    drawn = read_prompts("shapeworld:test:12:3")
    assert [p.text for p in drawn] == [p.text for p in prompts("test", 12, seed=3)]
    assert {p.category for p in drawn} == {"binding", "spatial", "numeracy", "complex"}
    for bad in ("shapeworld:dev:3", "shapeworld:test", "shapeworld:test:0", "shapeworld:test:x"):
        with pytest.raises(ValueError, match="expected shapeworld:<train|val|test>:<count>"):
            read_prompts(bad)


def test_the_checker_judge_rewards_right_objects_and_penalises_wrong_ones():
    rng = random.Random(2)
    for prompt in prompts("test", 40, seed=5):
        scene = scene_for(prompt.spec, rng)
        wrong, _ = perturb(scene, prompt.spec, rng)
        clean_record, wrong_record = CheckerScorer().score([render(scene), render(wrong)], [prompt.text] * 2,
                                                           ["clean.png", "wrong.png"])
        assert clean_record.global_scores.expected == 1.0
        assert len(clean_record.regions) == len(scene.objects)
        assert all(r.scores.expected == 1.0 for r in clean_record.regions)
        assert wrong_record.global_scores.expected == -1.0  # anything wrong fails, as the judge was taught
        assert wrong_record.answers["reasons"]


def test_a_run_from_the_shipped_base_exports_a_complete_folder(tmp_path):
    from srum.train.export import export_checkpoint

    state = load_checkpoint("srum:shapeworld-base").model.state_dict()
    ckpt = tmp_path / "run.ckpt"  # what a run started from the shipped base records
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()},
                "srum": {"checkpoint": "srum:shapeworld-base"}}, ckpt)
    out = export_checkpoint(ckpt, tmp_path / "exported", dtype=torch.float32, name="model")
    exported = load_checkpoint(out)
    assert exported.config == load_checkpoint("srum:shapeworld-base").config
    assert all(torch.equal(v, state[k]) for k, v in exported.model.state_dict().items())
    assert (out / "tokenizer.json").is_file()


def test_the_benchmark_refuses_a_run_without_a_scorer():
    from srum.shapeworld.callback import ShapeWorldBenchmark

    offline = SimpleNamespace(scorer=None)  # what an offline SRUMModule holds
    with pytest.raises(ValueError, match="needs model.mode online"):
        ShapeWorldBenchmark().on_fit_start(None, offline)


def test_report_tables_and_finiteness():
    summary = {"categories": {"binding": {"score": 40.0}, "spatial": {"score": 10.0}}, "overall": 25.0,
               "pass_rate": 0.2, "pass_rate_by_combination": {"seen": 0.25, "unseen": 0.05},
               "judge": {"balanced_accuracy": 0.9, "clean_accepted": 0.95,
                         "wrong_rejected_by_kind": {"colour": 0.25, "extra": 1.0}},
               "agreement_with_checker": 0.8}
    summary["readouts"] = {"questions": {"judge": summary["judge"], "agreement_with_checker": 0.8},
                           "instruction": {"judge": {**summary["judge"], "balanced_accuracy": 0.6},
                                           "agreement_with_checker": 0.5}}
    after = {**summary, "overall": 31.5}
    table = markdown_table({"base": summary, "srum": after})
    assert "| overall | 25.0 | 31.5 | +6.5 |" in table and "srum - base" in table
    assert "| judge rejects colour % | 25.0 | 25.0 | +0.0 |" in table and "| judge rejects extra % |" in table
    assert "| judge by instruction: balanced acc. % | 60.0 | 60.0 | +0.0 |" in table
    assert "| judge by instruction: agreement % | 50.0 | 50.0 | +0.0 |" in table
    with pytest.raises(ValueError, match=r"report.models.srum.overall: expected a finite number"):
        check_finite({"models": {"srum": {**after, "overall": math.nan}}})


def test_the_shipped_base_checkpoint_has_the_official_layout():
    folder = checkpoint_folder("srum:shapeworld-base")
    names = {path.name for path in folder.iterdir()}
    assert {"llm_config.json", "vit_config.json", "ema.safetensors", "srum_config.json", "tokenizer.json"} <= names
    assert sum(path.stat().st_size for path in folder.iterdir()) <= 25 * 2**20
    checkpoint = load_checkpoint("srum:shapeworld-base")
    assert checkpoint.config.prediction == "clean" and checkpoint.config.latent_downsample == 12
    with pytest.raises(CheckpointError, match="srum:nothing: no such shipped checkpoint"):
        checkpoint_folder("srum:nothing")


@pytest.mark.parametrize("overlay", sorted((REPO / "configs" / "shapes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_arm_and_ablation_overlays_the_main_job(overlay, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / "configs" / "shapes.yaml"), "--config", str(overlay), "--print_config"])
    assert done.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    changed = yaml.safe_load(overlay.read_text()).get("model", {})  # the pilot overlay changes callbacks only

    def contains(tree, part):
        return all(contains(tree[k], v) if isinstance(v, dict) else tree[k] == v for k, v in part.items())

    assert contains(printed["model"], changed)


def _shortened_config(tmp_path: Path, **changes) -> Path:
    config = yaml.safe_load((REPO / "configs" / "shapes.yaml").read_text())
    config["trainer"].update(max_steps=2, default_root_dir=str(tmp_path / "run"), enable_progress_bar=False)
    callback = config["trainer"]["callbacks"][0]["init_args"]
    callback.update(grid_prompts=3, base_cache=str(tmp_path / "cache"))  # reports under default_root_dir
    callback["benchmark"].update(prompts=8, judge_renders=8, batch_size=8)
    config["trainer"]["callbacks"][1]["init_args"].update(prompts=8)  # the validation curve
    config["model"]["rollout"]["sampler"]["num_timesteps"] = 4
    config["data"].update(batch_size=4, val_prompts="shapeworld:val:2")
    for key, value in changes.items():
        config["model"][key] = value
    path = tmp_path / "shapes.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _assert_report(folder: Path, models: list[str]) -> dict:
    report = json.loads((folder / "report.json").read_text())
    assert list(report["models"]) == models
    for summary in report["models"].values():
        assert set(summary["categories"]) == {"binding", "spatial", "numeracy", "complex"}
        assert summary["settings"]["prompts"] == 8 and 0 <= summary["pass_rate"] <= 1
        assert 0 <= summary["judge"]["balanced_accuracy"] <= 1
        assert set(summary["judge"]["wrong_rejected_by_kind"]) <= {"colour", "shape", "extra", "remove", "swap"}
    check_finite(report)
    assert (folder / "grid.png").stat().st_size > 0
    assert "| overall |" in (folder / "report.md").read_text()
    return report


@pytest.mark.slow
def test_shortened_main_job_reports_base_and_srum(tmp_path, capsys):
    main(["fit", "--config", str(_shortened_config(tmp_path))])
    report = _assert_report(tmp_path / "run" / "report", ["base", "srum"])
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1  # the base measurement, kept for the next run
    assert set(report["difference"]) >= {"overall", "pass rate %", "judge balanced acc. %"}
    assert "ShapeWorld" in capsys.readouterr().out  # the rich table

    main(["validate", "--config", str(_shortened_config(tmp_path)), "--model.checkpoint", "srum:shapeworld-base"])
    base = report["models"]["base"]
    again = _assert_report(tmp_path / "run" / "report-validate", ["model"])["models"]["model"]
    assert _assert_report(tmp_path / "run" / "report", ["base", "srum"]) == report  # the fit's report stays
    assert again["overall"] == pytest.approx(base["overall"])  # paired seeds: the same images, the same numbers
    torch.testing.assert_close(torch.tensor(again["judge"]["balanced_accuracy"]),
                               torch.tensor(base["judge"]["balanced_accuracy"]))


@pytest.mark.slow
def test_oracle_arm_trains_on_checker_rewards_and_a_second_run_reuses_the_base(tmp_path):
    config = _shortened_config(tmp_path, scoring={"judge": "checker"})
    main(["fit", "--config", str(config)])
    first = _assert_report(tmp_path / "run" / "report", ["base", "srum"])
    cached = list((tmp_path / "cache").iterdir())
    main(["fit", "--config", str(config), "--model.seed", "1"])
    second = _assert_report(tmp_path / "run" / "report", ["base", "srum"])
    assert second["models"]["base"] == first["models"]["base"]
    assert sorted((tmp_path / "cache").iterdir()) == sorted(cached)


@pytest.mark.slow
def test_a_base_summary_in_the_checkpoints_measured_folder_is_used_not_measured_again(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(checkpoint_folder("srum:shapeworld-base"), base, ignore=shutil.ignore_patterns(MEASURED))
    config = _shortened_config(tmp_path, scoring={"judge": "checker"}, checkpoint=str(base))
    main(["fit", "--config", str(config)])
    first = _assert_report(tmp_path / "run" / "report", ["base", "srum"])
    (measured,) = (tmp_path / "cache").iterdir()
    (base / MEASURED).mkdir()
    measured.rename(base / MEASURED / measured.name)
    main(["fit", "--config", str(config), "--model.seed", "1"])
    second = _assert_report(tmp_path / "run" / "report", ["base", "srum"])
    assert second["models"]["base"] == first["models"]["base"]
    assert not list((tmp_path / "cache").iterdir())  # nothing measured, so nothing written


def test_the_shipped_base_carries_the_summary_of_the_main_jobs_benchmark():
    """A fresh clone's main job starts from this summary; it must be re-measured whenever the base's weights or
    the main job's benchmark settings change."""
    config = yaml.safe_load((REPO / "configs" / "shapes.yaml").read_text())
    benchmark = BenchmarkConfig(**config["trainer"]["callbacks"][0]["init_args"]["benchmark"])
    name = base_summary_name("srum:shapeworld-base", benchmark)
    summary = json.loads((checkpoint_folder("srum:shapeworld-base") / MEASURED / name).read_text())
    assert summary["settings"] == json.loads(json.dumps(settings_of(benchmark)))
    assert summary["categories"].keys() == {"binding", "spatial", "numeracy", "complex"}


def test_summarize_gives_mean_and_spread_over_runs(tmp_path, capsys):
    summary = {"categories": {"binding": {"score": 40.0}}, "overall": 25.0, "pass_rate": 0.2,
               "pass_rate_by_combination": {"seen": 0.25, "unseen": 0.05},
               "judge": {"balanced_accuracy": 0.9, "clean_accepted": 0.9, "wrong_rejected_by_kind": {"swap": 0.0}},
               "agreement_with_checker": 0.8}
    paths = []
    for seed, gain in enumerate((4.0, 6.0)):
        tuned = {**summary, "overall": 25.0 + gain}
        report = {"models": {"base": summary, "srum": tuned},
                  "difference": {name: values[-1] - values[0] for name, values in rows({"b": summary, "s": tuned})}}
        paths.append(tmp_path / f"seed{seed}.json")
        paths[-1].write_text(json.dumps(report))
    main(["shapeworld", "summarize", "--arms", json.dumps({"srum": [str(p) for p in paths]})])
    assert "+5.0 +- 1.4" in capsys.readouterr().out
    arms = {"srum": [str(p) for p in paths], "ceiling": [str(paths[1])] * 2}  # ceiling gains 6.0 twice
    main(["shapeworld", "summarize", "--arms", json.dumps(arms), "--ceiling", "ceiling", "--paired_with", "ceiling"])
    printed = capsys.readouterr().out
    assert "83 %" in printed  # overall: 5.0 / 6.0 of the ceiling's gain
    assert "-1.0 +- 1.4" in printed  # (4 - 6, 6 - 6) paired by position
    with pytest.raises(SystemExit, match=r"nothing: expected the name of an arm"):
        main(["shapeworld", "summarize", "--arms", json.dumps(arms), "--ceiling", "nothing"])
    (tmp_path / "bad.json").write_text(json.dumps({"models": {}}))
    with pytest.raises(SystemExit, match=r"bad.json: field 'difference' missing"):
        main(["shapeworld", "summarize", "--arms", json.dumps({"srum": [str(tmp_path / "bad.json")]})])
    with pytest.raises(SystemExit, match=r"arms.uniform: expected at least one report file"):
        main(["shapeworld", "summarize", "--arms", json.dumps({"srum": [str(paths[0])], "uniform": []})])


def test_grid_captions_show_the_checkers_verdict_the_self_score_and_the_prompt():
    from srum.shapeworld.callback import grid_caption
    from srum.shapeworld.world import Obj, Scene, render

    prompt = "two red squares left of a green circle"
    drawn = render(Scene((Obj("red", "square", (0, 0)), Obj("red", "square", (1, 0)), Obj("green", "circle", (0, 2)))))
    assert grid_caption(drawn, prompt, 0.25) == "PASS self=+0.25\ntwo red squares left of\na green circle"
    assert grid_caption(drawn, "a red square", None).startswith("fail self=-\n")
