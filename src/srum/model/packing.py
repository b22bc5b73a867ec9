"""Packing samples into one sequence with BAGEL's split, position-id and label rules.

A sample is a list of items: text segments, ViT images (understanding) and VAE latent images (generation, clean
or noised). ``pack`` concatenates samples into a ``PackedBatch``: one 1-D token sequence plus the index tensors
that say where each modality lives, so that one forward serves samples of any mix and length without padding.

Rules (``bagel-architecture`` §6): each item is one split; text is ``causal``, ViT and clean VAE images are
``full``, noised VAE images are ``noise`` (seen by nobody else). Position ids count per sample from 0: text
tokens take consecutive ids, a whole image block (markers included) shares one id, and the counter advances by
one after a ViT or clean VAE image but not after a noised one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from srum.model.attention import AttnMode, PackedLayout
from srum.model.config import BagelConfig
from srum.model.patches import grid_position_ids, patchify
from srum.model.tokenizer import SpecialTokens


@dataclass
class Text:
    """A text segment ``<|im_start|> ids <|im_end|>``."""

    ids: list[int]
    loss: bool = False
    """Train next-token prediction on this segment (``<|im_start|>`` and each id predict the next token)."""
    eos_label: int | None = None
    """If set (with ``loss``), the ``<|im_end|>`` position learns to predict this token too."""
    wrap: bool = True
    """Add the ``<|im_start|>`` / ``<|im_end|>`` markers; False for raw tokens (text decoding, scoring)."""


@dataclass
class VitImage:
    """An image for the understanding path, (3, H, W) in [-1, 1] with sides multiples of the ViT patch."""

    image: Tensor


@dataclass
class VaeImage:
    """A clean latent image for the generation path, (C, h, w) with sides multiples of the latent patch.

    ``timestep`` None: a clean conditioning image (t = 0, ``full`` split). Otherwise the image is a loss target,
    noised to that flow time (``noise`` split) inside the forward.
    """

    latent: Tensor
    timestep: float | None = None


Item = Text | VitImage | VaeImage


@dataclass
class PackedBatch:
    """One packed sequence of length L. Index tensors are int64 positions into the sequence."""

    layout: PackedLayout
    position_ids: Tensor
    """(L,) RoPE positions."""
    text_ids: Tensor
    """(Nt,) token ids of text and image-marker tokens."""
    text_indexes: Tensor
    """(Nt,)"""
    vit_patches: Tensor
    """(Nv, patch*patch*3) patchified ViT pixels."""
    vit_position_ids: Tensor
    """(Nv,) ``row * patches_per_side + col``."""
    vit_indexes: Tensor
    """(Nv,)"""
    vit_seqlens: tuple[int, ...]
    """Tokens per ViT image."""
    latent_tokens: Tensor
    """(Nl, latent_channels) clean latent tokens x0."""
    latent_position_ids: Tensor
    """(Nl,) ``row * max_latent_size + col``."""
    latent_indexes: Tensor
    """(Nl,)"""
    latent_timesteps: Tensor
    """(Nl,) flow time per latent token; 0 for clean conditioning images."""
    latent_grids: tuple[tuple[int, int], ...]
    """(rows, cols) of latent tokens per VAE image, in packing order."""
    ce_indexes: Tensor
    """(Nce,) positions whose hidden state predicts ``ce_labels``."""
    ce_labels: Tensor
    """(Nce,)"""
    sample_ranges: tuple[tuple[int, int], ...] = field(default=())
    """[start, end) of each sample."""
    next_positions: tuple[int, ...] = field(default=())
    """Per sample, the position id a following item would take (what a KV-cache context carries on)."""

    @property
    def sequence_length(self) -> int:
        return int(self.position_ids.shape[0])

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device)
        return PackedBatch(**moved)


class _Builder:
    """Accumulates one packed sequence; ``pack`` drives it."""

    def __init__(self, config: BagelConfig, special: SpecialTokens) -> None:
        self.config, self.special = config, special
        self.length = 0
        self.positions: list[Tensor] = []
        self.text_ids: list[int] = []
        self.text_indexes: list[int] = []
        self.vit: dict[str, list] = {"patches": [], "position_ids": [], "indexes": [], "seqlens": []}
        self.latent: dict[str, list] = {"tokens": [], "position_ids": [], "indexes": [], "timesteps": [], "grids": []}
        self.ce_indexes: list[int] = []
        self.ce_labels: list[int] = []
        self.split_lens: list[int] = []
        self.attn_modes: list[AttnMode] = []

    def _marker(self, token: int) -> None:
        self.text_ids.append(token)
        self.text_indexes.append(self.length)
        self.length += 1

    def _image_block(self, num_tokens: int, position: int, mode: AttnMode) -> int:
        """Writes the markers around ``num_tokens`` image tokens; returns the index of the first image token."""
        self._marker(self.special.start_of_image)
        first = self.length
        self.length += num_tokens
        self._marker(self.special.end_of_image)
        self.positions.append(torch.full((num_tokens + 2,), position, dtype=torch.long))
        self.split_lens.append(num_tokens + 2)
        self.attn_modes.append(mode)
        return first

    def add_text(self, item: Text, position: int) -> int:
        ids = [self.special.bos_token_id, *item.ids, self.special.eos_token_id] if item.wrap else list(item.ids)
        start = self.length
        self.text_ids.extend(ids)
        self.text_indexes.extend(range(start, start + len(ids)))
        if item.loss:
            self.ce_indexes.extend(range(start, start + len(ids) - 1))
            self.ce_labels.extend(ids[1:])
            if item.eos_label is not None:
                self.ce_indexes.append(start + len(ids) - 1)
                self.ce_labels.append(item.eos_label)
        self.length += len(ids)
        self.positions.append(torch.arange(position, position + len(ids)))
        self.split_lens.append(len(ids))
        self.attn_modes.append("causal")
        return position + len(ids)

    def add_vit(self, item: VitImage, position: int) -> int:
        vit = self.config.vit
        patches = patchify(item.image, vit.patch_size)  # (h*w, p*p*3)
        rows, cols = item.image.shape[1] // vit.patch_size, item.image.shape[2] // vit.patch_size
        first = self._image_block(patches.shape[0], position, "full")
        self.vit["patches"].append(patches)
        self.vit["position_ids"].append(grid_position_ids(rows, cols, vit.num_patches_per_side))
        self.vit["indexes"].append(torch.arange(first, first + patches.shape[0]))
        self.vit["seqlens"].append(patches.shape[0])
        return position + 1

    def add_vae(self, item: VaeImage, position: int) -> int:
        patch = self.config.latent_patch_size
        tokens = patchify(item.latent, patch)  # (h*w, p*p*C)
        rows, cols = item.latent.shape[1] // patch, item.latent.shape[2] // patch
        noised = item.timestep is not None
        first = self._image_block(tokens.shape[0], position, "noise" if noised else "full")
        self.latent["tokens"].append(tokens)
        self.latent["position_ids"].append(grid_position_ids(rows, cols, self.config.max_latent_size))
        self.latent["indexes"].append(torch.arange(first, first + tokens.shape[0]))
        self.latent["timesteps"].append(torch.full((tokens.shape[0],), item.timestep if noised else 0.0))
        self.latent["grids"].append((rows, cols))
        return position if noised else position + 1

    def build(self, sample_lens: list[int], sample_ranges: list[tuple[int, int]], next_positions: list[int]
              ) -> PackedBatch:
        def cat(parts: list[Tensor], empty: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            return torch.cat(parts) if parts else torch.empty(empty, dtype=dtype)

        long = torch.long
        latent_dim = self.config.latent_channels
        vit_dim = self.config.vit.num_channels * self.config.vit.patch_size**2
        return PackedBatch(
            layout=PackedLayout(tuple(sample_lens), tuple(self.split_lens), tuple(self.attn_modes)),
            position_ids=cat(self.positions, (0,), long),
            text_ids=torch.tensor(self.text_ids, dtype=long),
            text_indexes=torch.tensor(self.text_indexes, dtype=long),
            vit_patches=cat(self.vit["patches"], (0, vit_dim), torch.float32),
            vit_position_ids=cat(self.vit["position_ids"], (0,), long),
            vit_indexes=cat(self.vit["indexes"], (0,), long),
            vit_seqlens=tuple(self.vit["seqlens"]),
            latent_tokens=cat(self.latent["tokens"], (0, latent_dim), torch.float32),
            latent_position_ids=cat(self.latent["position_ids"], (0,), long),
            latent_indexes=cat(self.latent["indexes"], (0,), long),
            latent_timesteps=cat(self.latent["timesteps"], (0,), torch.float32),
            latent_grids=tuple(self.latent["grids"]),
            ce_indexes=torch.tensor(self.ce_indexes, dtype=long),
            ce_labels=torch.tensor(self.ce_labels, dtype=long),
            sample_ranges=tuple(sample_ranges),
            next_positions=tuple(next_positions),
        )


def pack(samples: list[list[Item]], config: BagelConfig, special: SpecialTokens) -> PackedBatch:
    """Concatenate samples into one packed sequence (see the module docstring for the rules)."""
    builder = _Builder(config, special)
    sample_lens, sample_ranges, next_positions = [], [], []
    for index, sample in enumerate(samples):
        if not sample:
            raise ValueError(f"samples[{index}]: expected at least one item, got an empty sample")
        start, position = builder.length, 0
        for item in sample:
            if isinstance(item, Text):
                position = builder.add_text(item, position)
            elif isinstance(item, VitImage):
                position = builder.add_vit(item, position)
            elif isinstance(item, VaeImage):
                position = builder.add_vae(item, position)
            else:
                raise TypeError(f"samples[{index}]: expected Text, VitImage or VaeImage items, got {type(item)}")
        sample_lens.append(builder.length - start)
        sample_ranges.append((start, builder.length))
        next_positions.append(position)
    return builder.build(sample_lens, sample_ranges, next_positions)
