"""The constrained dense-reward flow loss: hand-computed values, the closed-form gradient, the vectorised path
against the plain reference on random ragged batches, every option, bad input."""

from __future__ import annotations

import pytest
import torch

from srum.loss import LossConfig, dense_reward_flow_loss, reference_loss, vectorised_loss

TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64, same terms in another summation order


def _batch(seed: int, grids, map_sizes, channels: int = 16, signed: bool = False):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(r * c for r, c in grids)
    velocity = torch.randn(tokens, channels, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randn(tokens, channels, generator=generator, dtype=torch.float64)
    constraint = torch.randn(tokens, channels, generator=generator, dtype=torch.float64)
    maps = [torch.rand(size, generator=generator, dtype=torch.float64) * (2 if signed else 1) - (1 if signed else 0)
            for size in map_sizes]
    return velocity, target, constraint, maps


def test_hand_computed_value():
    velocity = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    target = torch.zeros(2, 2, dtype=torch.float64)
    constraint = torch.ones(2, 2, dtype=torch.float64)
    maps = [torch.tensor([[0.2, 0.6]], dtype=torch.float64)]  # a 1x2 map on a 1x2 grid: rewards 0.2 and 0.6
    loss = dense_reward_flow_loss(velocity, target, constraint, maps, [(1, 2)], LossConfig(constraint_weight=0.5))
    # errors to target: 1 and 2; to the constraint: 0 and 1; N = 2
    assert float(loss) == pytest.approx((0.2 * 1 + 0.6 * 2 + 0.5 * (0 + 1)) / 2)


RAGGED = [
    ([(3, 4), (7, 5), (1, 1)], [(24, 32), (7, 5), (3, 3)]),  # odd grids, a map smaller than its grid
    ([(8, 8)], [(64, 64)]),
    ([(2, 9), (5, 3)], [(1, 1), (13, 17)]),
]


@pytest.mark.parametrize("grids, map_sizes", RAGGED)
@pytest.mark.parametrize("config", [
    LossConfig(), LossConfig(constraint_weight=0.1), LossConfig(constraint="none"),
    LossConfig(constraint="reference", constraint_weight=2.0), LossConfig(signed="hinge", margin=0.7),
], ids=["official", "lambda", "none", "reference", "hinge"])
def test_vectorised_equals_reference_with_gradients(grids, map_sizes, config):
    velocity, target, constraint, maps = _batch(len(grids), grids, map_sizes, signed=config.signed == "hinge")
    constraint = None if config.constraint == "none" else constraint
    expected = reference_loss(velocity, target, constraint, maps, grids, config, num_tokens=37.0)
    (expected_grad,) = torch.autograd.grad(2.5 * expected, velocity)  # a non-unit upstream gradient
    actual = vectorised_loss(velocity, target, constraint, maps, grids, config, num_tokens=37.0)
    (actual_grad,) = torch.autograd.grad(2.5 * actual, velocity)
    torch.testing.assert_close(actual, expected, **TIGHT)
    torch.testing.assert_close(actual_grad, expected_grad, **TIGHT)


def test_gradient_has_the_closed_form_of_the_method():
    grids, sizes = [(4, 6)], [(16, 24)]
    velocity, target, constraint, maps = _batch(3, grids, sizes)
    config = LossConfig(constraint_weight=0.5)
    loss = dense_reward_flow_loss(velocity, target, constraint, maps, grids, config)
    (grad,) = torch.autograd.grad(loss, velocity)
    rewards = torch.nn.functional.interpolate(maps[0][None, None], size=grids[0], mode="bilinear").flatten()[:, None]
    count, channels = velocity.shape
    expected = 2 / (channels * count) * ((rewards + 0.5) * velocity - rewards * target - 0.5 * constraint)
    torch.testing.assert_close(grad, expected.detach(), **TIGHT)


def test_hinge_repulsion_is_bounded_below():
    """Pushing a negatively rewarded token far from its target cannot take the loss below zero."""
    grids, sizes = [(2, 2)], [(2, 2)]
    _, target, _, _ = _batch(5, grids, sizes)
    maps = [-torch.ones(2, 2, dtype=torch.float64)]
    config = LossConfig(signed="hinge", margin=0.5, constraint="none")
    for scale in (0.0, 1.0, 10.0, 1e3):
        far = target + scale
        loss = dense_reward_flow_loss(far, target, None, maps, grids, config)
        assert float(loss) >= 0
    assert float(dense_reward_flow_loss(target + 1e3, target, None, maps, grids, config)) == 0.0


def test_reference_and_torch_impls_can_be_forced(monkeypatch):
    grids, sizes = [(3, 3)], [(6, 6)]
    velocity, target, constraint, maps = _batch(7, grids, sizes)
    forced = dense_reward_flow_loss(velocity, target, constraint, maps, grids, impl="reference")
    monkeypatch.setenv("SRUM_LOSS_IMPL", "reference")
    via_env = dense_reward_flow_loss(velocity, target, constraint, maps, grids)
    torch.testing.assert_close(forced, via_env, **TIGHT)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="loss impl 'triton': needs the triton package and CUDA tensors"):
        dense_reward_flow_loss(velocity, target, constraint, maps, grids, impl="triton")
    with pytest.raises(ValueError, match="impl: expected one of"):
        dense_reward_flow_loss(velocity, target, constraint, maps, grids, impl="fast")


@pytest.mark.parametrize("change, message", [
    (lambda b: {**b, "grids": [(3, 4)]}, "velocity and target: expected"),
    (lambda b: {**b, "constraint_target": None}, "constraint_target: expected"),
    (lambda b: {**b, "reward_maps": []}, "reward_maps: expected one per image"),
    (lambda b: {**b, "reward_maps": [torch.full((6, 6), float("nan"), dtype=torch.float64)]}, "finite values"),
    (lambda b: {**b, "reward_maps": [-torch.ones(6, 6, dtype=torch.float64)]}, r"in \[0.0, 2.0\]"),
])
def test_bad_input_is_named(change, message):
    velocity, target, constraint, maps = _batch(9, [(3, 3)], [(6, 6)])
    arguments = dict(velocity=velocity, target=target, constraint_target=constraint, reward_maps=maps,
                     grids=[(3, 3)])
    with pytest.raises(ValueError, match=message):
        dense_reward_flow_loss(**change(arguments))


def test_config_validation():
    with pytest.raises(ValueError, match="constraint_weight"):
        LossConfig(constraint_weight=-1)
    with pytest.raises(ValueError, match="margin"):
        LossConfig(signed="hinge", margin=0)


@pytest.mark.parametrize("config", [LossConfig(), LossConfig(signed="hinge", margin=0.8)], ids=["unsigned", "hinge"])
def test_gradients_reach_targets_and_maps_as_autograd_would(config):
    """The vectorised path forms its gradients itself: they equal autograd through the reference for every
    input, and a constraint target that is the flow target itself gets the gradient once."""
    grids, sizes = [(3, 4), (2, 5)], [(6, 8), (2, 5)]
    velocity, target, constraint, maps = _batch(11, grids, sizes, signed=config.signed == "hinge")
    for constraint_target in (constraint, target):
        inputs = [velocity, target.requires_grad_(True), maps[0].requires_grad_(True)]
        if constraint_target is constraint:
            inputs.append(constraint.requires_grad_(True))
        expected = torch.autograd.grad(reference_loss(velocity, target, constraint_target, maps, grids, config),
                                       inputs)
        actual = torch.autograd.grad(vectorised_loss(velocity, target, constraint_target, maps, grids, config),
                                     inputs)
        for got, want in zip(actual, expected, strict=True):
            torch.testing.assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("function", [reference_loss, vectorised_loss], ids=["reference", "torch"])
def test_bf16_inputs_are_summed_in_float32(function):
    """bf16 velocities, targets and maps: the loss is the float64 loss of the same (rounded) values to float32
    precision, returned in float32, and the velocity's gradient comes back in bf16."""
    grids, sizes = [(16, 16), (8, 12)], [(64, 64), (8, 12)]
    velocity, target, constraint, maps = _batch(5, grids, sizes, channels=64)
    half = [t.detach().bfloat16() for t in (velocity, target, constraint, *maps)]
    exact = reference_loss(*(t.double() for t in half[:3]), [m.double() for m in half[3:]], grids, LossConfig())
    velocity_bf16 = half[0].requires_grad_(True)
    loss = function(velocity_bf16, half[1], half[2], half[3:], grids, LossConfig())
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(exact), rel=1e-6)
    (gradient,) = torch.autograd.grad(loss, velocity_bf16)
    assert gradient.dtype == torch.bfloat16


def test_the_logged_reward_term_is_the_loss_without_its_constraint():
    from srum.loss import reward_term

    grids, sizes = RAGGED[0]
    velocity, target, constraint, maps = _batch(9, grids, sizes)
    for config in (LossConfig(), LossConfig(signed="hinge", margin=0.7)):
        reward_only = LossConfig(constraint="none", signed=config.signed, margin=config.margin)
        without = reference_loss(velocity, target, None, maps, grids, reward_only, num_tokens=20.0)
        torch.testing.assert_close(reward_term(velocity, target, maps, grids, config, num_tokens=20.0),
                                   without.detach(), **TIGHT)

