"""The judges of the CompBench protocol: a transformers vision-language model read from a local folder (the
official protocol uses Qwen2.5-VL), or a unified srum model answering through its understanding branch. Both
answer greedily, one instruction per image; a failed judgement is re-asked with sampling at a temperature, seeded,
so the re-ask can differ from the greedy answer and is still reproducible.

A judge's ``settings`` are everything that decides its answers; they are locked into the judgement file, so
answers of two judges never end up averaged together.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import torch
import transformers
from PIL import Image
from torch import Tensor
from transformers import AutoProcessor, PreTrainedModel

from srum.eval.rubric import RUBRIC_VERSION
from srum.generation.pipeline import Pipeline
from srum.generation.text import DecodingConfig
from srum.model.autoencoder import from_uint8_image
from srum.model.shipped import checkpoint_identity

DEFAULT_JUDGE_CLASS = "Qwen2_5_VLForConditionalGeneration"


class Judge(Protocol):
    settings: dict
    """What decides the answers (the model, its class or checkpoint, the decoding budget, the rubric version)."""

    def answer(self, images: list[Tensor], instructions: list[str], temperature: float = 0.0,
               seed: int = 0) -> list[str]:
        """One raw answer per image (uint8 (H, W, 3)) and instruction: greedy at temperature 0, else sampled
        from a generator seeded with ``seed``."""
        ...


def judge_model_class(name: str) -> type[PreTrainedModel]:
    """The transformers model class of that name."""
    found = getattr(transformers, name, None)
    if not (isinstance(found, type) and issubclass(found, PreTrainedModel)):
        raise ValueError(f"judge_class: expected the name of a transformers model class such as "
                         f"{DEFAULT_JUDGE_CLASS} or AutoModelForImageTextToText, got {name!r}")
    return found


def _load_processor(folder: Path):
    try:
        return AutoProcessor.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (AttributeError, ImportError, OSError, ValueError) as error:
        hint = ("; transformers builds Qwen2-VL-family processors only with torchvision installed"
                if importlib.util.find_spec("torchvision") is None else "")
        raise ValueError(f"{folder}: cannot load the judge's processor ({error}){hint}") from None


class VLMJudge:
    """A transformers vision-language model and its processor, from local files only: no remote code, weights
    from safetensors, prompts through the processor's own chat template."""

    def __init__(self, folder: Path, model_class: str = DEFAULT_JUDGE_CLASS, max_new_tokens: int = 512,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: judge folder not found (expected a local transformers model folder)")
        cls = judge_model_class(model_class)
        self.processor = _load_processor(folder)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        self.model = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False,
                                         use_safetensors=True, dtype=dtype).to(device).eval()
        self.max_new_tokens = max_new_tokens
        self.settings = {"judge": "vlm", "folder": str(Path(folder).resolve()), "class": model_class,
                         "dtype": str(dtype).removeprefix("torch."), "max_new_tokens": max_new_tokens,
                         "rubric": RUBRIC_VERSION}

    @torch.no_grad()
    def answer(self, images: list[Tensor], instructions: list[str], temperature: float = 0.0,
               seed: int = 0) -> list[str]:
        conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
                         for text in instructions]
        texts = [self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
                 for conversation in conversations]
        pictures = [Image.fromarray(image.numpy()) for image in images]
        inputs = self.processor(text=texts, images=pictures, return_tensors="pt", padding=True).to(self.model.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
            "do_sample": False}
        device = self.model.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # generate has no generator
            torch.manual_seed(seed)
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sampling)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class UnifiedJudge:
    """A unified srum model judging images through ``Pipeline.answer``."""

    def __init__(self, pipeline: Pipeline, checkpoint: str | Path, max_new_tokens: int = 512) -> None:
        self.pipeline = pipeline
        self.max_new_tokens = max_new_tokens
        self.settings = {"judge": "unified", "checkpoint": checkpoint_identity(checkpoint),
                         "max_new_tokens": max_new_tokens, "rubric": RUBRIC_VERSION}

    def answer(self, images: list[Tensor], instructions: list[str], temperature: float = 0.0,
               seed: int = 0) -> list[str]:
        decoding = DecodingConfig(self.max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0)
        generator = torch.Generator(self.pipeline.device).manual_seed(seed)
        return self.pipeline.answer([from_uint8_image(image) for image in images], instructions, decoding,
                                    generator=generator)
