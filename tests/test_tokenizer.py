"""Tests for srum.model.tokenizer: the toy Qwen2-style tokenizer, loading, and BAGEL text segments."""

import json
import shutil
from dataclasses import astuple

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from srum.model.tokenizer import (
    BAGEL_SPECIAL_TOKENS,
    LoadedTokenizer,
    SpecialTokens,
    build_small_tokenizer,
    encode_text_segment,
    load_tokenizer,
)

VOCAB_SIZE = 512
FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def test_build_then_load(tmp_path):
    built = build_small_tokenizer(tmp_path, VOCAB_SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)

    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, LoadedTokenizer)
    tokenizer, special = loaded  # BAGEL-style pair
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert special == built
    assert loaded.num_added == 0
    ids = astuple(special)
    assert len(set(ids)) == 4
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert len(tokenizer) <= VOCAB_SIZE
    assert tokenizer.convert_ids_to_tokens(list(ids)) == list(BAGEL_SPECIAL_TOKENS)
    # Qwen2.5-Instruct conventions: eos is <|im_end|>, pad is <|endoftext|>, no bos prepended by encode().
    assert tokenizer.eos_token_id == special.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.encode("a red cube") == tokenizer.encode("a red cube", add_special_tokens=False)


@pytest.mark.parametrize(
    "text",
    [
        "a red cube left of a blue ball",
        "a red cube to the left of a blue sphere",
        "The box is at x = -0.75, y = 0.25.",
        "Héllo wörld, ünïcode and emoji 😀 still round-trip",
        "  two  spaces\nand a newline\t",
        "",
    ],
)
def test_round_trip(tmp_path, text):
    build_small_tokenizer(tmp_path, VOCAB_SIZE)
    tokenizer, _ = load_tokenizer(tmp_path)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < VOCAB_SIZE for i in ids)


def test_prompt_is_several_tokens_and_merges_are_learnt(tmp_path):
    build_small_tokenizer(tmp_path, VOCAB_SIZE)
    tokenizer, _ = load_tokenizer(tmp_path)
    prompt = "a red cube left of a blue ball"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert 1 < len(ids) < len(prompt.encode())  # BPE merged something, but did not swallow the prompt whole


def test_transformers_and_tokenizers_agree(tmp_path):
    # transformers 5 rebuilds the Qwen2 pipeline from vocab + merges; the saved tokenizer.json must encode the same.
    build_small_tokenizer(tmp_path, VOCAB_SIZE)
    tokenizer, _ = load_tokenizer(tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "Count 3 green cones; the cone's at (12, -0.5). Ünïcode!"
    assert raw.encode(text).ids == tokenizer.encode(text, add_special_tokens=False)


def test_encode_text_segment(tmp_path):
    build_small_tokenizer(tmp_path, VOCAB_SIZE)
    tokenizer, special = load_tokenizer(tmp_path)
    text = "a red cube to the left of a blue sphere"
    segment = encode_text_segment(tokenizer, special, text)
    body = tokenizer.encode(text, add_special_tokens=False)
    assert segment == [special.bos_token_id, *body, special.eos_token_id]
    assert special.start_of_image not in segment and special.end_of_image not in segment
    assert encode_text_segment(tokenizer, special, "") == [special.bos_token_id, special.eos_token_id]


def test_slow_tokenizer_file_layout_loads_the_same(tmp_path):
    # An official checkpoint may only carry vocab.json + merges.txt (+ tokenizer_config.json).
    full, slow, bare = tmp_path / "full", tmp_path / "slow", tmp_path / "bare"
    build_small_tokenizer(full, VOCAB_SIZE)
    slow.mkdir()
    bare.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(full / name, slow / name)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(full / name, bare / name)
    reference = load_tokenizer(full)
    text = "three purple cylinders, -0.75"
    for folder in (slow, bare):
        loaded = load_tokenizer(folder)
        assert loaded.special == reference.special
        assert len(loaded.tokenizer) == len(reference.tokenizer)
        assert loaded.tokenizer.encode(text, add_special_tokens=False) == reference.tokenizer.encode(
            text, add_special_tokens=False
        )
    assert load_tokenizer(slow).num_added == 0


def _write_tokenizer_without_vision_tokens(folder):
    """A byte-level BPE with no merges that has <|endoftext|>, <|im_start|> and <|im_end|> but no vision markers."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    raw = Tokenizer(BPE(vocab={symbol: i for i, symbol in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", *BAGEL_SPECIAL_TOKENS[:2])]
    )
    folder.mkdir()
    raw.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(alphabet) + 3


def test_missing_special_tokens_are_added(tmp_path):
    size = _write_tokenizer_without_vision_tokens(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    tokenizer, special = loaded
    assert loaded.num_added == 2
    assert len(tokenizer) == size + 2
    assert (special.start_of_image, special.end_of_image) == (size, size + 1)
    assert len(set(astuple(special))) == 4
    # Added as special tokens: kept whole in text, dropped by skip_special_tokens.
    assert tokenizer.encode("<|vision_start|>", add_special_tokens=False) == [special.start_of_image]
    assert tokenizer.decode([special.start_of_image, special.end_of_image], skip_special_tokens=True) == ""
    segment = encode_text_segment(tokenizer, special, "a cube")
    assert tokenizer.decode(segment) == "<|im_start|>a cube<|im_end|>"


@pytest.mark.parametrize("layout", ["empty", "missing", "vocab_only"])
def test_folder_without_tokenizer_files_is_a_clear_error(tmp_path, layout):
    folder = tmp_path / "checkpoint"
    if layout != "missing":
        folder.mkdir()
    if layout == "vocab_only":
        (folder / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.json \\+ merges.txt") as info:
        load_tokenizer(folder)
    assert str(folder) in str(info.value)
    assert "\n" not in str(info.value)


def test_build_is_deterministic(tmp_path):
    first = build_small_tokenizer(tmp_path / "a", VOCAB_SIZE)
    second = build_small_tokenizer(tmp_path / "b", VOCAB_SIZE)
    assert first == second
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("vocab_size", [261, 300, 4096])
def test_vocab_size_bound(tmp_path, vocab_size):
    special = build_small_tokenizer(tmp_path, vocab_size)
    tokenizer, loaded_special = load_tokenizer(tmp_path)
    assert loaded_special == special
    assert len(tokenizer) <= vocab_size
    assert max(astuple(special)) == len(tokenizer) - 1  # special tokens come last, as in Qwen2


def test_vocab_size_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_small_tokenizer(tmp_path, 260)


def test_custom_corpus(tmp_path):
    build_small_tokenizer(tmp_path, VOCAB_SIZE, corpus=["zebra zebra zebra zebra"] * 3)
    tokenizer, _ = load_tokenizer(tmp_path)
    assert len(tokenizer.encode(" zebra", add_special_tokens=False)) == 1
    assert tokenizer.decode(tokenizer.encode("a red cube", add_special_tokens=False)) == "a red cube"


def test_special_tokens_is_frozen():
    special = SpecialTokens(bos_token_id=1, eos_token_id=2, start_of_image=3, end_of_image=4)
    with pytest.raises(AttributeError):
        special.bos_token_id = 5
