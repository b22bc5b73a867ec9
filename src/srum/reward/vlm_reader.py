"""An external vision-language model read through the interface the self-scorer uses on the unified model
(``vit_frame``, ``answer``, ``score``), so ``SelfScorer(VLMReader(...), ...)`` is the ``vlm`` reward judge: the
same instructions, region proposals and score candidates, only another model reading them.

The model is a local transformers folder loaded the way ``srum.eval.judges.VLMJudge`` loads one (local files,
no remote code, safetensors); prompts go through the processor's chat template, one image and the question.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from srum.eval.judges import _load_processor, judge_model_class
from srum.generation.text import DecodingConfig

# Plain greedy decoding, whatever the folder's generation config says (Qwen2.5-VL's sets a repetition penalty):
# the answer is then the most likely continuation under the same distribution ``score`` reads.
GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}


def to_picture(image: Tensor) -> Image.Image:
    """A (3, H, W) image in [-1, 1] back to the uint8 picture it came from: rounded, not truncated, so
    ``from_uint8_image`` followed by this gives the original pixels back exactly."""
    pixels = ((image.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


class VLMReader:
    """A transformers vision-language model answering and scoring instructions about images."""

    def __init__(self, folder: str | Path, model_class: str = "AutoModelForImageTextToText",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: VLM folder not found (expected a local transformers model folder)")
        cls = judge_model_class(model_class)
        self.processor = _load_processor(Path(folder))
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        self.model = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False,
                                         use_safetensors=True, dtype=dtype).to(device).eval()

    def vit_frame(self, height: int, width: int) -> tuple[int, int]:
        """The image's own size. The processor resizes internally, and how differs per model family, so boxes
        are stated in the image's pixel frame, whose size the instruction gives alongside them."""
        return height, width

    def _prompt(self, question: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def _inputs(self, pictures: list[Image.Image], questions: list[str]) -> dict[str, Tensor]:
        texts = [self._prompt(question) for question in questions]
        return self.processor(text=texts, images=pictures, return_tensors="pt", padding=True).to(self.model.device)

    @torch.no_grad()
    def answer(self, images: list[Tensor], questions: list[str], decoding: DecodingConfig | None = None,
               think: bool = False) -> list[str]:
        """Greedy answer to each question about each image ((3, H, W) in [-1, 1])."""
        decoding = decoding or DecodingConfig()
        if think:
            raise ValueError("think: a VLM reader has no think mode; score with think off (scorer.think=false)")
        if decoding.do_sample or decoding.stop_token_ids:
            raise ValueError("decoding: a VLM reader decodes greedily with its own end tokens; expected "
                             "do_sample off and no stop_token_ids (those are srum tokenizer ids)")
        inputs = self._inputs([to_picture(image) for image in images], questions)
        output = self.model.generate(**inputs, max_new_tokens=decoding.max_new_tokens, **GREEDY)
        new = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new, skip_special_tokens=True)]

    @torch.no_grad()
    def score(self, images: list[Tensor], questions: list[str], candidates: list[list[str]]) -> list[Tensor]:
        """Summed log-probability of each candidate answer after each image's prompt: one float32 (K,) CPU
        tensor per image, the K candidates of an image teacher-forced in one batch."""
        return [self._candidate_logprobs(to_picture(image), question, options)
                for image, question, options in zip(images, questions, candidates, strict=True)]

    def _candidate_logprobs(self, picture: Image.Image, question: str, options: list[str]) -> Tensor:
        """One row per candidate: the prompt (identical in every row, so unpadded) then the candidate's tokens,
        right-padded. Candidates are tokenized on their own, not with the prompt, so no token straddles the
        boundary and every candidate is read as the same tokens whatever precedes it."""
        inputs = self._inputs([picture] * len(options), [question] * len(options))
        tails = [torch.tensor(self.tokenizer(option, add_special_tokens=False)["input_ids"], dtype=torch.long)
                 for option in options]
        prompt_length, width = inputs["input_ids"].shape[1], max(len(tail) for tail in tails)
        inputs = _append_tails(inputs, tails, self.tokenizer.pad_token_id)
        # Only the logits that predict candidate tokens: positions prompt_length - 1 ... end - 1.
        logits = self.model(**inputs, logits_to_keep=width + 1).logits[:, :-1].float()
        targets = inputs["input_ids"][:, prompt_length:]
        mask = inputs["attention_mask"][:, prompt_length:].bool()
        picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return picked.masked_fill(~mask, 0).sum(-1).cpu()


def _append_tails(inputs: dict[str, Tensor], tails: list[Tensor], pad_id: int) -> dict[str, Tensor]:
    """Appends right-padded token rows to processor inputs. Every per-token tensor grows: the ids and attention
    mask with the tails, any other (such as Qwen2.5-VL's ``mm_token_type_ids``) with zeros, the text type."""
    ids = inputs["input_ids"]
    extension = {"input_ids": pad_sequence(tails, batch_first=True, padding_value=pad_id),
                 "attention_mask": pad_sequence([torch.ones_like(tail) for tail in tails], batch_first=True)}
    grown = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, Tensor) and value.shape == ids.shape:
            tail = extension.get(key, torch.zeros_like(extension["input_ids"]))
            grown[key] = torch.cat([value, tail.to(value)], dim=1)
    return grown
