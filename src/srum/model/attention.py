"""Packed attention over a 1-D sequence of several samples, with BAGEL's split/mode masks (architecture §6.3).

A packed sequence concatenates samples; each sample is a run of splits, each split has a mode:

- ``causal`` (text): a query sees every earlier visible split of its sample and its own split up to itself;
- ``full`` (ViT or clean VAE image): like causal, but sees its whole own split;
- ``noise`` (noised VAE target): like full for its own queries, but its keys are hidden from every other split,
  so no later token ever sees noised latents.

One entry point, :func:`packed_attention`, runs the same semantics on three backends:

- ``sdpa``: the reference. Per sample, SDPA with the dense additive mask of :func:`dense_masks` (BAGEL's dense
  training path). Runs anywhere; memory grows with the square of the longest sample.
- ``flex``: ``flex_attention`` with a block-sparse ``BlockMask`` built from per-token sample/split/mode tables
  (BAGEL's flex path). Compiled on CUDA; eager elsewhere, where it materialises the scores (tests only).
- ``xformers``: CUDA only. The mask is decomposed by query split into two block-diagonal varlen problems (see
  :func:`varlen_plan`), which xformers' memory-efficient kernel solves without any dense mask.

Masks, block masks and varlen plans depend only on the layout, so they are cached per (layout, device) and
reused by every layer of a forward pass.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

AttnMode = Literal["causal", "full", "noise"]
Backend = Literal["sdpa", "flex", "xformers"]
ATTN_MODES: tuple[AttnMode, ...] = ("causal", "full", "noise")
BACKENDS: tuple[Backend, ...] = ("sdpa", "flex", "xformers")
XFORMERS_ERROR = "attention backend 'xformers' needs the xformers package and CUDA tensors; use 'sdpa' or 'flex'"


class TokenTables(NamedTuple):
    """Per-token facts the mask rule needs, each shaped (L,)."""

    sample_ids: Tensor  # int64, index of the token's sample
    split_ids: Tensor  # int64, global index of the token's split (splits are numbered in packed order)
    is_noise: Tensor  # bool, the token's split is `noise`
    is_causal: Tensor  # bool, the token's split is `causal`

    def to(self, device: torch.device) -> TokenTables:
        return TokenTables(*(t.to(device) for t in self))


@dataclass(frozen=True)
class PackedLayout:
    """Structure of a packed sequence: samples, each a run of consecutive splits with an attention mode.

    Lists are accepted and stored as tuples, so a layout is hashable and keys the mask caches.
    """

    sample_lens: tuple[int, ...]
    """Length of each sample, in packed order."""
    split_lens: tuple[int, ...]
    """Length of each split over all samples, in packed order; each sample's splits sum to its length."""
    attn_modes: tuple[AttnMode, ...]
    """Mode of each split: ``causal``, ``full`` or ``noise``."""

    def __post_init__(self) -> None:
        for name in ("sample_lens", "split_lens"):
            lens = tuple(int(n) for n in getattr(self, name))
            if not lens or min(lens) < 1:
                raise ValueError(f"{name}: expected a non-empty sequence of positive lengths, got {lens}")
            object.__setattr__(self, name, lens)
        modes = tuple(self.attn_modes)
        if len(modes) != len(self.split_lens):
            raise ValueError(f"attn_modes: expected one mode per split ({len(self.split_lens)}), got {len(modes)}")
        if bad := [m for m in modes if m not in ATTN_MODES]:
            raise ValueError(f"attn_modes: expected each of {ATTN_MODES}, got {bad}")
        object.__setattr__(self, "attn_modes", modes)
        if sum(self.split_lens) != sum(self.sample_lens):
            raise ValueError(
                f"split_lens: expected a total of {sum(self.sample_lens)} (sum of sample_lens), "
                f"got {sum(self.split_lens)}"
            )
        # Each sample must end exactly on a split boundary.
        boundaries = {end for _, end in self.split_bounds}
        if inside := [end for _, end in self.sample_bounds if end not in boundaries]:
            raise ValueError(
                f"split_lens: expected each sample's splits to sum to its length (sample_lens {self.sample_lens}), "
                f"but sample ends {inside} fall inside a split of {self.split_lens}"
            )

    @functools.cached_property
    def total_len(self) -> int:
        """Packed sequence length L."""
        return sum(self.sample_lens)

    @functools.cached_property
    def sample_bounds(self) -> tuple[tuple[int, int], ...]:
        """(start, end) of each sample in the packed sequence."""
        return tuple(itertools.pairwise(itertools.accumulate(self.sample_lens, initial=0)))

    @functools.cached_property
    def split_bounds(self) -> tuple[tuple[int, int], ...]:
        """(start, end) of each split in the packed sequence."""
        return tuple(itertools.pairwise(itertools.accumulate(self.split_lens, initial=0)))

    @functools.cached_property
    def sample_split_ranges(self) -> tuple[range, ...]:
        """Global split indexes of each sample, e.g. ``(range(0, 2), range(2, 5))``."""
        split_after = {end: i + 1 for i, (_, end) in enumerate(self.split_bounds)}
        firsts = (0, *(split_after[end] for _, end in self.sample_bounds))
        return tuple(range(first, last) for first, last in itertools.pairwise(firsts))

    @functools.cached_property
    def tables(self) -> TokenTables:
        """Per-token sample id, split id, is-noise and is-causal (CPU; use ``.to(device)``)."""
        split_lens = torch.tensor(self.split_lens)
        split_sample = torch.tensor([s for s, splits in enumerate(self.sample_split_ranges) for _ in splits])
        modes = self.attn_modes
        return TokenTables(
            sample_ids=split_sample.repeat_interleave(split_lens),
            split_ids=torch.arange(len(modes)).repeat_interleave(split_lens),
            is_noise=torch.tensor([m == "noise" for m in modes]).repeat_interleave(split_lens),
            is_causal=torch.tensor([m == "causal" for m in modes]).repeat_interleave(split_lens),
        )


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _visible(t: TokenTables, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """The §6.3 rule for broadcastable packed indexes: may query ``q_idx`` attend to key ``kv_idx``?

    Written with tensor ops only, so it serves as the dense-mask builder and, unchanged, as flex's mask_mod.
    """
    q_split, k_split = t.split_ids[q_idx], t.split_ids[kv_idx]
    earlier_visible = (k_split < q_split) & ~t.is_noise[kv_idx]
    own_split = (k_split == q_split) & (~t.is_causal[q_idx] | (kv_idx <= q_idx))
    return (t.sample_ids[q_idx] == t.sample_ids[kv_idx]) & (earlier_visible | own_split)


def allowed_mask(layout: PackedLayout, device: torch.device | str | None = None) -> Tensor:
    """(L, L) bool over the whole packed sequence, True where the query (row) may see the key (column).

    A reference for tests and debugging; the backends never build it.
    """
    t = layout.tables.to(_device(device))
    idx = torch.arange(layout.total_len, device=t.sample_ids.device)
    return _visible(t, idx[:, None], idx[None, :])


def dense_masks(
    layout: PackedLayout, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> list[Tensor]:
    """Per sample, the additive (Ls, Ls) mask BAGEL's dense path feeds SDPA: 0 where allowed, -inf where blocked.

    Equal to the official ``prepare_attention_mask_per_sample`` output (checked against the recorded fixture).
    """
    t = layout.tables.to(_device(device))
    masks = []
    for start, end in layout.sample_bounds:
        idx = torch.arange(start, end, device=t.sample_ids.device)
        blocked = ~_visible(t, idx[:, None], idx[None, :])  # (Ls, Ls)
        masks.append(torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, -math.inf))
    return masks


@functools.lru_cache(maxsize=2)
def _cached_dense_masks(layout: PackedLayout, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    # One mask set shared by all layers: besides saving the rebuild, autograd then saves one mask per sample
    # instead of one per layer. Two entries cover alternating layouts (e.g. CFG branches) without pinning more.
    return tuple(dense_masks(layout, dtype, device))


def flex_block_mask(layout: PackedLayout, device: torch.device | str | None = None, block_size: int = 128) -> BlockMask:
    """The ``BlockMask`` of a layout for ``flex_attention``, built once per (layout, device, block size).

    BAGEL's flex path uses block size 128. Building evaluates the mask rule over all (L, L) pairs, so the cache
    is what makes per-layer calls cheap.
    """
    return _flex_block_mask(layout, _device(device), block_size)


@functools.lru_cache(maxsize=8)
def _flex_block_mask(layout: PackedLayout, device: torch.device, block_size: int) -> BlockMask:
    t = layout.tables.to(device)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return _visible(t, q_idx, kv_idx)

    n = layout.total_len
    return create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=block_size)


@functools.cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    # flex_attention only becomes a fused kernel under torch.compile; eager computes the full score matrix.
    # Default dynamic shapes: a second packed length recompiles once with L symbolic instead of once per length.
    return torch.compile(flex_attention)


class VarlenGroup(NamedTuple):
    """Query splits that share one kind of block-diagonal mask, as variable-length segments.

    Segment s has ``q_seqlens[s]`` queries and ``kv_seqlens[s]`` gathered keys, consecutive in the gathered order.
    """

    q_index: Tensor  # (Nq,) int64 packed positions of the queries, segment after segment
    kv_index: Tensor  # (Nk,) int64 packed positions of the gathered keys/values, segment after segment
    q_seqlens: tuple[int, ...]
    kv_seqlens: tuple[int, ...]


class VarlenPlan(NamedTuple):
    """The §6.3 mask rewritten as two varlen attentions that need no dense mask.

    Query split i gathers the keys of the earlier non-noise splits of its sample, then its own keys. Every
    query sees all gathered earlier keys, so a ``causal`` split needs only a bottom-right-aligned causal mask
    (query r of Lq sees gathered key c iff c <= r + Lk - Lq) and a ``full``/``noise`` split none at all.
    Gathered keys cost sum over splits of the visible prefix length: cheap for BAGEL's few-split samples.
    """

    causal: VarlenGroup  # bottom-right causal segments
    full: VarlenGroup  # unmasked segments (full and noise splits)
    inverse: Tensor  # (L,) int64: cat(out_causal, out_full)[inverse] is in packed order


VarlenKernel = Callable[[Tensor, Tensor, Tensor, VarlenGroup, bool, float | None], Tensor]


def varlen_plan(layout: PackedLayout, device: torch.device | str | None = None) -> VarlenPlan:
    """The varlen decomposition of a layout (pure torch, cached per (layout, device))."""
    return _varlen_plan(layout, _device(device))


@functools.lru_cache(maxsize=8)
def _varlen_plan(layout: PackedLayout, device: torch.device) -> VarlenPlan:
    positions = [torch.arange(start, end) for start, end in layout.split_bounds]
    segments: dict[bool, list[tuple[Tensor, list[Tensor]]]] = {True: [], False: []}  # causal? -> (queries, keys)
    for splits in layout.sample_split_ranges:
        for i in splits:
            keys = [positions[j] for j in range(splits.start, i) if layout.attn_modes[j] != "noise"]
            segments[layout.attn_modes[i] == "causal"].append((positions[i], [*keys, positions[i]]))

    def group(segs: list[tuple[Tensor, list[Tensor]]]) -> VarlenGroup:
        queries = [q for q, _ in segs]
        keys = [k for _, ks in segs for k in ks]
        return VarlenGroup(
            q_index=torch.cat(queries or [torch.empty(0, dtype=torch.long)]).to(device),
            kv_index=torch.cat(keys or [torch.empty(0, dtype=torch.long)]).to(device),
            q_seqlens=tuple(len(q) for q in queries),
            kv_seqlens=tuple(sum(len(k) for k in ks) for _, ks in segs),
        )

    causal, full = group(segments[True]), group(segments[False])
    return VarlenPlan(causal, full, torch.argsort(torch.cat([causal.q_index, full.q_index])))


def packed_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, backend: Backend = "sdpa", scale: float | None = None
) -> Tensor:
    """Attention over a packed sequence with BAGEL's masks (§6.3), on the chosen backend.

    Args:
        q: (L, Hq, D) queries of all samples, in packed order.
        k, v: (L, Hkv, D) keys and values, Hq % Hkv == 0. Grouped-query attention: KV head m serves query heads
            m*g ... m*g+g-1 with g = Hq / Hkv (``repeat_interleave`` order, as Qwen2 does).
        layout: the samples, splits and modes of the sequence.
        backend: ``sdpa`` (reference, any device), ``flex`` (any device, compiled on CUDA), ``xformers`` (CUDA).
            An explicit backend that cannot run raises; there is no silent fallback.
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        (L, Hq, D) in q's dtype.
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or v.shape != k.shape:
        raise ValueError(
            f"expected q (L, Hq, D) and k, v (L, Hkv, D), "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    n, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
    if n != layout.total_len:
        raise ValueError(f"expected L = {layout.total_len} tokens (the layout's total length), got {n}")
    if hq % hkv:
        raise ValueError(f"expected query heads ({hq}) to be a multiple of key/value heads ({hkv})")
    if backend == "sdpa":
        return _sdpa_attention(q, k, v, layout, scale)
    if backend == "flex":
        return _flex_attention(q, k, v, layout, scale)
    if backend == "xformers":
        return _xformers_attention(q, k, v, layout, scale)
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(L, Hkv, D) -> (L, Hkv * groups, D), KV head m repeated for query heads m*groups ... m*groups+groups-1."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, scale: float | None) -> Tensor:
    # KV heads are expanded explicitly: with an explicit mask on CUDA, `enable_gqa` can push SDPA to the math
    # backend, which would materialise (Hq, Ls, Ls) scores.
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)  # (L, Hq, D)
    masks = _cached_dense_masks(layout, q.dtype, q.device)
    outs = []
    for (start, end), mask in zip(layout.sample_bounds, masks, strict=True):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # (Hq, Ls, D)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)  # (Hq, Ls, D)
        outs.append(out.transpose(0, 1))  # (Ls, Hq, D)
    return torch.cat(outs)  # (L, Hq, D)


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, scale: float | None) -> Tensor:
    block_mask = flex_block_mask(layout, q.device)
    attend = _compiled_flex_attention() if q.is_cuda else flex_attention
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # (1, H, L, D)
    out = attend(qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)  # (L, Hq, D)


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: VarlenPlan, kernel: VarlenKernel, scale: float | None = None
) -> Tensor:
    """Runs a :class:`VarlenPlan` with a block-diagonal varlen kernel: gather, attend per group, restore order.

    Split from the xformers backend so the gather/GQA/scatter plumbing runs on the CPU with a reference kernel.

    Args:
        q: (L, Hq, D); k, v: (L, Hkv, D), grouped as in :func:`packed_attention`.
        kernel: ``kernel(q, k, v, group, causal, scale)`` with q (Nq, Hq, D) and k, v (Nk, Hq, D) gathered for
            ``group``; returns (Nq, Hq, D). ``causal`` asks for bottom-right-aligned causal segments.

    Returns:
        (L, Hq, D).
    """
    groups = q.shape[1] // k.shape[1]
    outs = []
    for group, causal in ((plan.causal, True), (plan.full, False)):
        if not group.q_seqlens:
            continue
        kg, vg = (_repeat_kv(x[group.kv_index], groups) for x in (k, v))  # (Nk, Hq, D)
        outs.append(kernel(q[group.q_index], kg, vg, group, causal, scale))  # (Nq, Hq, D)
    return torch.cat(outs)[plan.inverse]  # (L, Hq, D)


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, scale: float | None) -> Tensor:
    try:
        from xformers.ops import fmha
    except ImportError:
        raise RuntimeError(XFORMERS_ERROR) from None
    if not q.is_cuda:
        raise RuntimeError(XFORMERS_ERROR)

    def kernel(q: Tensor, k: Tensor, v: Tensor, group: VarlenGroup, causal: bool, scale: float | None) -> Tensor:
        bias_type = (
            fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask if causal else fmha.attn_bias.BlockDiagonalMask
        )
        bias = bias_type.from_seqlens(list(group.q_seqlens), list(group.kv_seqlens))
        # xformers takes (B, M, H, K) with the varlen segments concatenated along M of a batch of one.
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]

    return varlen_attention(q, k, v, varlen_plan(layout, q.device), kernel, scale)
