"""Per-step cost of each training objective at the ShapeWorld main job's sizes (``configs/shapes.yaml``), split
into rollout, scoring and update.

One step = ``rollout_and_score`` (8 prompts x 8 candidates of 36 x 36 px, 16 sampler grid points, unguided) +
``objective.step`` with backward, on the shipped ``srum:shapeworld-base`` checkpoint, one thread. The objectives
are judged by ShapeWorld's checker (the oracle: its cost is small, so the objectives' own costs show); one more
benchmark judges with the model itself (the main job's self judge) to show what judging costs.

With ``--benchmark-disable`` (the suite's default) each benchmark runs one real step, still checked: a finite loss,
the expected number of backward passes, and shares that sum to 1.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from srum.generation.prompts import Prompt
from srum.generation.sampler import SamplerConfig
from srum.loss import LossConfig
from srum.loss.config import PolicyGradientConfig
from srum.reward.judges import ScoringConfig
from srum.reward.maps import MapConfig
from srum.reward.scorer import ScorerConfig
from srum.shapeworld.world import prompts as shapeworld_prompts
from srum.train.module import RolloutConfig, SRUMModule

ROUNDS, WARMUP_ROUNDS = 3, 1
INDEX = 7  # batch index: seeds the rollouts and the objective's noise (the same every round)
PROMPTS, CANDIDATES, GRID_POINTS = 8, 8, 16
MAIN = {"constraint": "reference", "constraint_weight": 0.5}  # configs/shapes.yaml's loss

CASES = {
    # name: (loss, judge, backward passes per step)
    "weighted-checker": (LossConfig(**MAIN), "checker", 1),
    "advantage_weighted-dense-checker": (LossConfig(**MAIN, objective="advantage_weighted", credit="dense"),
                                         "checker", 1),
    "policy_gradient-dense-all15-checker": (LossConfig(**MAIN, objective="policy_gradient", credit="dense"),
                                            "checker", GRID_POINTS - 1),
    "policy_gradient-dense-4of15-checker": (
        LossConfig(**MAIN, objective="policy_gradient", credit="dense",
                   policy_gradient=PolicyGradientConfig(steps_per_update=4)), "checker", 4),
    "weighted-self": (LossConfig(**MAIN), "self", 1),
}


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    return [Prompt(prompt_id=p.prompt_id, text=p.text) for p in shapeworld_prompts("train", PROMPTS, 0)]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(loss: LossConfig, judge: str) -> SRUMModule:
    """The main job's module (configs/shapes.yaml), built outside the timed step."""
    sampler = SamplerConfig(num_timesteps=GRID_POINTS, timestep_shift=1.0, cfg_text_scale=1.0, cfg_interval=(0.0, 1.0))
    module = SRUMModule("srum:shapeworld-base", mode="online", trainable="all", loss=loss,
                        reward_map=MapConfig(rule="max_floor"),
                        rollout=RolloutConfig(images_per_prompt=CANDIDATES, height=36, width=36, sampler=sampler),
                        scoring=ScoringConfig(judge=judge, proposer="components", max_regions=9,
                                              score_kind="expected", instructions="shapeworld",
                                              scorer=ScorerConfig(method="expected", score_step=0.5)),
                        text_dropout=0.1, timestep_shift=1.0, seed=0)
    module.configure_model()
    return module


@pytest.mark.benchmark(group="objective-step")
@pytest.mark.parametrize("case", list(CASES))
def test_objective_step(benchmark, prompts, case):
    loss_config, judge, backward_passes = CASES[case]
    module = build(loss_config, judge)
    calls: list[dict[str, float]] = []
    losses: list[torch.Tensor] = []
    passes: list[int] = []

    def backward(loss: torch.Tensor) -> None:
        passes[-1] += 1
        loss.backward()

    def step() -> None:
        candidates, timing = module.rollout_and_score(prompts, INDEX)
        assert len(candidates.latents) == PROMPTS * CANDIDATES
        start = time.perf_counter()
        module.model.zero_grad(set_to_none=False)  # as training_step does before each update
        passes.append(0)
        loss, _ = module.objective.step(module.policy(INDEX), candidates, 0, backward)
        timing["update"] = time.perf_counter() - start
        calls.append(timing)
        losses.append(loss.detach())

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)

    # Timed: the last ROUNDS calls (after the warm-up); disabled: the single call.
    timed = calls[-ROUNDS:]
    assert all(bool(torch.isfinite(loss)) for loss in losses), losses
    assert all(count == backward_passes for count in passes), passes
    parts = {name: sum(call[name] for call in timed) / len(timed) for name in ("rollout", "scoring", "update")}
    total = sum(parts.values())
    shares = {name: value / total for name, value in parts.items()}
    assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-9)
    assert all(value > 0 for value in parts.values()), parts
    benchmark.extra_info.update({"objective": loss_config.objective, "judge": judge,
                                 "backward_passes": backward_passes, "loss": float(losses[-1])})
    benchmark.extra_info.update({f"{name}_s": round(value, 4) for name, value in parts.items()})
    benchmark.extra_info.update({f"{name}_share": round(value, 3) for name, value in shares.items()})
