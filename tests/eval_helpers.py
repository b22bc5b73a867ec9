"""Tiny models for the evaluation tests, built locally: a srum checkpoint and a genuine transformers
vision-language judge (LLaVA class) with a processor assembled from srum's tiny BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
)

from srum.cli import main
from srum.model.tokenizer import build_small_tokenizer

IMAGE_TOKEN = "<image>"
# A chat template of the usual shape: one turn per message, the image placeholder where the image goes.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_checkpoint(folder: Path, seed: int = 0) -> Path:
    main(["model", "init", "--preset", "tiny", "--out", str(folder), "--seed", str(seed)])
    return folder


def make_vlm_judge(folder: Path) -> Path:
    """A random LLaVA (2-layer CLIP vision tower, 2-layer Qwen2 text model) with its processor, saved with
    save_pretrained (safetensors) like a downloaded model folder."""
    build_small_tokenizer(folder, vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=28, patch_size=14),
        text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1)
    processor.save_pretrained(str(folder))
    LlavaForConditionalGeneration(config).save_pretrained(str(folder))
    return folder
