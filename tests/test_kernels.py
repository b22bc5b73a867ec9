"""The Triton kernels against the float64 reference, in the Triton interpreter on the CPU (real kernels on a
GPU): random ragged batches, odd sizes, poisoned outputs, loss and gradient, every option of the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from srum.loss import LossConfig, dense_reward_flow_loss, reference_loss
from srum.loss.bilinear import sample_maps
from srum_kernels.reward_flow import RaggedLayout, reward_flow_forward, sample_rewards

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype, rtol, atol, grad_rtol): the kernel accumulates in float32 against a float64 reference on the same
# (rounded) inputs: sums of ~1e3 O(1) terms, ~1e-6 relative. Through autograd the gradient comes back in the
# input's dtype, so bfloat16's 8-bit mantissa (relative rounding 2**-8) bounds that comparison.
TOLERANCES = [(torch.float32, 2e-5, 1e-6, 2e-5), (torch.bfloat16, 2e-5, 1e-6, 8e-3)]
# Odd grids and maps (not multiples of the block), a map smaller than its grid, a single token.
RAGGED = [
    ([(7, 37), (3, 5), (1, 1)], [(13, 17), (3, 5), (2, 3)]),
    ([(16, 16), (9, 4)], [(64, 64), (2, 2)]),
]


def _batch(grids, map_sizes, dtype, signed, seed=0, channels=20):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(r * c for r, c in grids)
    velocity, target, constraint = (torch.randn(tokens, channels, generator=generator).to(dtype)
                                    for _ in range(3))
    maps = [(torch.rand(size, generator=generator) * (2 if signed else 1) - (1 if signed else 0)) for size in map_sizes]
    return velocity, target, constraint, maps


@pytest.mark.parametrize("grids, map_sizes", RAGGED)
@pytest.mark.parametrize("dtype, rtol, atol, grad_rtol", TOLERANCES)
@pytest.mark.parametrize("config", [
    LossConfig(), LossConfig(constraint_weight=0.1), LossConfig(constraint="none"),
    LossConfig(constraint="reference", constraint_weight=2.0), LossConfig(signed="hinge", margin=1.5),
    LossConfig(signed="hinge", margin=0.5, constraint="none"),
], ids=["official", "lambda", "none", "reference", "hinge", "hinge-alone"])
def test_fused_loss_and_gradient_equal_the_reference(grids, map_sizes, dtype, rtol, atol, grad_rtol, config):
    velocity, target, constraint, maps = _batch(grids, map_sizes, dtype, config.signed == "hinge")
    constraint = None if config.constraint == "none" else constraint
    reference_velocity = velocity.double().requires_grad_(True)
    expected = reference_loss(reference_velocity, target.double(), None if constraint is None else constraint.double(),
                              [m.double() for m in maps], grids, config, num_tokens=41.0)
    (expected_grad,) = torch.autograd.grad(2.5 * expected, reference_velocity)

    layout = RaggedLayout.build(maps, grids, torch.device(DEVICE))
    poisoned = torch.full(velocity.shape, float("nan"), device=DEVICE)
    weight = 0.0 if config.constraint == "none" else config.constraint_weight
    loss, grad = reward_flow_forward(velocity.to(DEVICE), target.to(DEVICE),
                                     None if constraint is None else constraint.to(DEVICE), layout, weight,
                                     config.signed == "hinge", config.margin, 41.0, grad_out=poisoned)
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(2.5 * grad.double().cpu(), expected_grad, rtol=rtol, atol=atol)

    through_autograd = velocity.to(DEVICE).requires_grad_(True)
    dispatched = dense_reward_flow_loss(through_autograd, target.to(DEVICE),
                                        None if constraint is None else constraint.to(DEVICE),
                                        [m.to(DEVICE) for m in maps], grids, config, num_tokens=41.0, impl="triton")
    (2.5 * dispatched).backward()
    assert through_autograd.grad.dtype == dtype
    torch.testing.assert_close(through_autograd.grad.double().cpu(), expected_grad, rtol=grad_rtol, atol=atol)


@pytest.mark.parametrize("grids, map_sizes", RAGGED)
def test_sampling_kernel_equals_f_interpolate(grids, map_sizes):
    _, _, _, maps = _batch(grids, map_sizes, torch.float32, signed=False, seed=3)
    out = torch.full((sum(r * c for r, c in grids),), float("nan"), device=DEVICE)
    ours = sample_rewards([m.to(DEVICE) for m in maps], grids, out=out).cpu()
    expected = torch.cat([F.interpolate(m[None, None], size=g, mode="bilinear", align_corners=False).flatten()
                          for m, g in zip(maps, grids, strict=True)])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, sample_maps(maps, grids), rtol=0, atol=1e-6)


def test_dispatcher_refuses_triton_for_maps_that_need_a_gradient():
    velocity, target, constraint, maps = _batch([(2, 2)], [(4, 4)], torch.float32, signed=False)
    maps[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="no gradient for the reward maps"):
        dense_reward_flow_loss(velocity, target, constraint, maps, [(2, 2)], impl="triton")
    assert dense_reward_flow_loss(velocity, target, constraint, maps, [(2, 2)]).requires_grad  # auto: torch path


def test_training_with_the_fused_loss_follows_the_reference(tmp_path, monkeypatch):
    """A few optimizer steps of a tiny model: per-step losses and final weights agree between implementations."""
    from srum.cli import main
    from srum.objectives import Candidates
    from srum.train.module import SRUMModule

    main(["model", "init", "--preset", "tiny", "--out", str(tmp_path), "--seed", "0"])
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(12, 6, 4, generator=generator) for _ in range(3)]
    maps = [torch.rand(3, 2, generator=generator) for _ in range(3)]
    results = {}
    for impl in ("reference", "triton"):
        monkeypatch.setenv("SRUM_LOSS_IMPL", impl)
        module = SRUMModule(tmp_path, text_dropout=0.0)
        module.configure_model()
        torch.nn.init.normal_(module.model.llm2vae.weight, std=0.05, generator=torch.Generator().manual_seed(1))
        optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for step in range(3):
            optimizer.zero_grad()
            loss, _ = module.objective.step(module.policy(step), Candidates(["a", "b c", "d"], latents, maps, []), 0,
                                            lambda loss: loss.backward())
            optimizer.step()
            losses.append(float(loss))
        results[impl] = (losses, module.model.state_dict())
    assert results["triton"][0] == pytest.approx(results["reference"][0], rel=1e-5)
    for name, tensor in results["reference"][1].items():
        torch.testing.assert_close(results["triton"][1][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
