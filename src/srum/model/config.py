"""Configuration dataclasses for the BAGEL-architecture unified model, with named presets.

The official checkpoint folder stores only ``llm_config.json`` (a Hugging Face ``Qwen2Config``) and
``vit_config.json`` (a ``SiglipVisionConfig``); the BAGEL-level fields and the autoencoder are written in the
official loaders' code. srum keeps the same two files and adds ``srum_config.json`` with the remaining fields, so
a folder saved by srum is still an official folder and an official folder loads with the 7B defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LayerModule = Literal["Qwen2MoTDecoderLayer", "Qwen2DecoderLayer"]
AEKind = Literal["flux", "pixel_shuffle"]


def _check(condition: bool, name: str, expected: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


@dataclass
class LLMConfig:
    """The Qwen2 decoder (``llm_config.json``)."""

    # sizes
    vocab_size: int = 152064
    """Rows of ``embed_tokens`` and ``lm_head``."""
    hidden_size: int = 3584
    """Residual width."""
    intermediate_size: int = 18944
    """SwiGLU width."""
    num_hidden_layers: int = 28
    """Decoder layers (each holds both experts under MoT)."""
    num_attention_heads: int = 28
    """Query heads; ``head_dim = hidden_size / num_attention_heads``."""
    num_key_value_heads: int = 4
    """Key/value heads (grouped-query attention)."""
    # numerics
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm, q/k norms included."""
    rope_theta: float = 1e6
    """RoPE base."""
    max_position_embeddings: int = 32768
    """Stored for the Qwen2 config; default RoPE does not depend on it."""
    hidden_act: Literal["silu"] = "silu"
    """MLP activation (SwiGLU)."""
    initializer_range: float = 0.02
    """Standard deviation of random initialisation."""
    # BAGEL additions
    qk_norm: bool = True
    """Per-head RMSNorm on queries and keys before RoPE."""
    layer_module: LayerModule = "Qwen2MoTDecoderLayer"
    """``Qwen2MoTDecoderLayer``: understanding and generation experts; ``Qwen2DecoderLayer``: one dense stack."""
    freeze_und: bool = False
    """Training only: detach understanding-token activations so only the generation path learns."""

    def __post_init__(self) -> None:
        _check(self.hidden_size % self.num_attention_heads == 0, "llm.hidden_size",
               f"a multiple of num_attention_heads={self.num_attention_heads}", self.hidden_size)
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "llm.num_attention_heads",
               f"a multiple of num_key_value_heads={self.num_key_value_heads}", self.num_attention_heads)
        _check(self.head_dim % 2 == 0, "llm.head_dim", "an even number (RoPE rotates halves)", self.head_dim)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_mot(self) -> bool:
        return self.layer_module == "Qwen2MoTDecoderLayer"

    _JSON_EXTRA = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": False,
                   "rope_scaling": None, "attention_dropout": 0.0, "use_sliding_window": False, "is_causal": True}

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``llm_config.json`` content, readable by ``transformers.Qwen2Config``."""
        return {**self._JSON_EXTRA, **dataclasses.asdict(self)}

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "llm_config.json") -> LLMConfig:
        """Read the fields the official loader reads; it forces ``qk_norm`` on and untied embeddings."""
        kwargs = _pick(cls, data, source, required=("vocab_size", "hidden_size", "intermediate_size",
                                                    "num_hidden_layers", "num_attention_heads"))
        kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
        if data.get("head_dim") not in (None, kwargs["hidden_size"] // kwargs["num_attention_heads"]):
            raise ValueError(f"{source}: field head_dim: expected hidden_size / num_attention_heads, "
                             f"got {data['head_dim']}")
        kwargs["qk_norm"] = True
        return cls(**kwargs)


@dataclass
class ViTConfig:
    """The SigLIP-NaViT vision encoder (``vit_config.json``)."""

    hidden_size: int = 1152
    """ViT width (``connector.fc1`` input)."""
    intermediate_size: int = 4304
    """ViT MLP width."""
    num_hidden_layers: int = 27
    """Layers of the original encoder as written in ``vit_config.json``; ``layers_built`` are instantiated."""
    num_attention_heads: int = 16
    """Attention heads (non-causal within each image)."""
    num_channels: int = 3
    """Image channels."""
    patch_size: int = 14
    """Pixels per patch side."""
    image_size: int = 980
    """Largest image side; the learned position table has ``(image_size / patch_size)**2`` rows."""
    hidden_act: Literal["gelu_pytorch_tanh"] = "gelu_pytorch_tanh"
    """MLP activation."""
    layer_norm_eps: float = 1e-6
    """Epsilon of every LayerNorm."""
    select_layer: int = -2
    """Which hidden state feeds the LLM (-2: penultimate); layers after it are not built."""

    def __post_init__(self) -> None:
        _check(self.hidden_size % self.num_attention_heads == 0, "vit.hidden_size",
               f"a multiple of num_attention_heads={self.num_attention_heads}", self.hidden_size)
        _check(self.image_size % self.patch_size == 0, "vit.image_size",
               f"a multiple of patch_size={self.patch_size}", self.image_size)
        _check(-self.num_hidden_layers <= self.select_layer < 0, "vit.select_layer",
               f"in [-{self.num_hidden_layers}, -1]", self.select_layer)

    @property
    def layers_built(self) -> int:
        return self.num_hidden_layers + 1 + self.select_layer

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def to_hf_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("select_layer")
        return {"model_type": "siglip_vision_model", **data, "attention_dropout": 0.0}

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "vit_config.json") -> ViTConfig:
        kwargs = _pick(cls, data, source, required=("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads", "patch_size", "image_size"))
        return cls(**kwargs)


@dataclass
class AEConfig:
    """The image autoencoder: FLUX's (real checkpoints) or a lossless pixel shuffle (tiny worlds)."""

    kind: AEKind = "flux"
    """``flux``: the convolutional FLUX autoencoder in ``ae.safetensors``; ``pixel_shuffle``: weight-free."""
    in_channels: int = 3
    """Image channels."""
    ch: int = 128
    """Base width of the FLUX autoencoder."""
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Width multiplier per level; the spatial factor is ``2 ** (len(ch_mult) - 1)``."""
    num_res_blocks: int = 2
    """ResNet blocks per encoder level (decoder: one more)."""
    z_channels: int = 16
    """Latent channels (pixel shuffle: ``in_channels * downsample**2``)."""
    scale_factor: float = 0.3611
    """``z <- scale_factor * (z - shift_factor)`` after encoding."""
    shift_factor: float = 0.1159
    """See ``scale_factor``."""
    pixel_shuffle_factor: int = 2
    """Spatial factor of the pixel-shuffle autoencoder."""

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        if self.kind == "pixel_shuffle":
            expected = self.in_channels * self.pixel_shuffle_factor**2
            _check(self.z_channels == expected, "ae.z_channels",
                   f"in_channels * pixel_shuffle_factor**2 = {expected} for a pixel-shuffle autoencoder",
                   self.z_channels)

    @property
    def downsample(self) -> int:
        """Pixels per latent pixel side."""
        return self.pixel_shuffle_factor if self.kind == "pixel_shuffle" else 2 ** (len(self.ch_mult) - 1)


@dataclass
class BagelConfig:
    """The whole unified model."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    """Language model."""
    vit: ViTConfig = field(default_factory=ViTConfig)
    """Vision encoder (understanding path)."""
    ae: AEConfig = field(default_factory=AEConfig)
    """Autoencoder (generation path)."""
    visual_und: bool = True
    """Build the vision encoder, connector and ViT position table."""
    visual_gen: bool = True
    """Build the latent adapters, timestep embedder and latent position table."""
    latent_patch_size: int = 2
    """Latent pixels per token side."""
    max_latent_size: int = 64
    """Largest latent-token grid side; latent position ids are ``row * max_latent_size + col``."""
    connector_act: Literal["gelu_pytorch_tanh"] = "gelu_pytorch_tanh"
    """Activation between the connector's two layers."""
    timestep_shift: float = 1.0
    """Training-time shift ``t <- s t / (1 + (s - 1) t)``."""
    prediction: Literal["velocity", "clean"] = "velocity"
    """What ``llm2vae`` outputs: the velocity (BAGEL), or the clean latent x0, turned into the velocity
    ``(x_t - x0) / max(t, min_flow_time)`` so losses and samplers stay in velocity space. Small models learn sharp
    images faster from clean prediction."""
    min_flow_time: float = 0.05
    """Lower bound of t in the clean-to-velocity conversion (keeps the loss weight ``1 / t^2`` finite)."""

    def __post_init__(self) -> None:
        for name, kind in (("llm", LLMConfig), ("vit", ViTConfig), ("ae", AEConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, kind(**value))
        _check(self.llm.hidden_size % 4 == 0, "llm.hidden_size", "a multiple of 4 (2-D sin-cos tables)",
               self.llm.hidden_size)
        _check(self.timestep_shift > 0, "timestep_shift", "a positive number", self.timestep_shift)
        _check(self.prediction in ("velocity", "clean"), "prediction", "velocity or clean", self.prediction)
        _check(0 < self.min_flow_time <= 1, "min_flow_time", "a number in (0, 1]", self.min_flow_time)

    @property
    def vit_max_num_patch_per_side(self) -> int:
        """The official config requires it to equal ``image_size / patch_size``, so srum derives it."""
        return self.vit.num_patches_per_side

    @property
    def latent_channels(self) -> int:
        """Features of one latent token."""
        return self.latent_patch_size**2 * self.ae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side."""
        return self.ae.downsample * self.latent_patch_size

    # --- presets and files -------------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str) -> BagelConfig:
        if name not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        return PRESETS[name]()

    def srum_fields(self) -> dict[str, Any]:
        """The fields no official file holds (written to ``srum_config.json``)."""
        data = dataclasses.asdict(self)
        data.pop("llm"), data.pop("vit")
        data["vit_select_layer"] = self.vit.select_layer
        data["ae"]["ch_mult"] = list(self.ae.ch_mult)
        return data


def _pick(cls: type, data: dict[str, Any], source: str, required: tuple[str, ...]) -> dict[str, Any]:
    """Known fields of ``cls`` from ``data``; unknown keys are ignored like the official loader does."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    picked = {key: value for key, value in data.items() if key in defaults}
    for key, value in picked.items():
        if not _same_kind(defaults[key], value):
            raise ValueError(f"{source}: {key}: expected {type(defaults[key]).__name__}, got {value!r}")
    return picked


def _same_kind(default: Any, value: Any) -> bool:
    """Whether a JSON value can stand for a field with this default (fields without a scalar default pass)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _bagel_7b_mot() -> BagelConfig:
    return BagelConfig()


def _tiny() -> BagelConfig:
    """What every CPU test builds: every code path of the 7B model at a few thousand parameters per layer."""
    return BagelConfig(
        llm=LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      image_size=56),
        ae=AEConfig(kind="pixel_shuffle", z_channels=12, pixel_shuffle_factor=2, scale_factor=1.0,
                    shift_factor=0.0),
        max_latent_size=16,
    )


def _shapeworld() -> BagelConfig:
    """ShapeWorld's model: 36 px scenes, one 12 px cell per latent token (6x pixel shuffle, 2 x 2 latent patches)
    and per ViT patch, a few million parameters."""
    return BagelConfig(
        llm=LLMConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
        vit=ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                      patch_size=12, image_size=36),
        ae=AEConfig(kind="pixel_shuffle", z_channels=108, pixel_shuffle_factor=6, scale_factor=1.0,
                    shift_factor=0.0),
        max_latent_size=4,
        prediction="clean",
    )


def _shapeworld_wide(hidden_size: int, num_attention_heads: int) -> BagelConfig:
    """ShapeWorld's frames with a six-layer decoder of this width (MLP three times as wide, two KV heads)."""
    config = _shapeworld()
    config.llm = dataclasses.replace(config.llm, hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                                     num_hidden_layers=6, num_attention_heads=num_attention_heads,
                                     num_key_value_heads=2)
    return config


def _shapeworld_v2() -> BagelConfig:
    """ShapeWorld's second base: the same frames with a wider, deeper decoder (6 M parameters), room for a
    generation expert that can still learn after its pretraining stops and an understanding expert that compares
    words with image tokens over more layers."""
    return _shapeworld_wide(192, 6)


def _shapeworld_v3() -> BagelConfig:
    """ShapeWorld's third base: v2's depth at width 256 (10 M parameters). At v2's width the generation expert's
    objects were right 76 % of the time after 10,000 steps and perfect data lifted it by 8 points at most: too
    little capacity to leave post-training room above a 20 % pass rate."""
    return _shapeworld_wide(256, 8)


PRESETS = {"bagel-7b-mot": _bagel_7b_mot, "tiny": _tiny, "shapeworld": _shapeworld, "shapeworld-v2": _shapeworld_v2,
           "shapeworld-v3": _shapeworld_v3}
