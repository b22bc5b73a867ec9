"""``srum generate``: prompt files parse (or say which line is wrong), one PNG and one record per image, re-runs
skip what is done and repair what a killed run left, and an image does not depend on the batch size."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from srum.cli import main
from srum.generation.pipeline import Pipeline
from srum.generation.prompts import read_prompts
from srum.generation.sampler import SamplerConfig
from srum.generation.text import DecodingConfig
from srum.generation.writer import RECORDS, image_seed
from srum.model.checkpoint import load_checkpoint

HEIGHT, WIDTH = 16, 24
IMAGES_PER_PROMPT = 2
SEED = 7
# Global renorm (per image in srum, over the whole batch in the official code) is the setting where the batch could
# leak into an image. Prompts of different lengths, so a batch mixes padded contexts.
PROMPTS = [
    {"Question": "a red cube", "Category": "color", "Question_id": 701},
    {"Question": "two cats sitting on a very long wooden wall at night", "Category": "numeracy", "Question_id": 702},
    {"Question": "a bird", "Category": "complex_spatial", "Question_id": 9},
]
SAMPLER_FLAGS = ["--steps", "4", "--cfg_text_scale", "2.5", "--cfg_img_scale", "1.5", "--cfg_interval", "[0.3, 1.0]",
                 "--timestep_shift", "2.0", "--cfg_renorm_type", "global", "--cfg_renorm_min", "0.25"]
EXPECTED_SETTINGS = {"num_timesteps": 4, "cfg_text_scale": 2.5, "cfg_img_scale": 1.5, "cfg_interval": [0.3, 1.0],
                     "timestep_shift": 2.0, "cfg_renorm_type": "global", "cfg_renorm_min": 0.25,
                     "height": HEIGHT, "width": WIDTH, "think": False, "run_seed": SEED}


# ---------------------------------------------------------------------------------------------------- prompt files

@pytest.mark.parametrize("split, count, per_base_category, complex_action, complex_spatial, first, last", [
    ("val", 2670, 300, 212, 58,
     {"Question": "a dog in front of a desk", "Category": "3d_spatial", "Question_id": 701},
     {"Question": "The metallic pen and fluffy notebook jot down ideas on the wooden desk.", "Category": "texture",
      "Question_id": 8904}),
    ("train", 6234, 700, 504, 130,
     {"Question": "a sofa in front of a plate", "Category": "3d_spatial", "Question_id": 1},
     {"Question": "The fluffy dog and leather leash walk on the glass sidewalk next to the wooden park bench.",
      "Category": "texture", "Question_id": 8604}),
])
def test_compbench_files_parse(shared_dir, split, count, per_base_category, complex_action, complex_spatial, first,
                               last):
    prompts = read_prompts(shared_dir / "data" / "compbench" / f"{split}_comp.json")
    assert len(prompts) == count
    assert len({prompt.prompt_id for prompt in prompts}) == count
    categories: dict[str, int] = {}
    for prompt in prompts:
        categories[prompt.category] = categories.get(prompt.category, 0) + 1
    base = ["3d_spatial", "color", "complex", "non-spatial", "numeracy", "shape", "spatial", "texture"]
    assert categories == {**dict.fromkeys(base, per_base_category), "complex_action": complex_action,
                          "complex_spatial": complex_spatial}
    for prompt, entry in ((prompts[0], first), (prompts[-1], last)):
        assert (prompt.prompt_id, prompt.text, prompt.category) == (
            str(entry["Question_id"]), entry["Question"], entry["Category"])


def test_plain_text_ids_are_line_numbers(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a red cube\r\n  two cats on a wall  \nthree dogs\n")
    prompts = read_prompts(path)
    assert [(p.prompt_id, p.text, p.category) for p in prompts] == [
        ("1", "a red cube", None), ("2", "two cats on a wall", None), ("3", "three dogs", None)]


def _entries_json(entries: list[str]) -> str:
    """A pretty-printed JSON list of the given raw entry texts (each already indented), one per block."""
    return "[\n" + ",\n".join(entries) + "\n]\n"


GOOD_ENTRY = '    {\n        "Question": "a cat",\n        "Category": "color",\n        "Question_id": 1\n    }'
BAD_FILES = {
    # entry 2 (no Question) starts on line 7: "[" is line 1, entry 1 spans lines 2-6
    "missing_question": (".json", _entries_json(
        [GOOD_ENTRY, '    {\n        "Category": "color",\n        "Question_id": 2\n    }']),
        7, "expected an object with a string Question"),
    # a missing comma between two members: the decoder stops at line 4
    "broken_json": (".json", '[\n    {\n        "Question": "a cat"\n        "Question_id": 1\n    }\n]\n',
                    4, "not valid JSON"),
    "unclosed_list": (".json", "[\n" + GOOD_ENTRY + ",\n", 7, "not closed"),  # the end of the file
    "empty_line": (".txt", "a red cube\ntwo cats\n\nthree dogs\n", 3, "empty line"),
    "blank_line": (".txt", "a red cube\n   \n", 2, "empty line"),
    # the second entry with id 1 starts on line 7
    "duplicate_id": (".json", _entries_json(
        [GOOD_ENTRY, GOOD_ENTRY.replace("a cat", "a dog")]), 7, "Question_id 1 appears more than once"),
    "not_a_list": (".json", '\n{"Question": "a cat", "Question_id": 1}\n', 2, "expected a JSON list"),
    "a_string_entry": (".json", '[\n    {"Question": "a cat", "Question_id": 1},\n    "a dog"\n]\n', 3,
                       "expected an object"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_prompt_files_name_the_line(tmp_path, name):
    suffix, text, line, message = BAD_FILES[name]
    path = tmp_path / f"prompts{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        read_prompts(path)
    assert str(error.value).startswith(f"{path}:{line}: "), str(error.value)
    assert message in str(error.value)


def test_bad_prompt_file_is_a_clear_cli_error(tmp_path):
    """The command stops before loading anything, with ``srum: error: FILE:LINE: ...`` and no output folder."""
    suffix, text, line, _ = BAD_FILES["missing_question"]
    path = tmp_path / f"prompts{suffix}"
    path.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=re.escape(f"srum: error: {path}:{line}: expected an object")):
        main(["generate", "--checkpoint", str(tmp_path / "no-such-checkpoint"), "--prompts", str(path),
              "--out", str(out)])
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- generation

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint whose ``llm2vae`` is random too (a fresh one is zero, so v would be 0 and the
    images plain functions of the noise): the prompt, the guidance and the batch then reach the pixels."""
    folder = tmp_path_factory.mktemp("checkpoint")
    main(["model", "init", "--preset", "tiny", "--out", str(folder), "--seed", "0"])
    weights = load_file(folder / "ema.safetensors")
    generator = torch.Generator().manual_seed(1)
    weights["llm2vae.weight"] = 0.1 * torch.randn(weights["llm2vae.weight"].shape, generator=generator)
    save_file(weights, folder / "ema.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps(PROMPTS, indent=4))
    return path


def _generate(checkpoint: Path, prompts: Path, out: Path, *extra: str, batch_size: int = 1,
              seed: int = SEED) -> None:
    main(["generate", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--out", str(out),
          "--height", str(HEIGHT), "--width", str(WIDTH), "--images_per_prompt", str(IMAGES_PER_PROMPT),
          "--seed", str(seed), "--batch_size", str(batch_size), "--device", "cpu", *SAMPLER_FLAGS, *extra])


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _identities(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: a file written again (to a temporary name, then renamed) changes inode."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in sorted(folder.iterdir())}


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / RECORDS).read_text().splitlines()]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _expected_image_files() -> list[str]:
    return [f"{entry['Question_id']}_{index}.png" for entry in PROMPTS for index in range(IMAGES_PER_PROMPT)]


@pytest.fixture(scope="module")
def first_run(checkpoint, prompt_file, tmp_path_factory) -> Path:
    """One complete run (batch size 1); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("first") / "out"
    _generate(checkpoint, prompt_file, out)
    return out


@pytest.fixture
def run_copy(first_run, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    return out


def test_writes_one_png_and_one_record_per_image(checkpoint, first_run):
    expected = _expected_image_files()
    assert sorted(_files(first_run)) == sorted([*expected, RECORDS])
    for name in expected:
        with Image.open(first_run / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (WIDTH, HEIGHT))
            image.verify()
    records = _records(first_run)
    assert [record["image_file"] for record in records] == expected
    by_id = {str(entry["Question_id"]): entry for entry in PROMPTS}
    for record in records:
        entry = by_id[record["prompt_id"]]
        assert record["category"] == entry["Category"]
        assert record["prompt"] == entry["Question"]
        assert record["image_file"] == f"{record['prompt_id']}_{record['image_index']}.png"
        assert record["seed"] == image_seed(SEED, record["prompt_id"], record["image_index"])
        assert record["settings"] == {**EXPECTED_SETTINGS, "checkpoint": str(checkpoint.resolve())}
        assert "plan" not in record
    assert len({record["seed"] for record in records}) == len(records)
    # every image its own noise: no two images are alike
    pixels = [_pixels(first_run / name) for name in expected]
    assert all(not np.array_equal(a, b) for i, a in enumerate(pixels) for b in pixels[i + 1:])


def test_rerun_writes_nothing(checkpoint, prompt_file, run_copy, caplog):
    before, identities = _files(run_copy), _identities(run_copy)
    with caplog.at_level("INFO", logger="srum"):
        _generate(checkpoint, prompt_file, run_copy)
    assert "0 images to generate (6 already in" in caplog.text
    assert _files(run_copy) == before
    assert _identities(run_copy) == identities


def test_deleted_image_and_record_are_regenerated(checkpoint, prompt_file, run_copy):
    before = _files(run_copy)
    records = _records(run_copy)
    victim = records[3]["image_file"]
    (run_copy / victim).unlink()
    lines = (run_copy / RECORDS).read_text().splitlines(keepends=True)
    (run_copy / RECORDS).write_text("".join(lines[:3] + lines[4:]))
    identities = _identities(run_copy)

    _generate(checkpoint, prompt_file, run_copy)

    after = _identities(run_copy)
    changed = sorted(name for name in after if after[name] != identities.get(name))
    assert changed == sorted([victim, RECORDS])
    assert _files(run_copy)[victim] == before[victim]
    assert _records(run_copy) == [*records[:3], *records[4:], records[3]]


def test_deleted_image_with_its_record_left_is_regenerated_once(checkpoint, prompt_file, run_copy):
    """Only the PNG deleted: the image is made again and the folder still holds one record per image."""
    before, records = _files(run_copy), _records(run_copy)
    victim = records[1]["image_file"]
    (run_copy / victim).unlink()

    _generate(checkpoint, prompt_file, run_copy)

    assert _files(run_copy)[victim] == before[victim]
    after = _records(run_copy)
    assert sorted(record["image_file"] for record in after) == sorted(_expected_image_files())
    assert after == [*records[:1], *records[2:], records[1]]


@pytest.mark.parametrize("killed", ["after_png", "while_saving_png"])
def test_torn_record_is_repaired(checkpoint, prompt_file, run_copy, killed):
    """A run killed while appending the last record (its PNG already renamed), or while writing the last PNG
    (a temporary file and no record): the re-run cuts the torn line, makes that image again and leaves no
    temporary file."""
    before = _files(run_copy)
    lines = (run_copy / RECORDS).read_text().splitlines(keepends=True)
    last = json.loads(lines[-1])
    (run_copy / RECORDS).write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    if killed == "while_saving_png":
        (run_copy / last["image_file"]).unlink()
        (run_copy / f".{last['image_file']}.tmp").write_bytes(before[last["image_file"]][:40])

    _generate(checkpoint, prompt_file, run_copy)

    text = (run_copy / RECORDS).read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]
    assert [record["image_file"] for record in records] == [json.loads(line)["image_file"] for line in lines]
    assert records == [json.loads(line) for line in lines]
    assert _files(run_copy) == before
    assert not [path.name for path in run_copy.iterdir() if path.name.endswith(".tmp")]


def test_same_seed_same_images_whatever_the_batch_size(checkpoint, prompt_file, first_run, tmp_path):
    batched = tmp_path / "batched"
    _generate(checkpoint, prompt_file, batched, batch_size=3)
    assert _records(batched) == _records(first_run)
    differences = {}
    for name in _expected_image_files():
        single, together = _pixels(first_run / name).astype(int), _pixels(batched / name).astype(int)
        differences[name] = int(np.abs(single - together).max())
    assert all(difference == 0 for difference in differences.values()), f"max |pixel difference|: {differences}"


def test_the_batch_test_can_tell(checkpoint, prompt_file, first_run, tmp_path):
    """What makes the batch-size test meaningful: the prompt reaches the pixels (so padding and batched
    attention could), and another run seed gives other images."""
    pipeline = Pipeline.from_checkpoint(checkpoint)
    sampler = SamplerConfig(num_timesteps=4, cfg_text_scale=2.5)
    result = pipeline.generate([PROMPTS[0]["Question"], PROMPTS[1]["Question"]], [5, 5], sampler, HEIGHT, WIDTH)
    assert not torch.equal(result.images[0], result.images[1])
    other = tmp_path / "other-seed"
    _generate(checkpoint, prompt_file, other, seed=SEED + 1)
    for name in _expected_image_files():
        assert not np.array_equal(_pixels(first_run / name), _pixels(other / name)), name


def test_think_records_a_plan(checkpoint, prompt_file, first_run, tmp_path):
    out = tmp_path / "think"
    _generate(checkpoint, prompt_file, out, "--think", "true", "--max_think_tokens", "4", "--images_per_prompt", "1",
              "--cfg_renorm_type", "text_channel", batch_size=3)
    records = _records(out)
    assert [record["image_file"] for record in records] == [f"{entry['Question_id']}_0.png" for entry in PROMPTS]
    for record in records:
        assert record["settings"] == {**EXPECTED_SETTINGS, "think": True, "max_think_tokens": 4,
                                      "cfg_renorm_type": "text_channel", "checkpoint": str(checkpoint.resolve())}
    # the plans are what the model decodes in at most 4 tokens (a random model: gibberish)
    pipeline = Pipeline.from_checkpoint(checkpoint)
    sampler = SamplerConfig(num_timesteps=4, cfg_text_scale=2.5, cfg_img_scale=1.5)
    _, plans = pipeline.prompt_contexts([entry["Question"] for entry in PROMPTS], sampler, think=True,
                                        decoding=DecodingConfig(max_new_tokens=4))
    assert [record["plan"] for record in records] == plans
    assert any(plans)
    _, longer = pipeline.prompt_contexts([PROMPTS[0]["Question"]], sampler, think=True,
                                         decoding=DecodingConfig(max_new_tokens=12))
    assert longer[0] != plans[0]
    # the instruction and the plan change the context, so the image
    assert not np.array_equal(_pixels(out / "701_0.png"), _pixels(first_run / "701_0.png"))


def test_no_temporary_files_left(first_run):
    assert not [name for name in os.listdir(first_run) if name.endswith(".tmp") or name.startswith(".")]


def test_rerunning_with_other_settings_is_refused(checkpoint, prompt_file, tmp_path):
    out = tmp_path / "out"
    _generate(checkpoint, prompt_file, out)
    before = _files(out)
    with pytest.raises(SystemExit, match=r"records.jsonl: holds images made with other settings \(run_seed\)"):
        _generate(checkpoint, prompt_file, out, seed=SEED + 1)
    other = tmp_path / "other-checkpoint"
    shutil.copytree(checkpoint, other)
    with pytest.raises(SystemExit, match=r"records.jsonl: holds images made with other settings \(checkpoint\)"):
        _generate(other, prompt_file, out)
    assert _files(out) == before
    changed = tmp_path / "changed.json"  # the same id for another text must not keep the old text's images
    changed.write_text(json.dumps([{**PROMPTS[0], "Question": "a blue sphere"}]))
    with pytest.raises(SystemExit, match=r"records.jsonl: prompt_id 701: expected the text 'a red cube' its "
                                         r"images were made for, got 'a blue sphere'"):
        _generate(checkpoint, changed, out)
    assert _files(out) == before


@pytest.mark.parametrize("question_id", [None, "../x", "a/b", True])
def test_question_ids_that_cannot_name_a_file_are_refused(tmp_path, question_id):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"Question": "a cat", "Category": "color", "Question_id": question_id}], indent=2))
    with pytest.raises(ValueError, match=rf"{path}:2: Question_id: expected an integer or a name"):
        read_prompts(path)


@pytest.mark.parametrize(("flags", "message"), [
    (("--height", "-16"), "--height: expected a positive number, got -16"),
    (("--batch_size", "0"), "--batch_size: expected a positive number, got 0"),
    (("--images_per_prompt", "0"), "--images_per_prompt: expected a positive number, got 0"),
])
def test_sizes_and_counts_below_one_are_refused(checkpoint, prompt_file, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=f"srum: error: {message}"):
        _generate(checkpoint, prompt_file, tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused_and_left_alone(checkpoint, prompt_file, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    with pytest.raises(SystemExit, match=f"srum: error: {out}: --out: expected an output folder"):
        _generate(checkpoint, prompt_file, out)
    assert out.read_text() == "mine\n"


def test_a_config_value_of_the_wrong_type_names_file_and_field(checkpoint, prompt_file, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    config = json.loads((broken / "llm_config.json").read_text())
    (broken / "llm_config.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
    with pytest.raises(SystemExit, match=f"srum: error: {broken}/llm_config.json: hidden_size: expected int, "
                                         f"got 'wide'"):
        _generate(broken, prompt_file, tmp_path / "out")


def test_the_default_size_is_the_largest_the_checkpoint_draws(checkpoint, prompt_file, tmp_path):
    config = load_checkpoint(checkpoint).config
    side = config.max_latent_size * config.latent_downsample
    main(["generate", "--checkpoint", str(checkpoint), "--prompts", str(prompt_file), "--out", str(tmp_path / "out"),
          "--device", "cpu", *SAMPLER_FLAGS])
    assert {Image.open(path).size for path in (tmp_path / "out").glob("*.png")} == {(side, side)}
