"""Random samples of every kind BAGEL trains on, for tests, benchmarks and the overfit check."""

from __future__ import annotations

import torch

from srum.model.config import BagelConfig
from srum.model.packing import Item, Text, VaeImage, VitImage
from srum.model.tokenizer import SpecialTokens


def special_tokens_for(config: BagelConfig) -> SpecialTokens:
    """Special ids at the top of the vocabulary, where a tokenizer built by ``srum model init`` does not reach."""
    top = config.llm.vocab_size
    return SpecialTokens(bos_token_id=top - 4, eos_token_id=top - 3, start_of_image=top - 2, end_of_image=top - 1)


class SampleFactory:
    """Draws samples whose sizes and contents come from one seeded generator."""

    def __init__(self, config: BagelConfig, seed: int = 0, max_grid: int = 4) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)
        self.max_grid = max_grid
        self.num_ordinary_ids = config.llm.vocab_size - 4

    def _int(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=self.generator))

    def text(self, loss: bool = False) -> Text:
        ids = torch.randint(0, self.num_ordinary_ids, (self._int(2, 10),), generator=self.generator).tolist()
        return Text(ids, loss=loss)

    def latent(self, noised: bool) -> VaeImage:
        patch, grid = self.config.latent_patch_size, min(self.max_grid, self.config.max_latent_size)
        rows, cols = self._int(1, grid), self._int(1, grid)
        latent = torch.randn(self.config.ae.z_channels, rows * patch, cols * patch, generator=self.generator)
        timestep = float(torch.rand((), generator=self.generator)) * 0.98 + 0.01 if noised else None
        return VaeImage(latent, timestep)

    def vit_image(self) -> VitImage:
        patch, grid = self.config.vit.patch_size, min(self.max_grid, self.config.vit.num_patches_per_side)
        rows, cols = self._int(1, grid), self._int(1, grid)
        return VitImage(torch.rand(3, rows * patch, cols * patch, generator=self.generator) * 2 - 1)

    def text_to_image(self) -> list[Item]:
        return [self.text(), self.latent(noised=True)]

    def understanding(self) -> list[Item]:
        return [self.vit_image(), self.text(), self.text(loss=True)]

    def editing(self) -> list[Item]:
        return [self.text(), self.latent(noised=False), self.vit_image(), self.text(), self.latent(noised=True)]

    def mixed(self, count: int) -> list[list[Item]]:
        """``count`` samples cycling through text-to-image, understanding and editing."""
        kinds = (self.text_to_image, self.understanding, self.editing)
        return [kinds[index % len(kinds)]() for index in range(count)]
