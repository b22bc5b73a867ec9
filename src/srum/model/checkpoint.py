"""Loading and saving checkpoint folders in the official BAGEL layout.

A folder holds ``llm_config.json``, ``vit_config.json`` (absent when the model has no vision encoder),
``ema.safetensors`` and/or ``model.safetensors`` (the ``Bagel`` state dict), ``ae.safetensors`` (the FLUX
autoencoder) and tokenizer files. srum adds ``srum_config.json`` for the fields the official loaders hard-code;
without it the 7B values apply, so official folders load as they are.

The model is built on the meta device and each tensor is read from the memory-mapped file straight into its
final dtype, so loading never holds a second full copy of the weights in host memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from srum.io.atomic import atomic_write
from srum.io.jsonl import write_json
from srum.model.autoencoder import build_autoencoder
from srum.model.bagel import Bagel
from srum.model.build import build_random, reset_buffers
from srum.model.config import AEConfig, BagelConfig, LLMConfig, ViTConfig, read_json
from srum.model.shipped import CheckpointError, checkpoint_folder
from srum.model.tokenizer import build_small_tokenizer

LLM_CONFIG, VIT_CONFIG, SRUM_CONFIG = "llm_config.json", "vit_config.json", "srum_config.json"
AE_WEIGHTS = "ae.safetensors"
WEIGHT_FILES = {"ema": "ema.safetensors", "model": "model.safetensors"}
# Frozen sin-cos tables: the official resume loader drops them and recomputes them, so a file may lack them.
RECOMPUTED = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")

WeightsChoice = Literal["auto", "ema", "model"]



@dataclass
class Checkpoint:
    model: Bagel
    autoencoder: nn.Module
    config: BagelConfig
    weights_file: Path


def read_config(folder: str | Path) -> BagelConfig:
    """The model config of a checkpoint folder (official files plus the optional ``srum_config.json``)."""
    folder = checkpoint_folder(folder)
    llm_path = folder / LLM_CONFIG
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no such directory)")
    if not llm_path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder: expected {LLM_CONFIG}, "
                              f"{' or '.join(WEIGHT_FILES.values())}")
    llm = LLMConfig.from_hf_dict(read_json(llm_path), source=str(llm_path))
    extra = read_json(folder / SRUM_CONFIG) if (folder / SRUM_CONFIG).is_file() else {}
    vit_path = folder / VIT_CONFIG
    vit_fields = read_json(vit_path) if vit_path.is_file() else None
    kwargs = {key: value for key, value in extra.items() if key not in ("ae", "vit_select_layer", "visual_und")}
    try:
        vit = ViTConfig.from_hf_dict(vit_fields, source=str(vit_path)) if vit_fields else ViTConfig()
        if "vit_select_layer" in extra:
            vit.select_layer = extra["vit_select_layer"]
        return BagelConfig(llm=llm, vit=vit, ae=AEConfig(**extra.get("ae", {})),
                           visual_und=extra.get("visual_und", vit_fields is not None), **kwargs)
    except TypeError as error:
        raise CheckpointError(f"{folder / SRUM_CONFIG}: unexpected field ({error})") from None


def _expected_tensors(module: nn.Module) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in module.state_dict().items()}


def _read_state(path: Path, expected: Mapping[str, torch.Size], optional: tuple[str, ...], dtype: torch.dtype,
                ) -> dict[str, Tensor]:
    """Check a safetensors file against the expected names and shapes, then read it tensor by tensor."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing weights file")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    with handle as file:
        names = set(file.keys())
        missing = sorted(set(expected) - names - set(optional))
        unexpected = sorted(names - set(expected))
        misshaped = sorted(f"{name} {list(file.get_slice(name).get_shape())} (expected {list(expected[name])})"
                           for name in names & set(expected)
                           if tuple(file.get_slice(name).get_shape()) != tuple(expected[name]))
        problems = [f"{label}: {', '.join(items)}" for label, items in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
        if problems:
            raise CheckpointError(f"{path}: does not match the model: {'; '.join(problems)}")
        state = {}
        for name in expected:
            if name in names and name not in optional:
                tensor = file.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise CheckpointError(f"{path}: {name}: expected finite weights, found NaN or infinity")
                state[name] = tensor.to(dtype)
        return state


def _load_module(build: Callable[[], nn.Module], path: Path, dtype: torch.dtype, device: torch.device | str,
                 optional: tuple[str, ...] = ()) -> nn.Module:
    with torch.device("meta"):
        module = build()
    state = _read_state(path, _expected_tensors(module), optional, dtype)
    module.load_state_dict(state, strict=False, assign=True)
    reset_buffers(module, "cpu")
    return module.to(device=device)


def weights_file(folder: Path, weights: WeightsChoice) -> Path:
    if weights != "auto":
        return folder / WEIGHT_FILES[weights]
    for name in WEIGHT_FILES.values():
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: not a checkpoint folder: expected {' or '.join(WEIGHT_FILES.values())}")


def load_checkpoint(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    weights: WeightsChoice = "auto", config: BagelConfig | None = None) -> Checkpoint:
    """Load the model and autoencoder of a checkpoint folder.

    Args:
        weights: ``ema`` or ``model`` weights; ``auto`` prefers ``ema.safetensors``.
        config: overrides the folder's config (e.g. an official folder of non-7B sizes without srum_config.json).
    """
    folder = checkpoint_folder(folder)
    config = config or read_config(folder)
    path = weights_file(folder, weights)
    model = _load_module(lambda: Bagel(config), path, dtype, device, optional=RECOMPUTED)
    autoencoder = load_autoencoder(folder, config.ae, device=device)
    return Checkpoint(model=model, autoencoder=autoencoder, config=config, weights_file=path)


def load_autoencoder(folder: str | Path, config: AEConfig, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> nn.Module:
    """The frozen autoencoder: ``ae.safetensors`` for FLUX, nothing to read for the pixel shuffle."""
    if config.kind == "pixel_shuffle":
        return build_autoencoder(config).to(device)
    module = _load_module(lambda: build_autoencoder(config), Path(folder) / AE_WEIGHTS, dtype, device)
    return module.eval().requires_grad_(False)


def _write_safetensors(path: Path, module: nn.Module, dtype: torch.dtype | None) -> None:
    write_safetensors_state(path, module.state_dict(), dtype)


def write_safetensors_state(path: Path, state: Mapping[str, Tensor], dtype: torch.dtype | None) -> None:
    """Floating-point tensors cast to ``dtype`` (None: as they are), written atomically."""
    def cast(t: Tensor) -> Tensor:
        return t if dtype is None or not t.is_floating_point() else t.to(dtype)

    tensors = {name: cast(t).detach().contiguous().cpu() for name, t in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def save_checkpoint(folder: str | Path, model: Bagel, autoencoder: nn.Module | None = None, *,
                    dtype: torch.dtype | None = None, weights: Literal["ema", "model"] = "ema") -> Path:
    """Write a checkpoint folder in the official layout (every file atomically; tokenizer files are the
    caller's, e.g. ``tokenizer.save_pretrained(folder)``). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    write_json(folder / LLM_CONFIG, config.llm.to_hf_dict())
    if config.visual_und:
        write_json(folder / VIT_CONFIG, config.vit.to_hf_dict())
    write_json(folder / SRUM_CONFIG, config.srum_fields())
    _write_safetensors(folder / WEIGHT_FILES[weights], model, dtype)
    if autoencoder is not None and config.ae.kind == "flux":
        _write_safetensors(folder / AE_WEIGHTS, autoencoder, None)
    return folder


def write_random_checkpoint(folder: str | Path, config: BagelConfig, seed: int = 0, *, tokenizer_vocab: int = 512,
                            dtype: torch.dtype | None = None) -> Path:
    """A randomly initialised checkpoint folder of ``config`` (official layout) with a small BPE tokenizer of
    at most ``tokenizer_vocab`` entries (the embedding keeps the config's vocabulary size)."""
    save_checkpoint(folder, build_random(config, seed), build_autoencoder(config.ae), dtype=dtype)
    build_small_tokenizer(folder, vocab_size=min(tokenizer_vocab, config.llm.vocab_size))
    return Path(folder)
