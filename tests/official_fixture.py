"""Access to the tiny checkpoint recorded from the official BAGEL code (``reference/fixtures/bagel-tiny-public``).

Every size is read from the fixture's own files; nothing about it is hard-coded here.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from srum.model.checkpoint import read_config
from srum.model.config import AEConfig, BagelConfig
from srum.model.packing import PackedBatch, Text, VaeImage, VitImage, pack
from srum.model.patches import unpatchify
from srum.model.tokenizer import SpecialTokens

AE_PARAMS_NOT_FIELDS = ("resolution", "downsample")  # no effect on the computation (see the fixture's cases.md)


class OfficialFixture:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta = json.loads((folder / "cases_meta.json").read_text())
        self.fixture_config = json.loads((folder / "fixture_config.json").read_text())

    @cached_property
    def cases(self) -> dict[str, Tensor]:
        return load_file(self.folder / "cases.safetensors")

    @cached_property
    def config(self) -> BagelConfig:
        """The folder's own config files plus the BAGEL-level values the official loader wrote in code."""
        bagel = self.fixture_config["bagel_config"]
        ae = {k: v for k, v in self.fixture_config["ae_params"].items() if k not in AE_PARAMS_NOT_FIELDS}
        assert ae.pop("out_ch") == ae["in_channels"]  # srum's autoencoder decodes to its input channels
        config = dataclasses.replace(read_config(self.folder), ae=AEConfig(kind="flux", **ae),
                                     latent_patch_size=bagel["latent_patch_size"],
                                     max_latent_size=bagel["max_latent_size"],
                                     timestep_shift=bagel["timestep_shift"])
        assert config.vit_max_num_patch_per_side == bagel["vit_max_num_patch_per_side"]
        return config

    @property
    def special_token_ids(self) -> dict[str, int]:
        return self.fixture_config["new_token_ids"]

    def case_a(self) -> PackedBatch:
        """Case a packed by srum from its sample plans (the recorded tensors are only used to check)."""
        cases, config = self.cases, self.config
        special = SpecialTokens(**self.special_token_ids)
        rows, cols = cases["a.in.patchified_vae_latent_shapes"][0].tolist()
        patch = config.latent_patch_size
        latent = cases["a.in.padded_latent"][0, :, : rows * patch, : cols * patch]
        t = float(cases["a.derived.t_shifted"][0])
        vit_rows = vit_cols = int(cases["a.in.packed_vit_tokens"].shape[0] ** 0.5)
        vit_image = unpatchify(cases["a.in.packed_vit_tokens"], vit_rows, vit_cols, config.vit.patch_size)
        samples = [
            [Text([11, 22, 33, 44, 55]), VaeImage(latent, timestep=t)],
            [VitImage(vit_image), Text([101, 102, 103]), Text([201, 202, 203, 204], loss=True)],
        ]
        return pack(samples, config, special)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """The fixture's metric: ``max|actual - expected| / max|expected|``."""
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max())
