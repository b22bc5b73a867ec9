"""Scoring instructions and answer parsers: every accepted answer layout, the official defects fixed (§11 items
3, 5, 10, 12, 13), and fuzzing for the parsers' contract: never raise, scores finite and in [-1, 1], only
proposed ids."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srum.reward.instructions import (
    DEFAULT_INSTRUCTIONS,
    SCORE_PREFIX,
    ScoringInstructions,
    score_candidates,
)
from srum.reward.parsing import (
    ParsedRegions,
    ParsedScore,
    RegionScore,
    answer_text,
    parse_number,
    parse_region_answer,
    parse_score_answer,
)

FUZZ = settings(max_examples=150, deadline=None, database=None)

# ---------------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(("text", "expected"), [
    ("0.85", 0.85), ("-1", -1.0), ("1.", 1.0), ("+0.5", 0.5), (".5", 0.5), ("-.5", -0.5), ("\u22120.4", -0.4),
    ("about 3 or 4", 3.0), ("[0.7]", 0.7), ("007", 7.0),
    ("nan", None), ("inf", None), ("-Infinity", None), ("", None), ("no digits", None), (".", None), ("-", None),
    ("9" * 400, None),  # overflows to inf
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


# ------------------------------------------------------------------------------------------------ answer text


@pytest.mark.parametrize(("raw", "expected"), [
    ("Score: 0.5", "Score: 0.5"),
    ("<think>Score: -1</think>\n Score: 0.5 ", "Score: 0.5"),
    ("<think>a</think> b </think> c", "c"),
    ("<think>plan</THINK>answer", "answer"),
    ("```\nScore: 0.5\n```", "Score: 0.5"),
    ("```text\nScore: 0.5\nReason: ok\n```", "Score: 0.5\nReason: ok"),
    ("**Score:** **0.5**", "Score: 0.5"),
    ("Score: 0.5\r\nReason: ok", "Score: 0.5\nReason: ok"),
])
def test_answer_text(raw, expected):
    assert answer_text(raw) == expected


# ----------------------------------------------------------------------------------------------- score answers


@pytest.mark.parametrize(("raw", "score", "status"), [
    ("Score: 0.7\nReason: fine", 0.7, "ok"),
    ("**Score:** 0.7\n**Reason:** fine", 0.7, "ok"),
    ("score = 0.7", 0.7, "ok"),
    ("Score: [0.7]", 0.7, "ok"),
    ("*Score:* `0.7`", 0.7, "ok"),
    ("SCORE:\n0.7", 0.7, "ok"),
    ("Final score: -0.3", -0.3, "ok"),
    ("Score: +0.5", 0.5, "ok"),
    ("Score: .5", 0.5, "ok"),
    ("Score: -.5", -0.5, "ok"),
    ("Score: \u22120.4", -0.4, "ok"),
    ("Score: 1.", 1.0, "ok"),
    ("Score: 0", 0.0, "ok"),  # a genuine neutral score is kept, not confused with a failure
    ("Score: 5", 1.0, "clamped"),
    ("Score: -3.5", -1.0, "clamped"),
    ("Score: N/A\nScore: 0.2", 0.2, "ok"),
    ("Score: " + "9" * 400 + "\nReason: overflow", None, "missing"),
    ("The layout is fine.\nReason: no number", None, "missing"),
    ("", None, "missing"),
    ("Score: <one number from -1.0 to 1.0>", None, "missing"),
    ("<think>Score: 0.9 seems right</think>\nI cannot tell.", None, "missing"),
    ("<think>I'd say 0.9</think>\n```\nScore: -0.6\nReason: swapped\n```", -0.6, "ok"),
])
def test_parse_score_answer(raw, score, status):
    parsed = parse_score_answer(raw)
    assert (parsed.score, parsed.status) == (score, status)


def test_negative_zero_becomes_zero():
    parsed = parse_score_answer("Score: -0.0")
    assert parsed.score == 0.0 and math.copysign(1.0, parsed.score) == 1.0


@pytest.mark.parametrize(("raw", "reason"), [
    ("Score: 0.3\nReason: the cat is left of the dog", "the cat is left of the dog"),
    ("Reason: stated first\nScore: 0.3", "stated first"),
    ("Score: [0.3] the dog is missing", "the dog is missing"),
    ("Score: 0.3", ""),
    ("No score here. Reason: too blurry", "too blurry"),
    ("I cannot judge this", "I cannot judge this"),
])
def test_reason(raw, reason):
    assert parse_score_answer(raw).reason == reason


def test_missing_score_is_none_not_zero():
    assert parse_score_answer("Reason: the image did not load") == ParsedScore(None, "the image did not load",
                                                                                "missing")


# ---------------------------------------------------------------------------------------------- region answers

OFFICIAL_LAYOUT = """<think>Three regions; the bird is broken.</think>
**Region ID: 1**
Identified Object: red kite
Score: 0.95
---
**Region ID: 2**
Identified Object: sky
Score: 0.2
---
**Region ID: 3**
Identified Object: distorted bird
Score: -0.8"""


def _summary(parsed: ParsedRegions) -> list[tuple[int, str, float, bool]]:
    return [(r.region_id, r.object, r.score, r.clamped) for r in parsed.regions]


def test_official_example_layout_keeps_every_region():
    parsed = parse_region_answer(OFFICIAL_LAYOUT, [1, 2, 3])
    assert parsed.status == "ok" and parsed.unknown_ids == ()
    assert _summary(parsed) == [(1, "red kite", 0.95, False), (2, "sky", 0.2, False),
                                (3, "distorted bird", -0.8, False)]


@pytest.mark.parametrize("header", ["Region ID: {i}", "Region {i}:", "**Region ID: {i}**", "### Region {i}",
                                    "Region ID {i}", "- Region #{i}", "1. Region ID: [{i}]", "region id:{i}"])
@pytest.mark.parametrize("separator", ["\n", "\n\n", "\n---\n", "\n\n---\n\n"])
def test_header_styles_and_separators(header, separator):
    blocks = [f"{header.format(i=i)}\nIdentified Object: thing {i}\nScore: 0.{i}" for i in (1, 2, 3)]
    parsed = parse_region_answer(separator.join(blocks), [1, 2, 3])
    assert parsed.status == "ok"
    assert _summary(parsed) == [(i, f"thing {i}", i / 10, False) for i in (1, 2, 3)]


def test_one_line_blocks():
    raw = "Region ID: 1, Identified Object: cat, Score: 0.8\nRegion ID: 2 | Identified Object: dog | Score: -0.4"
    assert _summary(parse_region_answer(raw, [1, 2])) == [(1, "cat", 0.8, False), (2, "dog", -0.4, False)]


def test_region_without_object_is_kept_with_empty_label():
    parsed = parse_region_answer("Region ID: 1\nScore: 0.4\n\nRegion ID: 2\nIdentified Object: dog\nScore: 0.1",
                                 [1, 2])
    assert parsed.status == "ok" and _summary(parsed) == [(1, "", 0.4, False), (2, "dog", 0.1, False)]


def test_block_without_score_is_skipped():
    parsed = parse_region_answer("Region ID: 1\nIdentified Object: cat\nScore: unsure\n"
                                 "Region ID: 2\nIdentified Object: dog\nScore: 0.6", [1, 2])
    assert parsed.status == "partial" and _summary(parsed) == [(2, "dog", 0.6, False)]


def test_later_duplicate_overwrites_and_unscored_duplicate_does_not():
    raw = ("Region ID: 1\nIdentified Object: cat\nScore: 0.1\n"
           "Region ID: 2\nIdentified Object: dog\nScore: 0.2\n"
           "Region ID: 1\nIdentified Object: tabby cat\nScore: 0.7\n"
           "Region ID: 2\nIdentified Object: dog again")
    assert _summary(parse_region_answer(raw, [1, 2])) == [(1, "tabby cat", 0.7, False), (2, "dog", 0.2, False)]


def test_unknown_ids_are_reported_and_ignored():
    raw = "Region ID: 7\nScore: 0.9\nRegion ID: 2\nScore: 0.3\nRegion ID: 0\nScore: 0.1\nRegion ID: 7\nScore: 1"
    parsed = parse_region_answer(raw, {1, 2})
    assert parsed.unknown_ids == (0, 7) and parsed.status == "partial"
    assert _summary(parsed) == [(2, "", 0.3, False)]


def test_regions_sorted_by_id_and_clamped():
    raw = "Region ID: 3\nScore: 5\nRegion ID: 1\nScore: -2\nRegion ID: 2\nScore: +.5"
    parsed = parse_region_answer(raw, [1, 2, 3])
    assert _summary(parsed) == [(1, "", -1.0, True), (2, "", 0.5, False), (3, "", 1.0, True)]


def test_score_inside_think_only_is_missing():
    raw = "<think>Region ID: 1\nScore: 0.9</think>\nI am not sure what the regions show."
    assert parse_region_answer(raw, [1]) == ParsedRegions((), "missing", ())


def test_no_regions_proposed_is_trivially_ok():
    assert parse_region_answer("Region ID: 1\nScore: 0.5", []) == ParsedRegions((), "ok", (1,))


def test_pathological_whitespace_is_fast():
    """Degenerate generations repeat whitespace; the patterns must stay linear in it."""
    spaces = " " * 50_000
    start = time.perf_counter()
    for raw in (f"Region{spaces}", f"Region ID: 1\nIdentified Object:{spaces}x\nScore: 0.5", f"Score:{spaces}",
                f"**{spaces}Score{spaces}", f"Reason:{spaces}\n" * 20):
        parse_region_answer(raw, [1])
        parse_score_answer(raw)
    assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------------------------------------------ fuzzing


def _check_score(parsed: ParsedScore) -> None:
    assert isinstance(parsed.reason, str)
    if parsed.score is None:
        assert parsed.status == "missing"
    else:
        assert math.isfinite(parsed.score) and -1.0 <= parsed.score <= 1.0 and parsed.status in ("ok", "clamped")


def _check_regions(parsed: ParsedRegions, proposed: set[int]) -> None:
    ids = [r.region_id for r in parsed.regions]
    assert ids == sorted(set(ids)) and set(ids) <= proposed
    assert not set(parsed.unknown_ids) & proposed and list(parsed.unknown_ids) == sorted(set(parsed.unknown_ids))
    for region in parsed.regions:
        assert math.isfinite(region.score) and -1.0 <= region.score <= 1.0 and isinstance(region.object, str)
    expected = "ok" if len(ids) == len(proposed) else "partial" if ids else "missing"
    assert parsed.status == expected


@FUZZ
@given(st.text())
def test_fuzz_arbitrary_text(raw):
    _check_score(parse_score_answer(raw))
    _check_regions(parse_region_answer(raw, [1, 2, 3]), {1, 2, 3})
    value = parse_number(raw)
    assert value is None or math.isfinite(value)


_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**6, 10**6).map(str),
    st.from_regex(r"[+\-\u2212]?[0-9]{0,400}\.?[0-9]{0,3}", fullmatch=True),
    st.sampled_from(["nan", "inf", "-inf", "N/A", "", ".", "-", "1e309", "\u22120.4", "+.5"]),
)
_PIECES = st.one_of(
    st.builds("Region ID: {}".format, st.integers(-3, 12)),
    st.builds("**Region {}**".format, st.integers(0, 10**12)),
    st.builds("### Region {}:".format, st.integers(0, 12)),
    st.builds("Score: {}".format, _NUMBERS),
    st.builds("score = [{}]".format, _NUMBERS),
    st.builds("Identified Object: {}".format, st.text(max_size=20)),
    st.sampled_from(["</think>", "<think>", "---", "\n", "\n\n", "**", "```", "Reason:", "Region", "Score:"]),
    st.text(max_size=30),
)


@FUZZ
@given(st.lists(_PIECES, max_size=30), st.lists(st.sampled_from(["\n", " ", "", "\n\n"]), min_size=1),
       st.sets(st.integers(0, 12), max_size=6))
def test_fuzz_structured_answers(pieces, joins, proposed):
    raw = "".join(piece + joins[i % len(joins)] for i, piece in enumerate(pieces))
    _check_score(parse_score_answer(raw))
    _check_regions(parse_region_answer(raw, proposed), proposed)


_LABELS = st.text(st.sampled_from("abcdefgh xyz-"), min_size=1, max_size=15).map(str.strip).filter(bool)


@FUZZ
@given(st.lists(st.tuples(st.integers(1, 6), _LABELS, st.integers(-150, 150)), min_size=1, max_size=8),
       st.sampled_from(["Region ID: {}", "**Region ID: {}**", "Region {}:", "### Region {}"]),
       st.sampled_from(["\n", "\n\n", "\n---\n"]), st.booleans())
def test_fuzz_well_formed_answers_round_trip(entries, header, separator, think):
    raw = separator.join(f"{header.format(i)}\nIdentified Object: {label}\nScore: {hundredths / 100:.2f}"
                         for i, label, hundredths in entries)
    if think:
        raw = "<think>Region ID: 1\nScore: 0.123</think>\n" + raw
    expected = {}
    for i, label, hundredths in entries:
        value = hundredths / 100
        expected[i] = RegionScore(i, label, min(1.0, max(-1.0, value)), abs(value) > 1)
    parsed = parse_region_answer(raw, range(1, 7))
    assert [(r.region_id, r.object, r.clamped) for r in parsed.regions] == \
        [(e.region_id, e.object, e.clamped) for e in (expected[i] for i in sorted(expected))]
    assert [r.score for r in parsed.regions] == pytest.approx([expected[i].score for i in sorted(expected)])
    assert parsed.status == ("ok" if len(expected) == 6 else "partial")


@FUZZ
@given(st.floats(-1e6, 1e6), st.integers(0, 6))
def test_fuzz_number_round_trip(value, places):
    assert parse_number(f"{value:.{places}f}") == pytest.approx(round(value, places), abs=10.0**-places)


# ------------------------------------------------------------------------------------------------- instructions


def test_default_templates_render_with_the_prompt_quoted():
    prompt = 'a {curly} cat, "quoted", left of a dog'
    rendered = [DEFAULT_INSTRUCTIONS.global_instruction(prompt), DEFAULT_INSTRUCTIONS.sample_instruction(prompt),
                DEFAULT_INSTRUCTIONS.region_instruction(prompt, [[0, 0, 8, 8]], 16, 16),
                DEFAULT_INSTRUCTIONS.single_region_instruction(prompt, [0, 0, 8, 8], 16, 16)]
    for text in rendered:
        assert f'"{prompt}"' in text
        assert "-1.0" in text and "-0.4 to 0.4" in text and "0.5 to 0.9" in text and "-0.9 to -0.5" in text
    assert all(SCORE_PREFIX in text and "Reason: " in text for text in rendered[:2] + rendered[3:])
    assert "Identified Object: <" in rendered[2] and "Region ID: <id>" in rendered[2]


def test_region_instruction_states_the_frame_and_lists_every_box():
    boxes = [[0, 0, 980, 700], [10, 20, 30, 40], [979, 699, 980, 700]]
    text = DEFAULT_INSTRUCTIONS.region_instruction("two cats", boxes, 980, 700)
    assert "980 pixels wide" in text and "700 pixels tall" in text
    assert "top-left" in text and "to the right" in text and "downwards" in text and "exclusive" in text
    listing = "\n\n".join(f"Region ID: {i}\nBounding Box: [{', '.join(map(str, box))}]"
                          for i, box in enumerate(boxes, start=1))
    assert listing in text and "Region ID: 4\nBounding Box" not in text


def test_single_region_instruction_states_the_frame():
    text = DEFAULT_INSTRUCTIONS.single_region_instruction("a cat", (3, 4, 5, 6), 64, 32)
    assert "64 pixels wide" in text and "32 pixels tall" in text and "[3, 4, 5, 6]" in text and "exclusive" in text


@pytest.mark.parametrize(("boxes", "width", "height", "match"), [
    ([[0, 0, 17, 8]], 16, 16, "outside"),
    ([[4, 0, 4, 8]], 16, 16, "empty"),
    ([[-1, 0, 4, 8]], 16, 16, "outside"),
    ([[0, 0, 4.5, 8]], 16, 16, "integer"),
    ([[0, 0, 4]], 16, 16, "4 coordinates"),
    ([], 16, 16, "at least one box"),
    ([[0, 0, 4, 4]], 0, 16, "positive"),
])
def test_bad_boxes_are_refused(boxes, width, height, match):
    with pytest.raises(ValueError, match=match):
        DEFAULT_INSTRUCTIONS.region_instruction("p", boxes, width, height)


def test_default_examples_parse_with_our_parsers():
    """Each instruction's example answers must be read back by the parser for that instruction."""
    for template in (DEFAULT_INSTRUCTIONS.global_template, DEFAULT_INSTRUCTIONS.single_region_template,
                     DEFAULT_INSTRUCTIONS.sample_template):
        examples = [part.split("\n", 1)[1] for part in template.split("\nExample, ")[1:]]
        assert examples and all(parse_score_answer(example).status == "ok" for example in examples)
    example = DEFAULT_INSTRUCTIONS.region_template.split("\nExample, ")[1].split("\n", 1)[1]
    parsed = parse_region_answer(example, [1, 2, 3])
    assert parsed.status == "ok" and all(region.object for region in parsed.regions)


@pytest.mark.parametrize(("name", "template", "match"), [
    ("region_template", "Score {prompt} in {regions} of a {width}-wide image", r"region_template: missing.*\{height\}"),
    ("global_template", "Judge the layout.", r"global_template.*\{prompt\}"),
    ("sample_template", "Judge {prompt} in {colour}", r"sample_template.*unknown.*\{colour\}"),
    ("single_region_template", "{prompt} {box} {width} {height} {regions}", r"single_region_template.*\{regions\}"),
    ("global_template", "Judge {prompt} and {}", r"global_template.*unknown.*\{\}"),
    ("global_template", "Judge {prompt.upper}", r"global_template: missing.*\{prompt\}; unknown.*\{prompt\.upper\}"),
    ("global_template", "Judge {prompt", "global_template.*not a valid format string"),
    ("global_template", 42, "global_template.*string"),
])
def test_replacing_a_template_checks_its_fields(name, template, match):
    with pytest.raises(ValueError, match=match):
        DEFAULT_INSTRUCTIONS.replace(**{name: template})
    with pytest.raises(ValueError, match=match):
        ScoringInstructions.from_dict({name: template})


def test_from_dict_replaces_templates_and_versions_the_wording():
    assert ScoringInstructions.from_dict({}) == DEFAULT_INSTRUCTIONS
    custom = ScoringInstructions.from_dict({"global_template": "Rate the layout of {prompt}. Score: ?"})
    assert custom.global_instruction("a cat") == "Rate the layout of a cat. Score: ?"
    assert custom.region_template == DEFAULT_INSTRUCTIONS.region_template
    assert custom.version.startswith(DEFAULT_INSTRUCTIONS.version + "+")
    again = custom.replace(sample_template="Overall: {prompt}")
    assert again.version.count("+") == 1 and again.version != custom.version
    named = ScoringInstructions.from_dict({"global_template": "Layout of {prompt}", "version": "mine-2"})
    assert named.version == "mine-2"
    assert DEFAULT_INSTRUCTIONS.replace(global_template=DEFAULT_INSTRUCTIONS.global_template) == DEFAULT_INSTRUCTIONS
    with pytest.raises(ValueError, match="glob_template"):
        ScoringInstructions.from_dict({"glob_template": "x {prompt}"})
    with pytest.raises(ValueError, match="version"):
        DEFAULT_INSTRUCTIONS.replace(version="")


def test_score_candidates_round_trip():
    candidates = score_candidates()
    assert len(candidates) == 21 == len(set(candidates)) and candidates[0] == "-1.0" and candidates[-1] == "1.0"
    assert "0.0" in candidates and "-0.0" not in candidates
    assert [parse_number(c) for c in candidates] == pytest.approx([i / 10 for i in range(-10, 11)])
    assert [parse_score_answer(SCORE_PREFIX + c).score for c in candidates] == [parse_number(c) for c in candidates]
    assert len(score_candidates(0.05)) == 41 and score_candidates(0.05)[1] == "-0.95"
    assert score_candidates(0.5) == ["-1.0", "-0.5", "0.0", "0.5", "1.0"]
    for step in (0.3, 0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="step"):
            score_candidates(step)
