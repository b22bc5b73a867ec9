"""The constrained dense-reward flow-matching loss of SRUM behind one dispatcher.

``dense_reward_flow_loss`` picks an implementation: ``reference`` (plain, image by image: the ground truth),
``torch`` (vectorised over the ragged batch: the CPU path) or ``triton`` (the fused kernel of
``kernels/srum_kernels``: map sampling, weighted error and its gradient in one pass). ``auto`` takes the
fastest available one; an explicit request that cannot run raises. The environment variable ``SRUM_LOSS_IMPL``
forces a choice for ``auto`` calls.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

from srum.loss.config import LossConfig
from srum.loss.reference import reference_loss
from srum.loss.vectorised import reward_term, vectorised_loss

Impl = Literal["auto", "triton", "torch", "reference"]
IMPLS = ("auto", "triton", "torch", "reference")
DEFAULT_CONFIG = LossConfig()


def _check(velocity: Tensor, target: Tensor, constraint_target: Tensor | None, reward_maps: list[Tensor],
           grids: list[tuple[int, int]], config: LossConfig) -> None:
    tokens = sum(rows * cols for rows, cols in grids)
    if velocity.ndim != 2 or velocity.shape[0] != tokens or target.shape != velocity.shape:
        raise ValueError(f"velocity and target: expected ({tokens}, C) for grids {grids}, "
                         f"got {tuple(velocity.shape)} and {tuple(target.shape)}")
    if len(reward_maps) != len(grids):
        raise ValueError(f"reward_maps: expected one per image ({len(grids)}), got {len(reward_maps)}")
    needs_constraint = config.constraint != "none" and config.constraint_weight > 0
    if needs_constraint and (constraint_target is None or constraint_target.shape != velocity.shape):
        raise ValueError(f"constraint_target: expected a tensor like velocity for constraint={config.constraint!r}")
    if reward_maps:
        values = torch.cat([m.detach().reshape(-1) for m in reward_maps])
        low, high = (-1.0, 1.0) if config.signed == "hinge" else (0.0, 2.0)
        if not bool(torch.isfinite(values).all()) or values.min() < low or values.max() > high:
            raise ValueError(f"reward_maps: expected finite values in [{low}, {high}] for signed={config.signed!r}, "
                             f"got [{float(values.min())}, {float(values.max())}]")


def triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or anywhere in the Triton interpreter (``TRITON_INTERPRET=1``)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import srum_kernels.reward_flow  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: Impl, device: torch.device, maps_need_grad: bool = False) -> Impl:
    """The implementation to run: an explicit choice (or ``SRUM_LOSS_IMPL`` for ``auto``) must be able to run;
    ``auto`` takes Triton on CUDA tensors and the vectorised path elsewhere (and whenever the maps need a
    gradient, which the fused kernel does not give)."""
    if impl == "auto":
        impl = os.environ.get("SRUM_LOSS_IMPL", "auto")  # type: ignore[assignment]
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        if not triton_available(device):
            raise RuntimeError("loss impl 'triton': needs the triton package and CUDA tensors (or "
                               "TRITON_INTERPRET=1); use 'torch' or 'reference'")
        if maps_need_grad:
            raise RuntimeError("loss impl 'triton': the fused kernel gives no gradient for the reward maps; "
                               "use 'torch' or 'reference'")
        return impl
    if impl == "auto":
        return "triton" if device.type == "cuda" and not maps_need_grad and triton_available(device) else "torch"
    return impl


def _triton_loss(velocity: Tensor, target: Tensor, constraint_target: Tensor | None, reward_maps: list[Tensor],
                 grids: list[tuple[int, int]], config: LossConfig, num_tokens: float | None) -> Tensor:
    from srum_kernels.reward_flow import FusedRewardFlowLoss, RaggedLayout

    layout = RaggedLayout.build(reward_maps, grids, velocity.device)
    normaliser = float(velocity.shape[0] if num_tokens is None else num_tokens)
    weight = config.constraint_weight if config.constraint != "none" else 0.0
    return FusedRewardFlowLoss.apply(velocity, target, constraint_target, layout, weight,
                                     config.signed == "hinge", config.margin, normaliser)


def dense_reward_flow_loss(velocity: Tensor, target: Tensor, constraint_target: Tensor | None,
                           reward_maps: list[Tensor], grids: list[tuple[int, int]],
                           config: LossConfig = DEFAULT_CONFIG, num_tokens: float | None = None,
                           impl: Impl = "auto") -> Tensor:
    """``sum_i w(r_i, e_i) / N + lambda * sum_i mean_c (v_i - c_i)^2 / N`` over the loss tokens of a ragged batch.

    Args:
        velocity: (N, C) predicted velocities of the images' latent tokens (t > 0), image after image,
            row-major within an image.
        target: (N, C) ``noise - x0`` of the scored image.
        constraint_target: (N, C) the constraint's pull: ``noise - x0_good`` (``sample``) or a frozen reference
            model's velocity (``reference``); None for ``none``.
        reward_maps: per image a (Hm, Wm) map (any resolution), sampled bilinearly (align_corners=False) onto
            the image's token grid. Range: [0, 2] unsigned (official maps are in [0, 1]), [-1, 1] signed.
        grids: per image (rows, cols) of latent tokens.
        num_tokens: the normaliser N; default the number of tokens given (the official per-rank mean). A
            trainer passes the global token count to weight every token equally across ranks.
        impl: see the module docstring.
    """
    _check(velocity, target, constraint_target, reward_maps, grids, config)
    chosen = resolve_impl(impl, velocity.device, any(m.requires_grad for m in reward_maps))
    function = {"reference": reference_loss, "torch": vectorised_loss, "triton": _triton_loss}[chosen]
    return function(velocity, target, constraint_target, reward_maps, grids, config, num_tokens)


__all__ = ["Impl", "LossConfig", "dense_reward_flow_loss", "reference_loss", "reward_term", "vectorised_loss"]
