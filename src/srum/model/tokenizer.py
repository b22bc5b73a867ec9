"""Qwen2 tokenizer loading, BAGEL text segments, and a tiny deterministic tokenizer for toy checkpoints.

BAGEL reads the Qwen2.5 BPE tokenizer from the checkpoint folder and relies on four special tokens:
``<|im_start|>`` (bos), ``<|im_end|>`` (eos), ``<|vision_start|>`` and ``<|vision_end|>``. The official loader adds
any that are missing and the trainer resizes the embeddings only when something was added, so :func:`load_tokenizer`
reports that count. A text segment is ``[<|im_start|>] + tokens(text) + [<|im_end|>]`` with no chat template.

Tiny CPU checkpoints cannot ship the 151k-token Qwen vocabulary (the embedding alone would dwarf the model), so
:func:`build_small_tokenizer` trains a few-hundred-token byte-level BPE with the same pre-tokenizer, special tokens
and file layout, which ``AutoTokenizer`` loads as a ``Qwen2Tokenizer`` exactly like an official folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from srum.model.shipped import checkpoint_folder

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
START_OF_IMAGE_TOKEN = "<|vision_start|>"
END_OF_IMAGE_TOKEN = "<|vision_end|>"
ENDOFTEXT_TOKEN = "<|endoftext|>"
BAGEL_SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, START_OF_IMAGE_TOKEN, END_OF_IMAGE_TOKEN)
"""The tokens BAGEL needs, in the order of the :class:`SpecialTokens` fields."""

# Qwen2's split regex (transformers, models/qwen2/tokenization_qwen2.py): digits are split one by one, letters are
# grouped with one leading non-letter, so the toy tokenizer segments text exactly like the real one.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Special tokens sit after the BPE vocabulary, in Qwen2's relative order (151643, 151644, 151645, 151652, 151653).
_SMALL_SPECIAL_TOKENS = (ENDOFTEXT_TOKEN, *BAGEL_SPECIAL_TOKENS)
_BYTE_ALPHABET_SIZE = 256

# A small English corpus for the toy world of coloured shapes and T2I-CompBench-like prompts. It only shapes which
# merges the toy BPE learns; any text still encodes, since every byte is in the vocabulary.
DEFAULT_CORPUS: tuple[str, ...] = (
    "a red cube to the left of a blue sphere",
    "a green cone to the right of a yellow cylinder",
    "a blue ball on top of a red box",
    "a yellow square below a purple circle",
    "an orange triangle above a green square",
    "two red cubes and one blue sphere",
    "three green circles next to four yellow triangles",
    "five purple cones in a row",
    "a small white cube near a large black sphere",
    "a big pink ball behind a tiny grey cube",
    "the red circle is in the top left corner of the image",
    "the blue square is in the bottom right corner",
    "a cyan star in the center of the picture",
    "one brown cylinder and two magenta cones",
    "six small spheres arranged in a circle",
    "a red cube left of a blue ball",
    "a green triangle right of an orange circle",
    "seven yellow stars on a black background",
    "a purple sphere in front of a white cube",
    "eight blue squares and nine red circles",
    "a tall green cylinder between two short red cubes",
    "the yellow ball is above the blue box and below the red cone",
    "there are three shapes: a circle, a square and a triangle",
    "How many red cubes are there? There are 2 red cubes.",
    "What colour is the sphere? The sphere is blue.",
    "Where is the green cone? It is on the left side.",
    "Is the red square larger than the blue circle? Yes.",
    "Count the triangles: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "The box is at x = -0.75, y = 0.25 with size 0.5.",
    "Move the cube 12 pixels up and 30 pixels to the right.",
    "a photo of a red apple and a green leaf",
    "a drawing of two blue birds sitting on a brown branch",
    "a wooden table with a glass vase and three flowers",
    "a metallic sphere reflecting a soft white light",
    "the left half of the image is dark and the right half is bright",
    "a striped red and white ball rolling down a grey ramp",
    "four small yellow dots around a big black square",
    "no shapes overlap; each shape has its own colour",
    "The image shows a red circle, a green square, and a blue triangle.",
    "Describe the scene in one sentence.",
    "A RED CUBE, a Blue Sphere, and an orange cone!",
    "an empty white canvas with a thin black border",
)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens BAGEL uses, under BAGEL's names (``new_token_ids`` in the official loaders)."""

    bos_token_id: int
    """``<|im_start|>``: opens every text segment."""
    eos_token_id: int
    """``<|im_end|>``: closes every text segment, and stops text generation."""
    start_of_image: int
    """``<|vision_start|>``: opens every image segment (ViT or VAE tokens)."""
    end_of_image: int
    """``<|vision_end|>``: closes every image segment."""


@dataclass(frozen=True)
class LoadedTokenizer:
    """What :func:`load_tokenizer` returns; unpacks as ``tokenizer, special = load_tokenizer(folder)``."""

    tokenizer: PreTrainedTokenizerBase
    special: SpecialTokens
    num_added: int
    """Tokens added because the folder lacked them: the embedding needs ``len(tokenizer)`` rows when this is > 0."""

    def __iter__(self) -> Iterator[Any]:
        return iter((self.tokenizer, self.special))


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def load_tokenizer(folder: str | Path) -> LoadedTokenizer:
    """Load the checkpoint's tokenizer from local files and make sure BAGEL's four special tokens exist.

    Missing special tokens are added (as BAGEL does) and counted in ``num_added`` so the caller can resize the
    embeddings; the Qwen2.5 tokenizer already has all four, so nothing is added for an official checkpoint.
    """
    folder = checkpoint_folder(folder)
    if not _has_tokenizer_files(folder):
        raise FileNotFoundError(f"no tokenizer in {folder}: expected tokenizer.json or vocab.json + merges.txt")
    if (folder / "tokenizer_config.json").is_file() or (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    else:
        # Nothing names the class; the official loaders call Qwen2Tokenizer directly, so do the same.
        from transformers import Qwen2Tokenizer

        tokenizer = Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)

    size_before = len(tokenizer)
    vocab = tokenizer.get_vocab()
    missing = [token for token in BAGEL_SPECIAL_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_tokens(
            [AddedToken(token, special=True, normalized=False) for token in missing], special_tokens=True
        )
    ids = tokenizer.convert_tokens_to_ids(list(BAGEL_SPECIAL_TOKENS))
    special = SpecialTokens(*ids)
    return LoadedTokenizer(tokenizer=tokenizer, special=special, num_added=len(tokenizer) - size_before)


def encode_text_segment(tokenizer: PreTrainedTokenizerBase, special: SpecialTokens, text: str) -> list[int]:
    """Token ids of a BAGEL text segment: ``[bos] + tokens(text) + [eos]``, with no chat template or role names."""
    return [special.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), special.eos_token_id]


def _qwen2_style_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE pipeline identical to the one ``Qwen2Tokenizer`` builds."""
    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _tokenizer_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """``tokenizer_config.json`` in the shape of Qwen2.5-7B-Instruct's (the tokenizer BAGEL ships), sans template."""
    added = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in _SMALL_SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(BAGEL_SPECIAL_TOKENS),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": ENDOFTEXT_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_text(path: Path, text: str) -> None:
    # Fixed encoding and newlines keep repeated builds byte-identical on every platform.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def build_small_tokenizer(folder: str | Path, vocab_size: int, corpus: Iterable[str] | None = None) -> SpecialTokens:
    """Train a tiny Qwen2-style byte-level BPE tokenizer and save it into ``folder`` like an official checkpoint.

    The vocabulary is the 256 byte symbols, the merges learnt from ``corpus`` (:data:`DEFAULT_CORPUS` when None),
    then ``<|endoftext|>`` and BAGEL's four special tokens; at most ``vocab_size`` ids in all (fewer when the corpus
    runs out of merges). Writes ``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json`` and ``merges.txt``;
    the same arguments always give byte-identical files.
    """
    min_size = _BYTE_ALPHABET_SIZE + len(_SMALL_SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size: expected >= {min_size} (256 bytes + 5 special tokens), got {vocab_size}")
    texts = list(DEFAULT_CORPUS if corpus is None else corpus)

    tokenizer = _qwen2_style_tokenizer()
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(_SMALL_SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Added after training so the special ids follow the BPE vocabulary, as in Qwen2.
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in _SMALL_SPECIAL_TOKENS])

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_text(folder / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    _write_text(folder / "tokenizer_config.json", json.dumps(_tokenizer_config(tokenizer), indent=2) + "\n")

    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    _write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False) + "\n")
    _write_text(folder / "merges.txt", "".join(f"{merge}\n" for merge in ["#version: 0.2", *merges]))

    return SpecialTokens(*(tokenizer.token_to_id(token) for token in BAGEL_SPECIAL_TOKENS))
