"""A KV cache for a batch of contexts of different lengths, and the attention that reads (and extends) it."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class _Padding:
    """Where each packed query token sits in a (batch, longest query) padded layout."""

    sample: Tensor  # (N,) sample of each packed token
    slot: Tensor  # (N,) index of the token within its sample's query
    query_lens: Tensor  # (B,)
    longest: int

    @classmethod
    def of(cls, query_lens: Tensor) -> _Padding:
        sample = torch.repeat_interleave(torch.arange(len(query_lens), device=query_lens.device), query_lens)
        starts = torch.cumsum(query_lens, 0) - query_lens
        slot = torch.arange(sample.numel(), device=query_lens.device) - starts[sample]
        return cls(sample, slot, query_lens, int(query_lens.max()) if len(query_lens) else 0)

    def pad(self, x: Tensor) -> Tensor:
        """(N, ...) packed -> (B, longest, ...) padded with zeros."""
        out = x.new_zeros((len(self.query_lens), self.longest, *x.shape[1:]))
        out[self.sample, self.slot] = x
        return out

    def unpad(self, x: Tensor) -> Tensor:
        return x[self.sample, self.slot]


class KVCache:
    """Per decoder layer, the keys (after q/k norm and RoPE) and values of every cached token of B contexts.

    Storage is padded per context, (B, capacity, Hkv, D), and grows geometrically; ``lengths`` (B,) counts each
    context's cached tokens and ``positions`` (B,) is the position id its next item takes. Writes only ever go
    past a context's length, so ``fork`` copies are the only way contexts diverge.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch_size, 0, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.version = 0
        """Counts writes, so a read-only attention (denoising) can be reused until the cache changes."""
        self._read_only: tuple[tuple, CachedAttention] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    def fork(self, rows: Tensor | None = None) -> KVCache:
        """An independent copy; ``rows`` (int64) selects or repeats contexts, e.g. one per candidate answer."""
        rows = torch.arange(self.batch_size, device=self.lengths.device) if rows is None else rows
        copy = KVCache.__new__(KVCache)
        longest = int(self.lengths.max()) if self.batch_size else 0
        copy.keys = [k[rows, :longest].clone() for k in self.keys]
        copy.values = [v[rows, :longest].clone() for v in self.values]
        copy.lengths, copy.positions = self.lengths[rows].clone(), self.positions[rows].clone()
        copy.version, copy._read_only = 0, None
        return copy

    def _reserve(self, needed: int) -> None:
        capacity = self.keys[0].shape[1]
        if needed <= capacity:
            return
        grown = max(needed, 2 * capacity)
        for store in (self.keys, self.values):
            for index, old in enumerate(store):
                new = old.new_zeros((old.shape[0], grown, *old.shape[2:]))
                new[:, :capacity] = old
                store[index] = new

    def attention(self, query_lens: Tensor, causal: bool, update: bool, runs: Tensor | None = None
                  ) -> CachedAttention:
        """The ``Attend`` of one forward whose queries (``query_lens`` per context, packed) follow each context.
        ``runs`` (N,) splits each context's query into independent causal runs (see :class:`CachedAttention`).

        A read-only attention is kept and reused while the cache and the query shape stay the same: the
        denoising steps of one image share their masks and padding."""
        if update or runs is not None:
            return CachedAttention(self, _Padding.of(query_lens), causal, update, runs)
        key = (self.version, causal, tuple(query_lens.tolist()))
        if self._read_only is None or self._read_only[0] != key:
            self._read_only = (key, CachedAttention(self, _Padding.of(query_lens), causal, update=False))
        return self._read_only[1]

    def advance(self, query_lens: Tensor, position_steps: Tensor) -> None:
        """Account for a forward that wrote ``query_lens`` tokens and moved the position ids by ``position_steps``."""
        self.lengths += query_lens
        self.positions += position_steps
        self.version += 1


class CachedAttention:
    """Attention of new query tokens over their context's cache plus the new tokens themselves.

    Text is causal with bottom-right alignment (a new token sees the whole cache and the new tokens up to
    itself); image blocks are non-causal. With ``update`` the new keys and values are appended to the cache
    (text and clean images); denoising queries read the cache without writing it. With ``runs`` (the run index
    of each packed query token, causal only), a context's query is several independent runs that each see the
    whole cache and their own earlier tokens only: options scored against one shared context instead of a copy
    of the context per option.
    """

    def __init__(self, cache: KVCache, padding: _Padding, causal: bool, update: bool,
                 runs: Tensor | None = None) -> None:
        if runs is not None and (update or not causal):
            raise ValueError("runs: independent runs are read-only causal text; expected update off, causal on")
        # A weak reference: the cache keeps its read-only attention, and a cycle would leave a dropped cache (a
        # fork per scored option) to the garbage collector instead of freeing it at once.
        self._cache, self.padding, self.update = weakref.ref(cache), padding, update
        device = cache.lengths.device
        self.cached = int(cache.lengths.max()) if cache.batch_size else 0
        longest = padding.longest
        rows = torch.arange(longest, device=device)[:, None]  # query slot
        cols = torch.arange(longest, device=device)[None, :]  # new-key slot
        new_visible = cols[None] < padding.query_lens[:, None, None]  # (B, 1, Lq)
        if causal:
            new_visible = new_visible & (cols <= rows)[None]  # (B, Lq, Lq)
        if runs is not None:
            run = padding.pad(runs)  # (B, Lq)
            new_visible = new_visible & (run[:, :, None] == run[:, None, :])
        cache_visible = torch.arange(self.cached, device=device)[None, :] < cache.lengths[:, None]  # (B, C)
        mask = torch.cat([cache_visible[:, None, :].expand(-1, longest, -1),
                          new_visible.expand(-1, longest, -1)], dim=2)  # (B, Lq, C + Lq)
        padded_query = rows[None] >= padding.query_lens[:, None, None]  # (B, Lq, 1): outputs discarded
        allowed = (mask | padded_query)[:, None]  # (B, 1, Lq, C + Lq)
        # Additive form: SDPA converts a boolean mask to this on every call, i.e. on every layer.
        self.mask = torch.zeros(allowed.shape, dtype=cache.keys[0].dtype, device=device).masked_fill_(
            ~allowed, float("-inf"))
        if update:
            cache._reserve(int((cache.lengths + padding.query_lens).max()))

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Args: q (N, Hq, D), k and v (N, Hkv, D) of the packed new tokens. Returns (N, Hq, D)."""
        padding, cache = self.padding, self._cache()
        keys = torch.cat([cache.keys[layer][:, : self.cached], padding.pad(k)], dim=1)  # (B, C + Lq, Hkv, D)
        values = torch.cat([cache.values[layer][:, : self.cached], padding.pad(v)], dim=1)
        groups = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(
            padding.pad(q).transpose(1, 2),  # (B, Hq, Lq, D)
            keys.repeat_interleave(groups, dim=2).transpose(1, 2),  # (B, Hq, C + Lq, D)
            values.repeat_interleave(groups, dim=2).transpose(1, 2),
            attn_mask=self.mask,
        )  # (B, Hq, Lq, D)
        if self.update:
            slots = cache.lengths[padding.sample] + padding.slot
            cache.keys[layer][padding.sample, slots] = k.to(cache.keys[layer].dtype)
            cache.values[layer][padding.sample, slots] = v.to(cache.values[layer].dtype)
        return padding.unpad(out.transpose(1, 2))  # (N, Hq, D)
