"""SigLIP-NaViT: the vision encoder of the understanding path, over packed variable-size images.

Images of any size are cut into patches (``srum.model.patches``) and concatenated; each image attends only to
itself. Positions come from a learned table indexed by ``row * patches_per_side + col``. Only the layers up to
``select_layer`` are built, followed by ``post_layernorm``, as the official model does.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from srum.model.attention import Backend, PackedLayout, packed_attention
from srum.model.config import ViTConfig


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        patch_dim = config.num_channels * config.patch_size**2
        # A Conv2d(k = stride = patch) in the original encoder; stored as the equivalent Linear over patchified
        # pixels (see ``conv_patch_weight_to_linear``).
        self.patch_embedding = nn.Linear(patch_dim, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches_per_side**2, config.hidden_size)

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, dim // config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, layout: PackedLayout, backend: Backend) -> Tensor:
        length = x.shape[0]
        heads = (length, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(heads), self.k_proj(x).view(heads), self.v_proj(x).view(heads)  # (N, H, D)
        out = packed_attention(q, k, v, layout, backend=backend)  # (N, H, D)
        return self.out_proj(out.reshape(length, -1))


class SiglipMLP(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: Tensor, layout: PackedLayout, backend: Backend) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), layout, backend)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.layers_built))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, patches: Tensor, position_ids: Tensor, seqlens: tuple[int, ...],
                backend: Backend = "sdpa") -> Tensor:
        """Args: patches (N, patch*patch*3) of several images; position_ids (N,); seqlens: tokens per image.
        Returns (N, hidden): the selected layer's output after ``post_layernorm``."""
        seqlens = tuple(seqlens)
        layout = PackedLayout(sample_lens=seqlens, split_lens=seqlens, attn_modes=("full",) * len(seqlens))
        x = self.embeddings(patches, position_ids)
        for layer in self.encoder.layers:
            x = layer(x, layout, backend)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    """Wrapper that gives the checkpoint names their ``vision_model.`` prefix."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.vision_model = SiglipVisionTransformer(config)

    def forward(self, patches: Tensor, position_ids: Tensor, seqlens: tuple[int, ...],
                backend: Backend = "sdpa") -> Tensor:
        return self.vision_model(patches, position_ids, seqlens, backend)


def conv_patch_weight_to_linear(weight: Tensor) -> Tensor:
    """A Conv2d patch-embedding weight (hidden, C, p, p) as the Linear weight (hidden, p*p*C) over patchified
    pixels: column ``(p_row * p + p_col) * C + c``."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
