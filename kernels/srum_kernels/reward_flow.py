"""Fused dense-reward flow loss and reward-map sampling for ragged batches of images.

Per latent token i of image b (token grid rows x cols, reward map H x W, row-major tokens)::

    r_i = bilinear(map_b, (row(i) + 0.5) * H / rows - 0.5, (col(i) + 0.5) * W / cols - 0.5)   # clamped at 0
    e_i = mean_c (v_ic - t_ic)^2,   k_i = mean_c (v_ic - c_ic)^2
    L   = (sum_i w(r_i, e_i) + lambda * sum_i k_i) / N
    w(r, e) = r e                                (unsigned)
            = max(r, 0) e + max(-r, 0) relu(tau - e)   (hinge)

The forward kernel also writes dL/dv = 2 / (C N) * (a_i (v - t) + lambda (v - c)) with a_i = r_i, or for the
hinge a_i = r_i where r_i >= 0 or e_i < tau and 0 otherwise, so backward is one scale by the upstream gradient.
Sample points follow ``F.interpolate(mode="bilinear", align_corners=False)`` exactly; no per-token weight tensor
is ever written by the loss kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_TOKENS = 32


@triton.jit
def _bilinear_reward(maps_ptr, local, rows, cols, map_offset, height, width):
    """Reward at tokens ``local`` (BLOCK_T,) of one image, from its map in the flat ``maps`` buffer."""
    row = local // cols
    col = local % cols
    src_y = tl.maximum((row.to(tl.float32) + 0.5) * (height.to(tl.float32) / rows.to(tl.float32)) - 0.5, 0.0)
    src_x = tl.maximum((col.to(tl.float32) + 0.5) * (width.to(tl.float32) / cols.to(tl.float32)) - 0.5, 0.0)
    y0 = tl.minimum(src_y.to(tl.int32), height - 1)
    x0 = tl.minimum(src_x.to(tl.int32), width - 1)
    y1 = tl.minimum(y0 + 1, height - 1)
    x1 = tl.minimum(x0 + 1, width - 1)
    wy = src_y - y0.to(tl.float32)
    wx = src_x - x0.to(tl.float32)
    base = maps_ptr + map_offset
    m00 = tl.load(base + y0 * width + x0).to(tl.float32)
    m01 = tl.load(base + y0 * width + x1).to(tl.float32)
    m10 = tl.load(base + y1 * width + x0).to(tl.float32)
    m11 = tl.load(base + y1 * width + x1).to(tl.float32)
    return (1.0 - wy) * ((1.0 - wx) * m00 + wx * m01) + wy * ((1.0 - wx) * m10 + wx * m11)


@triton.jit
def _block_rewards(pid, maps_ptr, block_image_ptr, block_start_ptr, token_offset_ptr, rows_ptr, cols_ptr,
                   map_offset_ptr, height_ptr, width_ptr, BLOCK_T: tl.constexpr):
    """Program ``pid``'s tokens: packed indexes (BLOCK_T,) (masked lanes point at the image's first token), the
    mask of real tokens, and their rewards."""
    image = tl.load(block_image_ptr + pid)
    rows, cols = tl.load(rows_ptr + image), tl.load(cols_ptr + image)
    local = tl.load(block_start_ptr + pid) + tl.arange(0, BLOCK_T)
    token_mask = local < rows * cols
    local = tl.where(token_mask, local, 0)
    reward = _bilinear_reward(maps_ptr, local, rows, cols, tl.load(map_offset_ptr + image),
                              tl.load(height_ptr + image), tl.load(width_ptr + image))
    return tl.load(token_offset_ptr + image) + local, token_mask, reward


@triton.jit
def _fwd_kernel(v_ptr, t_ptr, c_ptr, maps_ptr, grad_ptr, partial_ptr, block_image_ptr, block_start_ptr,
                token_offset_ptr, rows_ptr, cols_ptr, map_offset_ptr, height_ptr, width_ptr,
                channels, grad_scale, constraint_weight, margin, stride_v, stride_t, stride_c, stride_g,
                HAS_CONSTRAINT: tl.constexpr, HINGE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: BLOCK_T tokens of one image x all channels. Writes this block's loss sum (unnormalised)
    to ``partial[pid]`` and dL/dv for its tokens."""
    pid = tl.program_id(0)
    token, token_mask, reward = _block_rewards(pid, maps_ptr, block_image_ptr, block_start_ptr, token_offset_ptr,
                                               rows_ptr, cols_ptr, map_offset_ptr, height_ptr, width_ptr, BLOCK_T)
    channel = tl.arange(0, BLOCK_C)
    mask = token_mask[:, None] & (channel < channels)[None, :]
    v = tl.load(v_ptr + token[:, None] * stride_v + channel[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + token[:, None] * stride_t + channel[None, :], mask=mask, other=0.0).to(tl.float32)
    diff = v - t
    error = tl.sum(diff * diff, axis=1) / channels
    if HINGE:
        active = error < margin
        contribution = tl.maximum(reward, 0.0) * error + tl.maximum(-reward, 0.0) * tl.where(active, margin - error,
                                                                                             0.0)
        slope = tl.where((reward >= 0.0) | active, reward, 0.0)
    else:
        contribution = reward * error
        slope = reward
    grad = slope[:, None] * diff
    if HAS_CONSTRAINT:
        c = tl.load(c_ptr + token[:, None] * stride_c + channel[None, :], mask=mask, other=0.0).to(tl.float32)
        pull = v - c
        contribution += constraint_weight * tl.sum(pull * pull, axis=1) / channels
        grad += constraint_weight * pull
    tl.store(partial_ptr + pid, tl.sum(tl.where(token_mask, contribution, 0.0), axis=0))
    tl.store(grad_ptr + token[:, None] * stride_g + channel[None, :], grad * grad_scale, mask=mask)


@triton.jit
def _sample_kernel(maps_ptr, out_ptr, block_image_ptr, block_start_ptr, token_offset_ptr, rows_ptr, cols_ptr,
                   map_offset_ptr, height_ptr, width_ptr, BLOCK_T: tl.constexpr):
    """Per-token rewards of BLOCK_T tokens of one image (for consumers that want the weights themselves)."""
    pid = tl.program_id(0)
    token, token_mask, reward = _block_rewards(pid, maps_ptr, block_image_ptr, block_start_ptr, token_offset_ptr,
                                               rows_ptr, cols_ptr, map_offset_ptr, height_ptr, width_ptr, BLOCK_T)
    tl.store(out_ptr + token, reward, mask=token_mask)


@dataclass
class RaggedLayout:
    """Where each image's tokens and map live, and which image each program block serves (int32, small)."""

    maps: Tensor  # (sum H*W,) float32, maps concatenated
    token_offset: Tensor
    rows: Tensor
    cols: Tensor
    map_offset: Tensor
    height: Tensor
    width: Tensor
    block_image: Tensor
    block_start: Tensor
    tokens: int

    @classmethod
    def build(cls, reward_maps: list[Tensor], grids: list[tuple[int, int]], device: torch.device) -> RaggedLayout:
        counts = torch.tensor([rows * cols for rows, cols in grids])
        sizes = torch.tensor([m.numel() for m in reward_maps])
        blocks = (counts + BLOCK_TOKENS - 1) // BLOCK_TOKENS
        block_image = torch.repeat_interleave(torch.arange(len(grids)), blocks)
        block_start = (torch.arange(int(blocks.sum())) - torch.repeat_interleave(blocks.cumsum(0) - blocks, blocks))

        def ints(values: Tensor) -> Tensor:
            return values.to(device=device, dtype=torch.int32)

        return cls(
            maps=torch.cat([m.reshape(-1) for m in reward_maps]).to(device=device, dtype=torch.float32),
            token_offset=ints(counts.cumsum(0) - counts), rows=ints(torch.tensor([r for r, _ in grids])),
            cols=ints(torch.tensor([c for _, c in grids])), map_offset=ints(sizes.cumsum(0) - sizes),
            height=ints(torch.tensor([m.shape[0] for m in reward_maps])),
            width=ints(torch.tensor([m.shape[1] for m in reward_maps])),
            block_image=ints(block_image), block_start=ints(block_start * BLOCK_TOKENS), tokens=int(counts.sum()))

    @property
    def tables(self) -> tuple[Tensor, ...]:
        return (self.block_image, self.block_start, self.token_offset, self.rows, self.cols, self.map_offset,
                self.height, self.width)


def reward_flow_forward(velocity: Tensor, target: Tensor, constraint: Tensor | None, layout: RaggedLayout,
                        constraint_weight: float, hinge: bool, margin: float, num_tokens: float,
                        grad_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Launch the fused kernel. Returns the loss (0-d float32) and dL/dv (N, C) float32 (into ``grad_out`` if
    given). Inputs may be float32 or bfloat16; accumulation is float32."""
    velocity, target = velocity.contiguous(), target.contiguous()
    has_constraint = constraint is not None and constraint_weight != 0.0
    constraint = constraint.contiguous() if has_constraint else velocity
    tokens, channels = velocity.shape
    grad = grad_out if grad_out is not None else torch.empty(tokens, channels, device=velocity.device,
                                                               dtype=torch.float32)
    blocks = layout.block_image.numel()
    partial = torch.empty(blocks, device=velocity.device, dtype=torch.float32)
    _fwd_kernel[(blocks,)](
        velocity, target, constraint, layout.maps, grad, partial, *layout.tables, channels,
        2.0 / (channels * num_tokens), float(constraint_weight), float(margin), velocity.stride(0),
        target.stride(0), constraint.stride(0), grad.stride(0), HAS_CONSTRAINT=has_constraint, HINGE=hinge,
        BLOCK_T=BLOCK_TOKENS, BLOCK_C=triton.next_power_of_2(channels))
    return partial.sum() / num_tokens, grad


def sample_rewards(reward_maps: list[Tensor], grids: list[tuple[int, int]], device: torch.device | None = None,
                   out: Tensor | None = None) -> Tensor:
    """Per-token rewards (sum rows*cols,) float32, identical to ``F.interpolate`` of each map, row-major."""
    device = device or reward_maps[0].device
    layout = RaggedLayout.build(reward_maps, grids, device)
    out = out if out is not None else torch.empty(layout.tokens, device=device, dtype=torch.float32)
    _sample_kernel[(layout.block_image.numel(),)](layout.maps, out, *layout.tables, BLOCK_T=BLOCK_TOKENS)
    return out


class FusedRewardFlowLoss(torch.autograd.Function):
    """Gradient computed in forward (Liger's way); backward scales it by the upstream gradient. Only the
    prediction receives a gradient: targets, constraint targets and maps are data."""

    @staticmethod
    def forward(ctx, velocity: Tensor, target: Tensor, constraint: Tensor | None, layout: RaggedLayout,
                constraint_weight: float, hinge: bool, margin: float, num_tokens: float) -> Tensor:
        loss, grad = reward_flow_forward(velocity, target, constraint, layout, constraint_weight, hinge, margin,
                                         num_tokens)
        ctx.save_for_backward(grad)
        ctx.velocity_dtype = velocity.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.velocity_dtype), None, None, None, None, None, None, None
