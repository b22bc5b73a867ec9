"""Packed vs padded training step: forward + backward of ``Bagel`` (``tiny`` preset) on one set of mixed samples.

- ``packed``: every sample in one packed sequence (what srum and BAGEL train on).
- ``padded``: the conventional alternative, every sample padded to the longest sample's length and run as a batch.

srum's model only has a packed forward, so the padded batch is emulated with the same model code: each sample
gets a trailing ``Text`` item of padding ids (no loss) that brings it to the longest length, and the padded
samples are then packed. This is the honest compute equivalent of a padded batch of shape (B, L_max):

- every padding token is embedded and goes through every decoder layer (norms, q/k/v/o projections, MLP), so the
  per-token work is B * L_max tokens, exactly as in a padded batch;
- the ``sdpa`` backend attends per sample with a dense (Ls, Ls) mask, so each padded sample costs L_max^2 score
  entries per head per layer, exactly what a (B, L_max, L_max) padded attention costs;
- logits and velocities are computed only at loss positions in both layouts, so the comparison isolates the
  decoder (a padded implementation that ran ``lm_head`` over pad positions would only look worse).

It does not change what the real tokens compute: padding is the last split of its sample, a ``causal`` split,
and a split's keys are visible only to itself and to later splits, so no real token attends to it; padding also
comes after every real token, so real position ids are unchanged. ``test_padding_leaves_real_tokens_unchanged``
checks this (outputs, loss and every parameter gradient). The ViT encoder is untouched by padding (its patches are
not decoder padding), as it would be in a padded batch.

Run (see benchmarks_perf/README.md)::

    PYTHONPATH=src python -m pytest benchmarks_perf/test_packed_forward.py --benchmark-columns=min,mean,median,rounds
"""

from __future__ import annotations

import pytest
import torch

from srum.model.bagel import Bagel
from srum.model.build import build_random
from srum.model.config import BagelConfig
from srum.model.packing import Item, PackedBatch, Text, pack
from srum.model.synthetic import SampleFactory, special_tokens_for
from srum.model.tokenizer import SpecialTokens

PRESET = "tiny"
NUM_SAMPLES = 8
SAMPLE_SEED = 0
MAX_GRID = 8
PAD_ID = 0
"""Any ordinary id: a padding token's cost does not depend on its id."""
# Fixed rounds keep the whole file well under a minute on 2 CPU cores (a warm tiny step takes ~15-20 ms there);
# warm-up rounds absorb the first calls, which also build and cache each layout's attention masks.
ROUNDS = 50
WARMUP_ROUNDS = 5


def padded_length(lengths: list[int]) -> int:
    """The length every sample is padded to: the longest one, unless some sample is exactly one token short.

    A ``Text`` item is at least 2 tokens (``<|im_start|> <|im_end|>``), so a one-token gap cannot be filled; the
    target then grows until no gap is one token (rare: the samples measured here need L_max itself).
    """
    target = max(lengths)
    while any(target - n == 1 for n in lengths):
        target += 1
    return target


def pad_samples(samples: list[list[Item]], lengths: list[int], target: int) -> list[list[Item]]:
    """Each sample with a trailing loss-free ``Text`` of padding ids that makes it ``target`` tokens long."""
    padded = []
    for sample, length in zip(samples, lengths, strict=True):
        gap = target - length
        if gap == 0:
            padded.append(list(sample))
        else:
            padded.append([*sample, Text([PAD_ID] * (gap - 2), loss=False)])  # + <|im_start|>, <|im_end|>
    return padded


class Setup:
    """The model, the two batches built from the same samples, and the flow noise both share."""

    def __init__(self) -> None:
        self.config = BagelConfig.from_name(PRESET)
        special: SpecialTokens = special_tokens_for(self.config)
        samples = SampleFactory(self.config, seed=SAMPLE_SEED, max_grid=MAX_GRID).mixed(NUM_SAMPLES)
        self.packed = pack(samples, self.config, special)
        self.lengths = list(self.packed.layout.sample_lens)
        self.target = padded_length(self.lengths)
        self.padded = pack(pad_samples(samples, self.lengths, self.target), self.config, special)
        # Padding adds no latent tokens, so one noise tensor serves both batches.
        generator = torch.Generator().manual_seed(1)
        self.noise = torch.randn(self.packed.latent_tokens.shape, generator=generator)
        self.model = build_random(self.config, seed=0)

    def batch(self, layout: str) -> PackedBatch:
        return {"packed": self.packed, "padded": self.padded}[layout]


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


def _train_step(model: Bagel, batch: PackedBatch, noise: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(batch, noise=noise).loss().backward()


def _real_positions(setup: Setup) -> torch.Tensor:
    """Where each packed token sits in the padded sequence (each sample's real tokens come first)."""
    starts = torch.tensor([i * setup.target for i in range(len(setup.lengths))])
    return torch.cat([torch.arange(n) + s for n, s in zip(setup.lengths, starts, strict=True)])


def test_padding_leaves_real_tokens_unchanged(setup: Setup) -> None:
    packed, padded = setup.packed, setup.padded
    assert padded.layout.sample_lens == (setup.target,) * len(setup.lengths)
    where = _real_positions(setup)
    torch.testing.assert_close(padded.position_ids[where], packed.position_ids, rtol=0, atol=0)
    torch.testing.assert_close(padded.ce_indexes, where[packed.ce_indexes], rtol=0, atol=0)
    torch.testing.assert_close(padded.latent_indexes, where[packed.latent_indexes], rtol=0, atol=0)

    # A fresh model predicts v = 0 (llm2vae is zero), which would make the velocity check vacuous.
    model = build_random(setup.config, seed=0)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(2))
    results = []
    for batch in (packed, padded):
        model.zero_grad(set_to_none=True)
        out = model(batch, noise=setup.noise)
        loss = out.loss()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out, loss.detach(), grads))
    (a, loss_a, grads_a), (b, loss_b, grads_b) = results
    assert a.velocity.abs().max() > 0
    torch.testing.assert_close(b.labels, a.labels, rtol=0, atol=0)
    # Real tokens see the same keys in both layouts; the only difference is the length of the matmuls and SDPA
    # calls they run in, which can change fp32 summation order, hence fp32 tolerances rather than bit-equality.
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.velocity, a.velocity)
    torch.testing.assert_close(b.target_velocity, a.target_velocity, rtol=0, atol=0)
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_b.keys() == grads_a.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.benchmark(group=f"{PRESET}-forward-backward-{NUM_SAMPLES}-samples")
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_forward_backward(benchmark, setup: Setup, layout: str) -> None:
    batch = setup.batch(layout)
    benchmark.extra_info.update(
        layout=layout,
        samples=len(setup.lengths),
        real_tokens=sum(setup.lengths),
        sequence_tokens=batch.sequence_length,
        padding_tokens=batch.sequence_length - sum(setup.lengths),
        longest_sample=max(setup.lengths),
        sample_lens=list(batch.layout.sample_lens),
        # Attention score entries per head per layer: sum of Ls^2 over the samples (the sdpa backend's cost).
        attention_pairs=sum(n * n for n in batch.layout.sample_lens),
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )
    benchmark.pedantic(
        _train_step, args=(setup.model, batch, setup.noise), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1
    )
