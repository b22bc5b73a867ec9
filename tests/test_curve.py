"""ShapeWorld learning curves: the callback in a real (trivial) Lightning fit with the shipped base model,
drawing several arms' curves, and ``srum shapeworld curves``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader

from srum.cli import main
from srum.generation.pipeline import Pipeline
from srum.model.checkpoint import checkpoint_folder
from srum.shapeworld.benchmark import shapeworld_sampler
from srum.shapeworld.curve import LearningCurve, plot_curves
from srum.shapeworld.evaluate import evaluate_generation
from srum.shapeworld.world import prompts

PROMPTS = 8


@pytest.fixture(scope="module")
def base() -> Pipeline:
    return Pipeline.from_checkpoint(checkpoint_folder("srum:shapeworld-base"))


class Still(L.LightningModule):
    """Holds the base model as the training module does (``.model``, ``.pipeline``) and takes optimizer steps
    that change nothing, so the trainer's step advances while the model stays the base."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model, self.pipeline = pipeline.model, pipeline
        self.model.train()  # as the training module leaves it (the pipeline put it in eval mode)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.modes_in_steps: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.modes_in_steps.append(self.model.training)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        optimizer.step()  # no gradients: a step that leaves every parameter as it was

    def configure_optimizers(self):
        return torch.optim.SGD([self.anchor], lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.zeros(16, 1), batch_size=1)


def test_learning_curve_in_a_fit_measures_steps_0_2_3_and_restores_the_model(base, tmp_path):
    module = Still(base)
    modes_in_measurement: set[bool] = set()
    hooks = [m.register_forward_pre_hook(lambda m, _: modes_in_measurement.add(m.training))
             for m in base.model.modules()]
    curve = LearningCurve(every_n_steps=2, prompts=PROMPTS)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, callbacks=[curve], logger=CSVLogger(tmp_path),
                        default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    try:
        trainer.fit(module)
    finally:
        for hook in hooks:
            hook.remove()

    assert [p["step"] for p in curve.points] == [0, 2, 3]
    assert list(curve.table().columns[0].cells) == ["0", "2", "3"]  # the table printed at the end of the fit
    assert modes_in_measurement == {False}  # measured in eval mode ...
    assert module.modes_in_steps == [True, True, True]  # ... and trained in train mode between measurements
    assert base.model.training  # the mode it had when the fit ended

    independent = evaluate_generation(base, prompts("val", PROMPTS, 0), shapeworld_sampler(), seed=0, batch_size=100)
    pass_rate = sum(v.passed for v in independent.verdicts) / PROMPTS
    for point in curve.points:  # the model did not change, and the seeds are paired: every point is the same
        assert point["pass_rate"] == pass_rate
        assert point["overall"] == independent.report["overall"]
        assert point["categories"] == {n: c["score"] for n, c in independent.report["categories"].items()}

    written = json.loads((tmp_path / "report" / "curve.json").read_text())
    assert {k: written[k] for k in ("split", "prompts", "seed")} == {"split": "val", "prompts": PROMPTS, "seed": 0}
    assert written["points"] == curve.points
    with Image.open(tmp_path / "report" / "curve.png") as image:
        assert image.format == "PNG" and image.width > 100
    assert not list((tmp_path / "report").glob(".*.tmp"))

    metrics = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    logged = {int(row["step"]): float(row["val_curve/pass_rate"]) for row in metrics if row["val_curve/pass_rate"]}
    assert logged == {0: pass_rate, 2: pass_rate, 3: pass_rate}

    resumed = LearningCurve(every_n_steps=2, prompts=PROMPTS)
    resumed.load_state_dict(curve.state_dict())
    assert resumed.points == curve.points
    with pytest.raises(ValueError, match="seed"):
        LearningCurve(every_n_steps=2, prompts=PROMPTS, seed=1).load_state_dict(curve.state_dict())


def _trainer(tmp_path: Path, curve: LearningCurve, max_steps: int) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, callbacks=[curve], logger=False,
                     default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)


def test_a_resumed_fit_continues_its_curve(base, tmp_path):
    first = _trainer(tmp_path, LearningCurve(every_n_steps=2, prompts=2), max_steps=2)
    first.fit(Still(base))
    first.save_checkpoint(tmp_path / "step2.ckpt")

    curve = LearningCurve(every_n_steps=2, prompts=2)
    _trainer(tmp_path, curve, max_steps=3).fit(Still(base), ckpt_path=tmp_path / "step2.ckpt")
    assert [p["step"] for p in curve.points] == [0, 2, 3]  # 0 and 2 from the checkpoint, 3 measured now
    written = json.loads((tmp_path / "report" / "curve.json").read_text())
    assert [p["step"] for p in written["points"]] == [0, 2, 3]


@pytest.mark.parametrize(("field", "arguments"), [("every_n_steps", {"every_n_steps": 0}),
                                                  ("prompts", {"prompts": 0}), ("split", {"split": "dev"})])
def test_learning_curve_settings_are_checked(field, arguments):
    with pytest.raises(ValueError, match=field):
        LearningCurve(**arguments)


def _curve(steps: list[int], level: float, seed: int = 0) -> dict:
    return {"split": "val", "prompts": 8, "seed": seed,
            "points": [{"step": s, "pass_rate": level + 0.01 * s, "overall": 100 * level + s,
                        "categories": {"binding": 50.0}} for s in steps]}


def test_plot_curves_draws_arms_on_the_steps_all_their_seeds_share(tmp_path):
    arms = {"srum": [_curve([0, 10, 20, 30], 0.2), _curve([0, 10, 30], 0.25, seed=1)],
            "uniform": [_curve([0, 10, 20, 30], 0.1), _curve([0, 10, 20, 30], 0.15, seed=1)]}
    drawn = plot_curves(arms, tmp_path / "figures" / "study.png")
    assert drawn == {"srum": [0, 10, 30], "uniform": [0, 10, 20, 30]}
    with Image.open(tmp_path / "figures" / "study.png") as image:
        assert image.format == "PNG"
    with pytest.raises(ValueError, match="arms.srum: its curves have no step in common"):
        plot_curves({"srum": [_curve([0], 0.2), _curve([5], 0.2)]}, tmp_path / "none.png")
    with pytest.raises(ValueError, match="arms.empty"):
        plot_curves({"empty": []}, tmp_path / "none.png")


def test_curves_command_writes_the_figure_and_names_bad_files(tmp_path, capsys):
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"s{seed}" / "curve.json"
        path.parent.mkdir()
        path.write_text(json.dumps(_curve([0, 5, 10], 0.2 + 0.05 * seed, seed)))
        paths.append(str(path))
    out = tmp_path / "curves.png"
    main(["shapeworld", "curves", "--arms", json.dumps({"srum": paths, "base": paths[:1]}), "--out", str(out)])
    with Image.open(out) as image:
        assert image.format == "PNG"

    missing = tmp_path / "missing" / "curve.json"
    with pytest.raises(SystemExit, match=f"srum: error: {missing}: cannot read the curve"):
        main(["shapeworld", "curves", "--arms", json.dumps({"srum": [str(missing)]}), "--out", str(out)])
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"models": {}}))
    with pytest.raises(SystemExit, match=f"srum: error: {report}: field 'points' missing"):
        main(["shapeworld", "curves", "--arms", json.dumps({"srum": [str(report)]}), "--out", str(out)])
