"""The training system on a tiny checkpoint on the CPU: the recipe config runs, reward maps reach the loss,
non-finite steps are skipped, a killed run resumes exactly, FSDP2 on 2 ranks equals one process, export loads."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file, save_file

from srum.cli import main
from srum.generation.prompts import read_prompts
from srum.generation.sampler import SamplerConfig
from srum.model.checkpoint import load_checkpoint
from srum.objectives import Candidates
from srum.train.callbacks import RewardGridCallback
from srum.train.data import ScheduledBatches, SRUMDataModule
from srum.train.module import OptimConfig, RolloutConfig, SRUMModule
from tests.train_helpers import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                  "--model.rollout.height", "16", "--model.rollout.width", "24",
                  "--model.rollout.sampler.num_timesteps", "3", "--model.optim.warmup_steps", "1",
                  "--model.activation_checkpointing", "false", "--trainer.callbacks",
                  "lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1",
                  "--trainer.callbacks.save_top_k", "-1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("train")
    tiny_checkpoint(folder / "ckpt")
    prompts = folder / "prompts.txt"
    prompts.write_text("a red cube left of a blue ball\ntwo green circles\na yellow square\nthree blue triangles\n")
    return {"checkpoint": folder / "ckpt", "prompts": prompts, "root": folder}


def _fit_args(tiny, root: Path, steps: int, *extra: str, devices: int = 1, batch_size: int = 2) -> list[str]:
    strategy = (["--trainer.strategy", "auto"] if devices == 1 else
                ["--trainer.strategy.init_args.data_parallel_size", str(devices)])
    return ["fit", "--config", str(REPO / "configs" / "compbench.yaml"), *TINY_OVERRIDES,
            "--trainer.devices", str(devices), *strategy, "--trainer.max_steps", str(steps),
            "--trainer.default_root_dir", str(root), "--model.checkpoint", str(tiny["checkpoint"]),
            "--data.prompts", str(tiny["prompts"]), "--data.batch_size", str(batch_size), *extra]


def _metrics(root: Path) -> dict[int, dict[str, float]]:
    """step -> metrics of the last version folder's metrics.csv (a resumed run writes a new version)."""
    rows: dict[int, dict[str, float]] = {}
    for path in sorted(root.glob("lightning_logs/version_*/metrics.csv")):
        with path.open() as file:
            for row in csv.DictReader(file):
                values = {k: float(v) for k, v in row.items() if v not in ("", None)}
                rows.setdefault(int(values["step"]), {}).update(values)
    return rows


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'src'}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "srum", *args], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=600)


def test_compbench_config_prints_and_runs_two_tiny_steps(tiny, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / "configs" / "compbench.yaml"), "--print_config"])
    assert done.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "ShardedCheckpointStrategy" in printed and "constraint_weight: 0.5" in printed and "lr: 2.0e-05" in printed

    root = tiny["root"] / "two-steps"
    main(_fit_args(tiny, root, 2))
    metrics = _metrics(root)
    assert sorted(metrics) == [0, 1]
    for step in metrics.values():
        for name in ("train/loss", "train/reward_term", "train/constraint_term", "train/reward_mean",
                     "time/rollout_share", "time/scoring_share", "time/update_share", "train/images_per_second",
                     "train/dropped_regions", "train/clamped_scores"):
            assert math.isfinite(step[name]), name
    assert metrics[1]["train/loss"] != metrics[0]["train/loss"]


def test_a_run_that_can_no_longer_train_stops_with_a_clear_error(tiny, tmp_path, monkeypatch):
    module = SRUMModule(tiny["checkpoint"], rollout=RolloutConfig(height=16, width=24,
                                                                  sampler=SamplerConfig(num_timesteps=3)),
                        optim=OptimConfig(warmup_steps=1), max_skips_in_a_row=3)
    original = module.objective.step

    def always_nan(policy, samples, update, backward):
        loss, terms = original(policy, samples, update, backward)
        return loss * float("nan"), terms

    monkeypatch.setattr(module.objective, "step", always_nan)
    trainer = L.Trainer(max_steps=100, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="max_skips_in_a_row: 3 steps in a row had a non-finite loss"):
        trainer.fit(module, SRUMDataModule(prompts=tiny["prompts"], batch_size=2))
    assert module.skipped_steps == 3 and trainer.global_step == 0


def test_non_finite_weights_are_refused_at_load_with_the_tensor_named(tiny, tmp_path):
    from srum.model.checkpoint import CheckpointError

    folder = tmp_path / "nan"
    main(["model", "init", "--preset", "tiny", "--out", str(folder), "--seed", "0"])
    weights = load_file(folder / "ema.safetensors")
    weights["llm2vae.bias"][0] = float("nan")
    save_file(weights, folder / "ema.safetensors")
    with pytest.raises(CheckpointError, match=r"ema.safetensors: llm2vae.bias: expected finite weights"):
        load_checkpoint(folder)


def test_reward_maps_reach_the_loss(tiny):
    module = SRUMModule(tiny["checkpoint"], text_dropout=0.0)
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(12, 4, 6, generator=generator) for _ in range(2)]
    maps = [torch.rand(2, 3, generator=generator).requires_grad_(True) for _ in range(2)]
    module.objective.step(module.policy(0), Candidates(["a red cube", "a blue ball"], latents, maps, []), 0,
                          lambda loss: loss.backward())
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in maps)
    assert module.model.llm2vae.weight.grad.abs().sum() > 0


def test_non_finite_steps_are_skipped_and_training_goes_on(tiny, tmp_path, monkeypatch):
    module = SRUMModule(tiny["checkpoint"], rollout=RolloutConfig(height=16, width=24,
                                                                  sampler=SamplerConfig(num_timesteps=3)),
                        optim=OptimConfig(warmup_steps=1))
    original = module.objective.step
    calls = []

    def first_call_nan(policy, samples, update, backward):
        loss, terms = original(policy, samples, update, backward)
        calls.append(update)
        return (loss * float("nan"), terms) if len(calls) == 1 else (loss, terms)

    monkeypatch.setattr(module.objective, "step", first_call_nan)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", default_root_dir=tmp_path, log_every_n_steps=1,
                        logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, callbacks=[RewardGridCallback(every_n_steps=1)])
    trainer.fit(module, SRUMDataModule(prompts=tiny["prompts"], batch_size=2))
    assert module.skipped_steps == 1 and len(calls) == 3 and trainer.global_step == 2
    with (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open() as file:
        logged = [row for row in csv.DictReader(file) if row["train/loss"]]
    assert [math.isfinite(float(row["train/loss"])) for row in logged] == [False, True, True]
    assert math.isnan(float(logged[0]["train/grad_norm"]))  # the skipped update's own, not the one before
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    grids = sorted(path.name for path in tmp_path.glob("**/grids/*.png"))  # one per batch, by optimizer step
    assert grids == ["step_0000000.png", "step_0000001.png", "step_0000002.png"]


def test_scheduled_batches_split_the_global_batch_over_ranks():
    items = list(range(10))
    single = ScheduledBatches(items, batch_size=4, seed=3)
    ranks = [ScheduledBatches(items, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for index in range(5):
        assert single.batch(index) == ranks[0].batch(index) + ranks[1].batch(index)
    assert len({tuple(single.batch(0)), tuple(single.batch(2))}) == 2  # epochs reshuffle
    with pytest.raises(ValueError, match="at least batch_size x world_size"):
        ScheduledBatches(items[:3], batch_size=2, seed=0, world_size=2)


@pytest.mark.slow
def test_killed_run_resumes_exactly(tiny):
    uninterrupted, killed = tiny["root"] / "whole", tiny["root"] / "killed"
    first_run = _run(_fit_args(tiny, uninterrupted, 4))
    assert first_run.returncode == 0
    printed = first_run.stdout + first_run.stderr  # every line once, no warnings about what srum does on purpose
    assert printed.count("Trainable params") == 1 and "module(s) in eval mode" not in printed, printed[-2000:]
    assert not any(noise in printed for noise in ("Tip:", "litlogger", "GPU available", "Seed set to"))
    result = _run(_fit_args(tiny, killed, 4, "--trainer.callbacks+=tests.train_helpers.KillAtStep",
                            "--trainer.callbacks.step=2"))
    assert result.returncode == -9, result.stderr[-2000:]  # SIGKILL
    checkpoint = next((killed / "lightning_logs" / "version_0" / "checkpoints").glob("*step=2.ckpt"))
    resumed = _run(_fit_args(tiny, killed, 4, "--ckpt_path", str(checkpoint)))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole, again = _metrics(uninterrupted), _metrics(killed)
    for step in (2, 3):
        assert again[step]["train/loss"] == pytest.approx(whole[step]["train/loss"], rel=1e-6, abs=1e-7)
    final = [next((root / "lightning_logs").glob(f"version_{v}/checkpoints/*step=4.ckpt"))
             for root, v in ((uninterrupted, 0), (killed, 1))]
    first, second = (torch.load(path, weights_only=True)["state_dict"] for path in final)
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fsdp2_on_two_ranks_equals_one_process_then_saves_resumes_and_exports(tiny):
    one, two = tiny["root"] / "one-process", tiny["root"] / "two-ranks"
    assert _run(_fit_args(tiny, one, 3, batch_size=2)).returncode == 0
    result = _run(_fit_args(tiny, two, 3, devices=2, batch_size=1))
    assert result.returncode == 0, result.stderr[-3000:]
    single, sharded = _metrics(one), _metrics(two)
    for step in range(3):
        assert sharded[step]["train/loss"] == pytest.approx(single[step]["train/loss"], rel=1e-5)

    sharded_step2 = next((two / "lightning_logs" / "version_0" / "checkpoints").glob("*step=2.ckpt"))
    assert sharded_step2.is_dir()  # a distributed checkpoint: one shard file per rank
    resumed = _run(_fit_args(tiny, two, 3, "--ckpt_path", str(sharded_step2), devices=2, batch_size=1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _metrics(two)[2]["train/loss"] == pytest.approx(single[2]["train/loss"], rel=1e-5)

    outputs = []
    for root, version in ((one, 0), (two, 0)):
        checkpoint = next((root / "lightning_logs" / f"version_{version}" / "checkpoints").glob("*step=3.ckpt"))
        out = root / "exported"
        main(["export", "--ckpt", str(checkpoint), "--out", str(out), "--dtype", "float32"])
        outputs.append(load_checkpoint(out).model.state_dict())
    for name, tensor in outputs[0].items():
        torch.testing.assert_close(outputs[1][name], tensor, rtol=0, atol=1e-5, msg=name)
    assert (tiny["root"] / "one-process" / "exported" / "tokenizer.json").is_file()


def test_export_round_trip(tiny, tmp_path):
    root = tmp_path / "run"
    main(_fit_args(tiny, root, 2, "--model.ema_decay", "0.5"))  # step 0 runs at lr 0 (warm-up): take two
    checkpoint = next((root / "lightning_logs" / "version_0" / "checkpoints").glob("*step=2.ckpt"))
    trained = torch.load(checkpoint, weights_only=True)["state_dict"]
    main(["export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "model"), "--dtype", "float32"])
    loaded = load_checkpoint(tmp_path / "model").model.state_dict()
    for name, tensor in loaded.items():
        assert torch.equal(tensor, trained[f"model.{name}"].float()), name
    main(["export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "ema"), "--weights", "ema", "--dtype",
          "float32"])
    averaged = load_checkpoint(tmp_path / "ema").model.state_dict()
    name = "language_model.model.layers.0.mlp_moe_gen.up_proj.weight"
    assert torch.equal(averaged[name], trained[f"ema.{name.replace('.', '/')}"])
    assert not torch.equal(averaged[name], loaded[name])
    with pytest.raises(SystemExit, match="no such checkpoint"):
        main(["export", "--ckpt", str(tmp_path / "absent.ckpt"), "--out", str(tmp_path / "x")])
    assert read_prompts(tiny["prompts"])  # the fixture's prompt file stays valid


def test_offline_fit_on_generated_and_scored_records(tiny, tmp_path):
    rollouts, records = tmp_path / "gen", tmp_path / "rewards.jsonl"
    main(["generate", "--checkpoint", str(tiny["checkpoint"]), "--prompts", str(tiny["prompts"]), "--out",
          str(rollouts), "--steps", "3", "--height", "16", "--width", "24", "--device", "cpu"])
    main(["score", "--checkpoint", str(tiny["checkpoint"]), "--rollouts", str(rollouts), "--out", str(records),
          "--proposer", "grid", "--method", "expected", "--device", "cpu"])
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    lines[0]["regions"][0]["scores"]["expected"] = 1.5  # clamped to 1 and counted
    lines[1]["regions"].append({"box": [0.9, 0.9, 0.1, 0.1], "object": "x", "scores": {"expected": 0.5}})  # dropped
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))
    root = tmp_path / "run"
    offline = ["--model.mode", "offline", "--model.trainable", "generation", "--model.scoring.score_kind",
               "expected", "--data.records", str(records), "--data.image_dir", str(rollouts), "--data.prompts", "null"]
    main(_fit_args(tiny, root, 2, *offline))
    metrics = _metrics(root)
    assert sorted(metrics) == [0, 1] and all(math.isfinite(m["train/loss"]) for m in metrics.values())
    assert metrics[0]["train/regions_per_image"] == 4  # the grid proposer's 2 x 2 regions reached the step
    for name in ("train/clamped_scores", "train/dropped_regions"):  # each of the 4 records is seen once in 2 steps
        assert sum(m[name] for m in metrics.values()) == 1, name
    checkpoint = next((root / "lightning_logs" / "version_0" / "checkpoints").glob("*step=2.ckpt"))
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    start = load_checkpoint(tiny["checkpoint"]).model.state_dict()
    und = "language_model.model.layers.0.mlp.up_proj.weight"
    gen = "language_model.model.layers.0.mlp_moe_gen.up_proj.weight"
    assert torch.equal(state[f"model.{und}"], start[und])  # generation expert only
    assert not torch.equal(state[f"model.{gen}"], start[gen])

    # bad offline input through the command line: one line naming the file and what was expected
    image = rollouts / lines[2]["image_file"]
    image.write_bytes(image.read_bytes()[:50])
    with pytest.raises(SystemExit, match=f"srum: error: {image}: expected a readable image file"):
        main(_fit_args(tiny, tmp_path / "torn-image", 2, *offline))
    lines[0]["width"] = float("inf")
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(SystemExit, match=f"srum: error: {records}:1: width: expected a positive integer, got inf"):
        main(_fit_args(tiny, tmp_path / "infinite-width", 2, *offline))
    official = {"bad_image_file": lines[1]["image_file"], "good_image_file": lines[1]["image_file"], "prompt": "p",
                "vlm_rewards": [{"object": "global_layout_reward", "bbox": [0, 0, 23.5, 16], "score": 0.5}]}
    records.write_text(json.dumps(official) + "\n")
    with pytest.raises(SystemExit, match=f"srum: error: {records}:1: vlm_rewards.0..bbox: .*whole pixel sizes"):
        main(_fit_args(tiny, tmp_path / "fractional-frame", 2, *offline))


def test_lora_trains_adapters_only_and_export_merges_them(tiny, tmp_path):
    root = tmp_path / "run"
    main(_fit_args(tiny, root, 2, "--model.lora", '{"rank": 4, "alpha": 8.0}', "--model.trainable", "generation"))
    checkpoint = next((root / "lightning_logs" / "version_0" / "checkpoints").glob("*step=2.ckpt"))
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    start = load_checkpoint(tiny["checkpoint"]).model.state_dict()
    layer = "language_model.model.layers.0.self_attn.q_proj_moe_gen"
    assert torch.equal(state[f"model.{layer}.base_layer.weight"], start[f"{layer}.weight"])
    a, b = state[f"model.{layer}.lora_A.default.weight"], state[f"model.{layer}.lora_B.default.weight"]
    assert a.shape[0] == 4 and b.abs().sum() > 0  # B starts at zero: the adapter trained
    assert "model.language_model.model.layers.0.self_attn.q_proj.lora_A.default.weight" not in state

    main(["export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    merged = load_checkpoint(tmp_path / "merged").model.state_dict()
    torch.testing.assert_close(merged[f"{layer}.weight"], start[f"{layer}.weight"] + 2.0 * b @ a)
    assert torch.equal(merged[f"{layer}.bias"], start[f"{layer}.bias"])

    with pytest.raises(SystemExit, match="ckpt_path: the checkpoint was written by a LoRA run"):
        main(_fit_args(tiny, tmp_path / "plain", 3, "--ckpt_path", str(checkpoint)))


@pytest.mark.parametrize(("content", "why"), [(b"hello\n", "truncated or foreign"), (None, "truncated or foreign")])
def test_a_checkpoint_lightning_cannot_load_is_refused_in_one_line(tiny, tmp_path, content, why):
    path = tmp_path / "resume.ckpt"
    path.write_bytes(content if content is not None else (tiny["checkpoint"] / "ema.safetensors").read_bytes()[:999])
    with pytest.raises(SystemExit, match=f"srum: error: {path}: ckpt_path: .*{why}"):
        main(_fit_args(tiny, tmp_path / "run", 1, "--ckpt_path", str(path)))
    with pytest.raises(SystemExit, match=f"srum: error: {path}: expected a checkpoint written by torch.save"):
        main(["export", "--ckpt", str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_validate_reports_the_self_reward_of_fresh_rollouts(tiny, tmp_path, capsys):
    args = _fit_args(tiny, tmp_path, 1, "--trainer.limit_val_batches", "1")
    at = args.index("--trainer.max_steps")
    main(["validate", *args[1:at], *args[at + 2:]])
    printed = capsys.readouterr().out
    assert "val/global_score" in printed and "val/reward_mean" in printed


def test_scoring_instructions_are_chosen_by_config(tiny, tmp_path):
    from srum.reward.judges import ScoringConfig

    module = SRUMModule(tiny["checkpoint"], scoring=ScoringConfig(instructions="shapeworld"))
    module.configure_model()
    assert module.scorer.instructions.version == "shapeworld-1"
    path = tmp_path / "instructions.yaml"
    path.write_text("sample_template: 'Rate the picture of {prompt}.'\n")
    module = SRUMModule(tiny["checkpoint"], scoring=ScoringConfig(instructions=str(path)))
    module.configure_model()
    assert module.scorer.instructions.sample_instruction("a cat") == "Rate the picture of a cat."


@pytest.mark.parametrize(("build", "field"), [
    (lambda: OptimConfig(grad_clip=-1.0), "optim"),
    (lambda: OptimConfig(warmup_steps=-5), "optim"),
    (lambda: OptimConfig(lr=0.0), "optim"),
    (lambda: SamplerConfig(cfg_interval=(1.0, 0.4)), "cfg_interval"),
    (lambda: RolloutConfig(images_per_prompt=0), "rollout"),
])
def test_settings_that_would_train_the_wrong_way_are_refused(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_an_ema_decay_above_one_is_refused(tiny):
    with pytest.raises(ValueError, match=r"ema_decay: expected a decay in \[0, 1\)"):
        SRUMModule(tiny["checkpoint"], ema_decay=1.5)


def test_a_sharded_save_cut_short_never_takes_the_checkpoints_name(tmp_path, monkeypatch):
    import lightning.pytorch.strategies.model_parallel as model_parallel

    from srum.train.strategy import ShardedCheckpointStrategy

    strategy = ShardedCheckpointStrategy(data_parallel_size=1, tensor_parallel_size=1)
    final = tmp_path / "step=2.ckpt"
    strategy.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "optimizer_states": [], "epoch": 0}, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=2.ckpt"] and (final / ".metadata").is_file()
    whole = {p.name: p.read_bytes() for p in final.iterdir()}

    def dies_while_writing(state, path):
        (path / "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt  # the rank is gone

    monkeypatch.setattr(model_parallel, "_distributed_checkpoint_save", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        strategy.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "optimizer_states": [], "epoch": 1}, final)
    assert {p.name: p.read_bytes() for p in final.iterdir()} == whole  # the last whole save is untouched
    assert (tmp_path / "step=2.ckpt.partial").is_dir()
