"""What autograd keeps for backward, counted by running srum's own modules on the meta device: shapes at the
configured sizes, no memory. Attention saves what CUDA's memory-efficient SDPA kernel saves (the kernel srum's
``sdpa`` backend reaches on a GPU with BAGEL's masks): queries, keys and values with the KV heads repeated,
the output, the float32 log-sum-exp and the sample's additive mask."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from srum.model.attention import PackedLayout, _repeat_kv, dense_masks
from srum.model.config import LLMConfig
from srum.model.qwen2 import DecoderLayer, ExpertRouting


def saved_bytes(run: Callable[[], Tensor], exclude: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while ``run`` executes, those of ``exclude`` left out:
    weights (FSDP frees gathered weights after forward and gathers them again for backward) and tensors every
    layer shares (the attention masks)."""
    parameters = {tensor.untyped_storage()._cdata for tensor in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def _efficient_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, masks: list[Tensor]) -> Tensor:
    """Per sample, the memory-efficient SDPA kernel with the dense mask (shapes only on the meta device)."""
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    outs = []
    for (start, end), mask in zip(layout.sample_bounds, masks, strict=True):
        qs, ks, vs = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))  # (1, Hq, Ls, D)
        bias = mask[None, None].expand(1, q.shape[1], *mask.shape)
        out = torch.ops.aten._scaled_dot_product_efficient_attention(qs, ks, vs, bias, True)[0]
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def decoder_layer_bytes(config: LLMConfig, text_tokens: int, image_tokens: int, images: int,
                        dtype: torch.dtype) -> int:
    """Bytes one decoder layer saves for backward on a packed batch of ``images`` training samples, each its
    prompt (understanding expert) then its noised image tokens (generation expert). The masks, which every
    layer shares, are left out: :func:`mask_bytes` counts them once."""
    sample = text_tokens + image_tokens
    length = sample * images
    with torch.device("meta"):
        layer = DecoderLayer(config).to(dtype).train()
        x = torch.empty(length, config.hidden_size, dtype=dtype, requires_grad=True)
        cos = sin = torch.empty(length, config.head_dim, dtype=dtype)
        positions = torch.arange(length).view(images, sample)
        routing = ExpertRouting(und=positions[:, :text_tokens].flatten(), gen=positions[:, text_tokens:].flatten())
    layout = PackedLayout([sample] * images, [text_tokens, image_tokens] * images, ["causal", "noise"] * images)
    masks = dense_masks(layout, dtype, "meta")
    attend = lambda q, k, v: _efficient_attention(q, k, v, layout, masks)  # noqa: E731
    return saved_bytes(lambda: layer(x, cos, sin, routing, attend), exclude=[*layer.parameters(), *masks])


def mask_bytes(text_tokens: int, image_tokens: int, images: int, dtype: torch.dtype) -> int:
    """The additive (Ls, Ls) mask of each sample, built once per forward and saved by every layer."""
    return images * (text_tokens + image_tokens) ** 2 * dtype.itemsize
