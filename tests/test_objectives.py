"""The objectives against plain float64 references (``srum.objectives.reference``): group advantages and
advantage weights, the SDE step's Gaussian and a full SDE rollout on a tiny model, the policy-gradient loss and its
gradients, the flow objectives against the official loss, and the module's validation of objective settings."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srum.generation.pipeline import Pipeline
from srum.generation.prompts import Prompt
from srum.generation.sampler import SamplerConfig
from srum.generation.sde import sde_step, sde_step_mean, step_sigma, token_log_prob
from srum.loss import LossConfig, reference_loss
from srum.loss.config import PolicyGradientConfig
from srum.model.packing import Text, VaeImage, pack
from srum.model.patches import patchify
from srum.objectives import Candidates, build_objective
from srum.objectives import reference as ref
from srum.objectives.groups import advantage_weights, group_advantages
from srum.train.module import OptimConfig, RolloutConfig, SRUMModule
from tests.train_helpers import tiny_checkpoint

TIGHT = dict(rtol=1e-12, atol=1e-12)
HEIGHT, WIDTH, GRID = 16, 24, (4, 6)  # the tiny model's latent_downsample is 4
PROMPTS = [Prompt("1", "a red cube left of a blue ball"), Prompt("2", "two green circles")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("objectives") / "ckpt")


def _maps(seed: int, count: int, grid=GRID, dtype=torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(grid, generator=generator, dtype=dtype) for _ in range(count)]


# ------------------------------------------------------------------------------------------------------- groups


def _assert_advantages_equal(fast, slow, **tolerance):
    tolerance = tolerance or TIGHT
    torch.testing.assert_close(fast.rewards.double(), slow.rewards, **tolerance)
    torch.testing.assert_close(fast.sample.double(), slow.sample, **tolerance)
    torch.testing.assert_close(torch.stack(fast.tokens).double(), torch.stack(slow.tokens), **tolerance)
    assert fast.informative.tolist() == slow.informative.tolist()
    assert fast.flat_groups == slow.flat_groups


@pytest.mark.parametrize("credit", ["dense", "sample"])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("seed, groups, k, grid", [(0, 1, 2, (4, 6)), (1, 3, 3, (2, 5)), (2, 2, 4, (1, 1)),
                                                   (3, 2, 5, (3, 3))])
def test_group_advantages_and_weights_equal_the_reference(credit, scale, seed, groups, k, grid):
    maps = _maps(seed, groups * k, grid)
    fast = group_advantages(maps, k, credit, scale, eps=1e-4)
    slow = ref.group_advantages(maps, k, credit, scale, eps=1e-4)
    _assert_advantages_equal(fast, slow)
    assert all(a.dtype == torch.float64 and a.shape == grid for a in fast.tokens)
    for beta, max_weight in [(1.0, 2.0), (0.5, 1.3), (3.0, 1.0)]:
        weights = advantage_weights(fast, k, beta, max_weight)
        expected = ref.advantage_weights(slow, k, beta, max_weight)
        torch.testing.assert_close(torch.stack(weights), torch.stack(expected), **TIGHT)
        assert all(float(w.max()) <= max_weight and float(w.min()) >= 0 for w in weights)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(2, 5), groups=st.integers(1, 3), rows=st.integers(1, 4),
       cols=st.integers(1, 4), credit=st.sampled_from(["dense", "sample"]), scale=st.booleans(),
       eps=st.sampled_from([1e-4, 1e-2, 0.5]), quantised=st.booleans(), flat=st.booleans())
def test_group_advantages_equal_the_reference_on_random_maps(seed, k, groups, rows, cols, credit, scale, eps,
                                                             quantised, flat):
    maps = _maps(seed, groups * k, (rows, cols))
    if quantised:  # few distinct values: positions where every candidate agrees, groups that are flat
        maps = [(m * 3).floor() / 2 for m in maps]
    if flat:  # the last group's candidates all alike
        maps[-k:] = [maps[-1]] * k
    fast = group_advantages(maps, k, credit, scale, eps)
    slow = ref.group_advantages(maps, k, credit, scale, eps)
    _assert_advantages_equal(fast, slow, rtol=1e-10, atol=1e-10)
    weights = advantage_weights(fast, k, 1.5, 2.0)
    torch.testing.assert_close(torch.stack(weights), torch.stack(ref.advantage_weights(slow, k, 1.5, 2.0)),
                               rtol=1e-10, atol=1e-10)


def test_float32_maps_give_float32_advantages_close_to_the_reference():
    maps = _maps(5, 6, dtype=torch.float32)
    fast = group_advantages(maps, 3, "dense")
    assert fast.sample.dtype == torch.float32 and fast.tokens[0].dtype == torch.float32
    _assert_advantages_equal(fast, ref.group_advantages(maps, 3, "dense"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("credit", ["dense", "sample"])
@pytest.mark.parametrize("scale", [True, False])
def test_a_group_without_spread_gets_zero_advantage_and_weight_and_is_counted(credit, scale):
    maps = _maps(7, 6, dtype=torch.float32)
    maps[3:] = [torch.full(GRID, 0.1)] * 3  # the second group: three equal maps
    fast = group_advantages(maps, 3, credit, scale)
    assert fast.flat_groups == 1 and fast.informative.tolist() == [True] * 3 + [False] * 3
    assert all(torch.equal(a, torch.zeros(GRID)) for a in fast.tokens[3:])
    assert torch.equal(fast.sample[3:], torch.zeros(3))
    weights = advantage_weights(fast, 3, beta=1.0, max_weight=2.0)
    assert all(torch.equal(w, torch.zeros(GRID)) for w in weights[3:])
    assert all(bool((w > 0).all()) for w in weights[:3])
    flat = group_advantages([torch.full(GRID, 0.7)] * 4, 2, credit, scale)
    assert flat.flat_groups == 2 and not flat.informative.any()


def test_a_flat_float64_group_gets_exactly_zero_dense_advantage():
    maps = [torch.full(GRID, 0.1, dtype=torch.float64)] * 3
    small_eps = group_advantages(maps, 3, "dense", scale=True, eps=1e-20)
    assert small_eps.flat_groups == 1  # detected as flat ...
    assert max(float(a.abs().max()) for a in small_eps.tokens) == 0.0  # ... but not zeroed


@pytest.mark.parametrize("scale", [True, False])
def test_constant_maps_make_dense_token_advantages_the_sample_advantages(scale):
    generator = torch.Generator().manual_seed(3)
    maps = [torch.full(GRID, float(torch.rand((), generator=generator))) for _ in range(6)]
    dense = group_advantages(maps, 3, "dense", scale)
    sample = group_advantages(maps, 3, "sample", scale)
    for d, s, value in zip(dense.tokens, sample.tokens, dense.sample, strict=True):
        torch.testing.assert_close(d, s, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(d, torch.full(GRID, float(value)), rtol=1e-6, atol=1e-7)
    assert dense.flat_groups == sample.flat_groups == 0


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="K >= 2"):
        group_advantages(_maps(0, 4), 1)
    with pytest.raises(ValueError, match="K >= 2"):
        group_advantages(_maps(0, 5), 2)
    with pytest.raises(ValueError, match="one token grid"):
        group_advantages(_maps(0, 2) + _maps(1, 2, (2, 3)), 2)


# ---------------------------------------------------------------------------------------------------------- SDE


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t, t_next, noise_level", [(1.0, 0.9, 0.7), (0.8, 0.5, 0.7), (0.3, 0.0, 1.2),
                                                    (0.05, 0.01, 0.3)])
def test_sde_step_is_the_reference_gaussian(dtype, t, t_next, noise_level):
    generator = torch.Generator().manual_seed(int(t * 100))
    x, v, noise = (torch.randn(7, 12, generator=generator, dtype=dtype) for _ in range(3))
    mean, std = sde_step_mean(x, v, t, t_next, noise_level)
    expected_mean, expected_std = ref.sde_step_mean(x, v, t, t_next, noise_level)
    tolerance = TIGHT if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    assert mean.dtype == dtype and std == pytest.approx(expected_std, rel=1e-14)
    torch.testing.assert_close(mean.double(), expected_mean, **tolerance)
    x_next, log_prob = sde_step(x, v, t, t_next, noise_level, noise)
    torch.testing.assert_close(x_next, mean + std * noise, rtol=0, atol=0)
    expected = ref.token_log_prob(x_next, expected_mean, expected_std)
    torch.testing.assert_close(log_prob.double(), expected, **tolerance)
    torch.testing.assert_close(token_log_prob(x_next, mean, std).double(), expected, **tolerance)
    assert log_prob.shape == (7,)


def test_step_sigma_at_t_1_uses_the_next_grid_point():
    assert step_sigma(1.0, 0.8, 0.7) == pytest.approx(0.7 * math.sqrt(1.0 / 0.2), rel=1e-15)
    assert step_sigma(1.0, 0.5, 0.7) == pytest.approx(0.7 * math.sqrt(2.0), rel=1e-15)
    assert step_sigma(0.8, 0.5, 0.7) == pytest.approx(0.7 * math.sqrt(0.8 / 0.2), rel=1e-15)
    assert step_sigma(1.0, 0.8, 0.7) == ref.step_sigma(1.0, 0.8, 0.7)
    mean, std = sde_step_mean(torch.ones(2, 3), torch.ones(2, 3), 1.0, 0.8, 0.7)
    assert bool(torch.isfinite(mean).all()) and math.isfinite(std)


def test_the_sde_keeps_the_marginals_of_the_flow():
    """With the exact velocity of Gaussian data x0 ~ N(0, s^2), SDE sampling from pure noise ends at std s."""
    spread, samples = 0.5, 40000
    generator = torch.Generator().manual_seed(0)
    times = SamplerConfig(num_timesteps=200, timestep_shift=1.0).timesteps().double().tolist()
    x = torch.randn(samples, 1, generator=generator, dtype=torch.float64)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        variance = (1 - t) ** 2 * spread**2 + t**2  # of x_t = (1 - t) x0 + t eps
        velocity = x * (t - (1 - t) * spread**2) / variance  # E[eps - x0 | x_t]
        x, _ = sde_step(x, velocity, t, t_next, 0.7, torch.randn(samples, 1, generator=generator,
                                                                 dtype=torch.float64))
    assert float(x.std()) == pytest.approx(spread, rel=0.02)
    assert abs(float(x.mean())) < 0.01


@pytest.fixture(scope="module")
def pipeline(tiny) -> Pipeline:
    return Pipeline.from_checkpoint(tiny)


def _packed(model, special, encode, prompts: list[str], latents: list[torch.Tensor], t: float):
    items = [[Text(encode(prompt)), VaeImage(latent.float(), timestep=t)] for prompt, latent in
             zip(prompts, latents, strict=True)]
    return pack(items, model.config, special)


def test_sde_rollout_records_its_steps_and_their_log_probs(pipeline):
    sampler = SamplerConfig(num_timesteps=4, cfg_text_scale=1.0)
    prompts, seeds = ["a red cube", "two green circles", "a yellow square"], [11, 12, 13]
    out = pipeline.generate(prompts, seeds, sampler, HEIGHT, WIDTH, noise_level=0.7)
    trajectory, tokens = out.trajectory, GRID[0] * GRID[1]
    grid = sampler.timesteps().tolist()
    assert trajectory.times == list(zip(grid[:-1], grid[1:], strict=True)) and trajectory.noise_level == 0.7
    channels = pipeline.model.config.latent_channels
    assert trajectory.states.shape == trajectory.next_states.shape == (3, 3 * tokens, channels)
    assert trajectory.log_probs.shape == (3, 3 * tokens)
    for s in range(2):
        assert torch.equal(trajectory.next_states[s], trajectory.states[s + 1])
    patch = pipeline.model.config.latent_patch_size
    returned = torch.cat([patchify(latent, patch) for latent in out.latents])
    assert torch.equal(trajectory.next_states[-1], returned)
    assert not torch.equal(trajectory.states[0], trajectory.next_states[0])

    model = pipeline.model
    for s, (t, t_next) in enumerate(trajectory.times):
        batch = _packed(model, pipeline.special, pipeline.encode, prompts, out.latents, t)
        with torch.no_grad():
            velocity = model.velocity_at(batch, trajectory.states[s])
        mean, std = sde_step_mean(trajectory.states[s], velocity, t, t_next, 0.7)
        torch.testing.assert_close(token_log_prob(trajectory.next_states[s], mean, std), trajectory.log_probs[s],
                                   rtol=0, atol=1e-4)
        expected = ref.step_log_prob(trajectory.states[s], velocity, trajectory.next_states[s], t, t_next, 0.7)
        torch.testing.assert_close(trajectory.log_probs[s].double(), expected, rtol=0, atol=1e-4)
        # the recorded step is a draw of that Gaussian: standardised, the step's noise is standard normal
        z = (trajectory.next_states[s].double() - mean.double()) / std
        assert abs(float(z.mean())) < 0.1 and float(z.std()) == pytest.approx(1.0, abs=0.06)

    alone = pipeline.generate(prompts[:1], seeds[:1], sampler, HEIGHT, WIDTH, noise_level=0.7)
    assert torch.equal(alone.images[0], out.images[0])
    torch.testing.assert_close(alone.latents[0], out.latents[0], rtol=0, atol=1e-6)
    for name in ("states", "next_states", "log_probs"):  # image 0's tokens come first in the packed trajectory
        torch.testing.assert_close(getattr(alone.trajectory, name), getattr(trajectory, name)[:, :tokens], rtol=0,
                                   atol=1e-5)
    assert pipeline.generate(prompts[:1], seeds[:1], sampler, HEIGHT, WIDTH).trajectory is None


def test_the_first_step_of_any_shifted_grid_uses_the_next_grid_point(pipeline):
    sampler = SamplerConfig(num_timesteps=4, timestep_shift=0.35, cfg_text_scale=1.0)
    grid = sampler.timesteps().tolist()
    assert step_sigma(grid[0], grid[1], 0.7) == pytest.approx(ref.step_sigma(1.0, grid[1], 0.7), rel=1e-5)
    out = pipeline.generate(["a red cube"], [0], sampler, HEIGHT, WIDTH, noise_level=0.7)
    assert float(out.latents[0].abs().max()) < 100


# ---------------------------------------------------------------------------------------------- policy gradient


def _pg_module(tiny, *, credit: str = "dense", kl_weight: float = 0.0, steps_per_update: int = 0,
               num_timesteps: int = 4, lr: float = 1e-2) -> SRUMModule:
    loss = LossConfig(objective="policy_gradient", constraint="none", credit=credit,
                      policy_gradient=PolicyGradientConfig(kl_weight=kl_weight, steps_per_update=steps_per_update))
    rollout = RolloutConfig(images_per_prompt=2, height=HEIGHT, width=WIDTH,
                            sampler=SamplerConfig(num_timesteps=num_timesteps, cfg_text_scale=1.0))
    module = SRUMModule(tiny, loss=loss, rollout=rollout, optim=OptimConfig(lr=lr, warmup_steps=0))
    module.configure_model()
    return module


def _candidates(module: SRUMModule, maps: list[torch.Tensor], index: int = 0) -> Candidates:
    candidates, _ = module.rollout_and_score(PROMPTS, index=index)
    candidates.reward_maps = maps
    return candidates


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for name, p in model.named_parameters() if p.requires_grad}


def _run_step(module: SRUMModule, candidates: Candidates, update: int, objective=None):
    """The objective's step with a backward that accumulates: (loss, terms, grads)."""
    module.model.zero_grad(set_to_none=True)
    objective = objective or module.objective
    loss, terms = objective.step(module.policy(0), candidates, update, lambda loss: loss.backward())
    return loss, terms, _grads(module.model)


def _reference_step(module: SRUMModule, candidates: Candidates, old: list[torch.Tensor] | None = None):
    """The float64 reference loss on the current model's velocities at every recorded step, back-propagated:
    (policy term, KL term, per-step log-probabilities, grads). ``old`` None: the first update (old = new)."""
    config, trajectory = module.loss_config, candidates.trajectory
    settings_ = config.policy_gradient
    advantages = ref.group_advantages(candidates.reward_maps, candidates.group_size, config.credit,
                                      config.scale_advantages, config.advantage_eps)
    token_advantages = torch.cat([a.flatten() for a in advantages.tokens])
    model = module.model
    new, means, reference_means, stds = [], [], [], []
    for s, (t, t_next) in enumerate(trajectory.times):
        batch = _packed(model, module.special, module.pipeline.encode, candidates.prompts, candidates.latents, t)
        x_t = trajectory.states[s]
        mean, std = ref.sde_step_mean(x_t, model.velocity_at(batch, x_t), t, t_next, settings_.noise_level)
        new.append(ref.token_log_prob(trajectory.next_states[s], mean, std))
        means.append(mean)
        stds.append(std)
        if settings_.kl_weight > 0:
            with torch.no_grad():
                reference_means.append(ref.sde_step_mean(x_t, module.reference.velocity_at(batch, x_t), t, t_next,
                                                         settings_.noise_level)[0])
    olds = [lp.detach() for lp in new] if old is None else old
    model.zero_grad(set_to_none=True)
    policy, kl = ref.policy_gradient_loss(new, olds, token_advantages, settings_.clip_range, settings_.kl_weight,
                                          means, reference_means, stds)
    (policy + kl).backward()
    return policy.detach(), kl.detach(), [lp.detach() for lp in new], _grads(model)


def _assert_grads_close(fast: dict[str, torch.Tensor], slow: dict[str, torch.Tensor], rtol: float = 1e-4):
    scale = max(float(g.abs().max()) for g in slow.values())
    assert scale > 0
    for name, grad in slow.items():
        torch.testing.assert_close(fast[name], grad, rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("credit", ["dense", "sample"])
def test_policy_gradient_equals_the_float64_reference_over_two_updates(tiny, credit):
    module = _pg_module(tiny, credit=credit, kl_weight=0.5)
    candidates = _candidates(module, _maps(1, 4, dtype=torch.float32))
    loss, terms, grads = _run_step(module, candidates, update=0)
    # (a) the first update compares the policy with itself
    assert float(terms["ratio_mean"]) == 1.0 and float(terms["clipped_share"]) == 0.0
    assert float(terms["kl_term"]) == 0.0  # the policy is the reference
    assert float(terms["flat_groups"]) == 0.0
    policy, kl, new, expected = _reference_step(module, candidates)
    assert float(kl) == 0.0
    assert float(loss) == pytest.approx(float(policy), abs=1e-7)  # centred advantages: -sum A / N = 0
    _assert_grads_close(grads, expected)
    stored = [lp.clone() for lp in candidates.trajectory.log_probs]
    for s, lp in enumerate(new):  # the stored old log-probs are this update's, from the training path
        torch.testing.assert_close(stored[s].double(), lp, rtol=0, atol=1e-5)

    optimizer = module.configure_optimizers()["optimizer"]
    module.model.zero_grad(set_to_none=True)
    for name, parameter in module.model.named_parameters():
        if parameter.requires_grad:
            parameter.grad = grads[name].clone()
    optimizer.step()
    # (f) the second update compares with the stored log-probs: ratios move away from 1
    loss, terms, grads = _run_step(module, candidates, update=1)
    assert all(torch.equal(a, b) for a, b in zip(candidates.trajectory.log_probs, stored, strict=True))
    policy, kl, new, expected = _reference_step(module, candidates, old=stored)
    ratios = torch.exp(torch.stack(new) - torch.stack(stored).double())
    assert float(terms["ratio_mean"]) != 1.0
    assert float(terms["ratio_mean"]) == pytest.approx(float(ratios.mean(1).mean()), abs=1e-5)
    clipped = float(((ratios - 1).abs() > 0.2).double().mean())
    assert float(terms["clipped_share"]) == pytest.approx(clipped, abs=3 / ratios.numel())
    # (d) the policy moved off the reference: a positive KL, equal to the reference's
    assert float(kl) > 0 and float(terms["kl_term"]) == pytest.approx(float(kl), rel=1e-5)
    assert float(terms["clipped_share"]) > 0  # the clip is exercised
    assert float(terms["policy_term"]) == pytest.approx(float(policy), rel=1e-5, abs=1e-8)
    assert float(loss) == pytest.approx(float(policy + kl), rel=1e-5, abs=1e-8)
    _assert_grads_close(grads, expected)


def test_constant_maps_give_the_same_policy_gradient_for_dense_and_sample_credit(tiny):
    module = _pg_module(tiny, credit="dense")
    generator = torch.Generator().manual_seed(2)
    maps = [torch.full(GRID, float(torch.rand((), generator=generator))) for _ in range(4)]
    base = _candidates(module, maps)
    sample_credit = build_objective(LossConfig(objective="policy_gradient", constraint="none", credit="sample",
                                               policy_gradient=PolicyGradientConfig(kl_weight=0.0)))
    start = copy.deepcopy(module.model.state_dict())
    optimizer = module.configure_optimizers()["optimizer"]
    results = []
    for objective in (module.objective, sample_credit):
        module.model.load_state_dict(start)
        optimizer.state.clear()
        candidates = copy.deepcopy(base)
        first = _run_step(module, candidates, 0, objective)
        optimizer.step()
        second = _run_step(module, candidates, 1, objective)
        results.append((first, second))
    for (loss, terms, grads), (loss_s, terms_s, grads_s) in zip(*results, strict=True):
        assert float(loss) == pytest.approx(float(loss_s), rel=1e-6, abs=1e-9)
        assert float(terms["ratio_mean"]) == pytest.approx(float(terms_s["ratio_mean"]), rel=1e-6)
        _assert_grads_close(grads, grads_s, rtol=1e-5)
    assert float(results[0][1][1]["ratio_mean"]) != 1.0  # the second update did compare two policies


def test_policy_gradient_without_kl_needs_no_reference(tiny):
    module = _pg_module(tiny, kl_weight=0.0)
    assert not hasattr(module, "reference") and module.policy(0).reference is None
    candidates = _candidates(module, _maps(4, 4, dtype=torch.float32))
    loss, terms, grads = _run_step(module, candidates, 0)
    assert float(terms["kl_term"]) == 0.0 and math.isfinite(float(loss))
    assert module.model.llm2vae.weight.grad.abs().sum() > 0


def _spy_on_steps(module: SRUMModule, monkeypatch) -> list[float]:
    """The flow times at which the objective re-evaluates the model's velocity, in call order."""
    seen: list[float] = []
    velocity_at = module.model.velocity_at

    def spy(batch, x_t, *args, **kwargs):
        seen.append(float(batch.latent_timesteps[0]))
        return velocity_at(batch, x_t, *args, **kwargs)

    monkeypatch.setattr(module.model, "velocity_at", spy)
    return seen


def test_steps_per_update_selects_that_many_distinct_steps_reproducibly(tiny, monkeypatch):
    module = _pg_module(tiny, steps_per_update=2, num_timesteps=7)
    candidates = _candidates(module, _maps(5, 4, dtype=torch.float32))
    times = [t for t, _ in candidates.trajectory.times]
    assert len(times) == 6
    seen = _spy_on_steps(module, monkeypatch)
    rollout_log_probs = candidates.trajectory.log_probs.clone()
    chosen: dict[int, list[int]] = {}
    for update in (0, 1, 2, 0, 1):
        seen.clear()
        _run_step(module, candidates, update)
        steps = [times.index(t) for t in seen]
        assert len(steps) == 2 and len(set(steps)) == 2, steps
        assert chosen.setdefault(update, steps) == steps  # the same for the same index and update
        if update == 0:  # only the trained steps' old log-probs are replaced
            untouched = [s for s in range(6) if s not in steps]
            assert torch.equal(candidates.trajectory.log_probs[untouched], rollout_log_probs[untouched])
            assert not torch.equal(candidates.trajectory.log_probs[steps], rollout_log_probs[steps])
    assert len({tuple(steps) for steps in chosen.values()}) > 1  # drawn afresh per update
    other = _pg_module(tiny, steps_per_update=2, num_timesteps=7)
    seen = _spy_on_steps(other, monkeypatch)
    _run_step(other, copy.deepcopy(candidates), 1)
    assert [times.index(t) for t in seen] == chosen[1]
    every = _pg_module(tiny, steps_per_update=6, num_timesteps=7)  # as many as there are: all, in order
    seen = _spy_on_steps(every, monkeypatch)
    _run_step(every, copy.deepcopy(candidates), 0)
    assert [times.index(t) for t in seen] == list(range(6))


# ---------------------------------------------------------------------------------------------- flow objectives


def _flow_candidates(maps: list[torch.Tensor]) -> Candidates:
    generator = torch.Generator().manual_seed(6)
    latents = [torch.randn(12, 8, 12, generator=generator) for _ in maps]  # a (4, 6) token grid
    prompts = ["a red cube", "a red cube", "two green circles", "two green circles"]
    return Candidates(prompts, latents, maps, [], group_size=2)


def _flow_step(module: SRUMModule, candidates: Candidates, monkeypatch):
    captured = []
    forward = module.model.forward

    def spy(batch, *args, **kwargs):
        out = forward(batch, *args, **kwargs)
        captured.append((batch, out))
        return out

    monkeypatch.setattr(module.model, "forward", spy)
    loss, terms = module.objective.step(module.policy(0), candidates, 0, lambda loss: loss.backward())
    monkeypatch.undo()
    (batch, out), = captured
    return loss, terms, batch, out


@pytest.mark.parametrize("constraint", ["sample", "none"])
def test_weighted_equals_the_official_loss_on_the_same_forward(tiny, monkeypatch, constraint):
    config = LossConfig(constraint=constraint)
    module = SRUMModule(tiny, loss=config, text_dropout=0.3)
    module.configure_model()
    maps = _maps(8, 4, dtype=torch.float32)
    loss, terms, batch, out = _flow_step(module, _flow_candidates(maps), monkeypatch)
    velocity, target = out.velocity.detach().double(), out.target_velocity.double()
    expected = reference_loss(velocity, target, target if constraint == "sample" else None, maps,
                              list(batch.latent_grids), config)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    reward_only = reference_loss(velocity, target, None, maps, list(batch.latent_grids), LossConfig(constraint="none"))
    assert float(terms["reward_term"]) == pytest.approx(float(reward_only), rel=1e-5)


@pytest.mark.parametrize("credit", ["dense", "sample"])
def test_advantage_weighted_equals_the_official_loss_with_reference_weights(tiny, monkeypatch, credit):
    config = LossConfig(objective="advantage_weighted", credit=credit, beta=2.0, max_weight=1.5)
    module = SRUMModule(tiny, loss=config, rollout=RolloutConfig(images_per_prompt=2), text_dropout=0.0)
    module.configure_model()
    maps = _maps(9, 2, dtype=torch.float32) + [torch.full(GRID, 0.25)] * 2  # the second group is flat
    loss, terms, batch, out = _flow_step(module, _flow_candidates(maps), monkeypatch)
    advantages = ref.group_advantages(maps, 2, credit, config.scale_advantages, config.advantage_eps)
    weights = ref.advantage_weights(advantages, 2, config.beta, config.max_weight)
    assert all(bool((w == 0).all()) for w in weights[2:])
    velocity, target = out.velocity.detach().double(), out.target_velocity.double()
    expected = reference_loss(velocity, target, target, weights, list(batch.latent_grids), config)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["flat_groups"]) == 1.0


# ---------------------------------------------------------------------------------------------- module validation


def test_the_module_refuses_objective_settings_it_cannot_run(tiny):
    with pytest.raises(ValueError, match="rollout.images_per_prompt"):
        SRUMModule(tiny, loss=LossConfig(objective="advantage_weighted"))
    with pytest.raises(ValueError, match="rollout.images_per_prompt"):
        SRUMModule(tiny, loss=LossConfig(objective="policy_gradient"),
                   rollout=RolloutConfig(sampler=SamplerConfig(cfg_text_scale=1.0)))
    with pytest.raises(ValueError, match="cfg_text_scale"):
        SRUMModule(tiny, loss=LossConfig(objective="policy_gradient"),
                   rollout=RolloutConfig(images_per_prompt=2, sampler=SamplerConfig(cfg_text_scale=4.0)))
    with pytest.raises(ValueError, match="think off"):
        SRUMModule(tiny, loss=LossConfig(objective="policy_gradient"),
                   rollout=RolloutConfig(images_per_prompt=2, think=True, sampler=SamplerConfig(cfg_text_scale=1.0)))
    for objective in ("advantage_weighted", "policy_gradient"):
        with pytest.raises(ValueError, match="offline records hold no candidate groups"):
            SRUMModule(tiny, mode="offline", loss=LossConfig(objective=objective))
    SRUMModule(tiny, loss=LossConfig(objective="advantage_weighted"), rollout=RolloutConfig(images_per_prompt=2))
    SRUMModule(tiny, mode="offline", loss=LossConfig())
