"""``srum export``: a training checkpoint (Lightning file or sharded folder) as an official checkpoint folder.

The weights keep the official parameter names, so BAGEL's own code loads what srum trained; configs, tokenizer
and autoencoder come from the base checkpoint folder the run started from.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from srum.model.build import build_on_meta
from srum.model.checkpoint import (
    AE_WEIGHTS,
    LLM_CONFIG,
    SRUM_CONFIG,
    VIT_CONFIG,
    WEIGHT_FILES,
    checkpoint_folder,
    read_config,
    write_safetensors_state,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")


def load_torch_file(path: Path) -> dict:
    """A ``torch.save`` file loaded with ``weights_only=True``; a truncated or foreign file is a one-line error."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load raises many kinds (unpickling, zip, EOF, key) for a file it cannot read
        raise ValueError(f"{path}: expected a checkpoint written by torch.save (a Lightning .ckpt), got a file "
                         f"that cannot be loaded ({type(error).__name__})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(loaded).__name__}")
    return loaded


def read_training_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint as a plain dict, from a ``.ckpt`` file or a sharded (distributed) folder; loaded
    with ``weights_only=True``."""
    if path.is_dir():  # tensors in the distributed shards, everything else in Lightning's meta.pt
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as folder:
            single = Path(folder) / "checkpoint.pt"
            dcp_to_torch_save(path, single)
            checkpoint = load_torch_file(single)
        meta = path / "meta.pt"
        if meta.is_file():
            checkpoint.update(load_torch_file(meta))
        return checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    checkpoint = load_torch_file(path)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path}: state_dict: expected a Lightning checkpoint of srum fit, found no state_dict")
    return checkpoint


def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold peft LoRA adapters into their base weights: ``W + scale * B @ A`` under the base layer's name."""
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        layer, parameter = key.split(".base_layer.")
        if parameter == "weight":
            a = state[f"{layer}.lora_A.default.weight"].float()  # (r, in)
            b = state[f"{layer}.lora_B.default.weight"].float()  # (out, r)
            value = (value.float() + scale * (b @ a)).to(value.dtype)
        merged[f"{layer}.{parameter}"] = value
    return merged


def export_checkpoint(ckpt: Path, out: Path, weights: Literal["model", "ema"] = "model", base: Path | None = None,
                      name: Literal["ema", "model"] = "ema", dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Write ``out`` in the official layout with the trained (or averaged) weights under ``{name}.safetensors``."""
    checkpoint = read_training_checkpoint(Path(ckpt))
    state = checkpoint["state_dict"]
    base = checkpoint_folder(base or checkpoint.get("srum", {}).get("checkpoint", ""))
    config = read_config(base)
    model_state = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
    if weights == "ema":
        averages = {key.removeprefix("ema.").replace("/", "."): value for key, value in state.items()
                    if key.startswith("ema.")}
        if not averages:
            raise ValueError(f"{ckpt}: holds no EMA weights (train with model.ema_decay set)")
        model_state.update(averages)
    if "lora_scale" in checkpoint.get("srum", {}):
        model_state = merge_lora(model_state, float(checkpoint["srum"]["lora_scale"]))
    expected = build_on_meta(config).state_dict()
    missing = sorted(set(expected) - set(model_state))
    if missing:
        raise ValueError(f"{ckpt}: the model weights lack {', '.join(missing[:10])}")
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors_state(out / WEIGHT_FILES[name], {k: model_state[k] for k in expected}, dtype)
    for file in (LLM_CONFIG, VIT_CONFIG, SRUM_CONFIG, AE_WEIGHTS, *TOKENIZER_FILES):
        if (base / file).is_file():
            shutil.copy2(base / file, out / file)
    return out
