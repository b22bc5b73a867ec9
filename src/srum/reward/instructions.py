"""Scoring instructions: the texts the model answers when it judges its own images.

Four instructions share one score range, [-1, 1], and five bands: a global one (does the layout realise the
prompt's spatial intent), a region list (name and score every proposed box), a single region (one box, used for
probability-weighted scoring) and a whole-image sample score. Templates are ``str.format`` strings with named
fields so a config can replace any of them; the field set is checked on construction. ``version`` is recorded
with every score: replacing a template without naming a new version derives one from the new wording, so a
score can always be traced back to the text that produced it.

Unlike the official region instruction, ours states the image size and the coordinate convention (x right,
y down, x2/y2 exclusive): boxes given without their frame cannot be located reliably.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import operator
import string
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

SCORE_PREFIX = "Score: "
"""How every single-score answer starts; probability-weighted scoring appends each of ``score_candidates()``."""

_FRAME = (
    "The image is {width} pixels wide and {height} pixels tall. Boxes are written [x1, y1, x2, y2] in pixels of "
    "this image: (0, 0) is the top-left corner, x grows to the right, y grows downwards, and x2 and y2 are "
    "exclusive, so a box covers the columns x1 to x2 - 1 and the rows y1 to y2 - 1."
)

_GLOBAL = """# Task: judge the layout of the whole scene

You are an expert in image composition. The image below was generated from this prompt:

"{prompt}"

Judge only how the arrangement of things in the image and the structure of the scene carry out what the \
prompt asks for spatially: where objects stand, how they relate to each other (left of, above, behind, next \
to), how many appear and where. Do not judge style, colour or rendering quality here.

Give one score from -1.0 to 1.0 using these bands:
- 1.0: the layout carries out every spatial requirement of the prompt.
- 0.5 to 0.9: the layout is largely right, with minor slips.
- -0.4 to 0.4: neutral; the prompt asks for nothing spatial, or the layout is generic and neither serves nor \
contradicts it.
- -0.9 to -0.5: the layout is wrong or conflicts with the prompt.
- -1.0: the layout is the opposite of what the prompt requires.

Answer in exactly this format:
Score: <one number from -1.0 to 1.0>
Reason: <one or two sentences>

Example, for the prompt "a lamp to the right of a sofa" where the lamp stands on the sofa's left:
Score: -0.7
Reason: Both the lamp and the sofa are there, but the lamp is on the wrong side.

Example, for the prompt "a bowl of soup", which asks for no arrangement:
Score: 0.0
Reason: The prompt makes no spatial demand; the single centred bowl neither meets nor breaks one.
"""

_REGION_BANDS = """Give one score from -1.0 to 1.0 that weighs together how well the object serves the prompt and \
how well it is rendered. Be strict: keep 1.0 for objects beyond reproach.
- 1.0: the object is exactly what the prompt asks for and shows no visible flaw.
- 0.5 to 0.9: strong; a relevant object with small flaws, or a secondary element rendered well.
- -0.4 to 0.4: middling; partly relevant, of uneven quality, or unrelated but harmless background. 0.0 means \
exactly neutral.
- -0.9 to -0.5: poor; an unrelated element that distracts, or a relevant object that is badly broken.
- -1.0: worst; the region damages the image or goes against the prompt."""

_REGION = f"""# Task: name and score each region of an image

You are an expert image analyst. The image below was generated from this prompt:

"{{prompt}}"

The regions listed below were proposed automatically and carry no labels. {_FRAME}

{{regions}}

Handle every region in two steps.
Step 1: name the main object inside the box.
Step 2: {_REGION_BANDS}

Answer with one block per region, in the order listed, and nothing else:
Region ID: <id>
Identified Object: <short name>
Score: <one number from -1.0 to 1.0>

Example, for three regions of an image generated from "a red kite above a beach":
Region ID: 1
Identified Object: red kite
Score: 0.9

Region ID: 2
Identified Object: patch of sky
Score: 0.1

Region ID: 3
Identified Object: seagull with a melted wing
Score: -0.8
"""

_SINGLE_REGION = f"""# Task: score one region of an image

You are an expert image analyst. The image below was generated from this prompt:

"{{prompt}}"

{_FRAME}

Region: {{box}}

First identify the main object inside this box, then judge it. {_REGION_BANDS}

Answer in exactly this format:
Score: <one number from -1.0 to 1.0>
Reason: <the object and one sentence on why>

Example, for a box around a dog with five legs in an image generated from "a dog on a lawn":
Score: -0.6
Reason: A dog, as asked, but its extra leg is a plain rendering defect.
"""

_SAMPLE = """# Task: judge the whole image

You are an expert image analyst. The image below was generated from this prompt:

"{prompt}"

Give your overall impression: how faithfully the image shows what the prompt asks for (objects, attributes, \
counts, relations) and how well it is rendered. Give one score from -1.0 to 1.0 using these bands:
- 1.0: the image is exactly what the prompt asks for and shows no visible flaw.
- 0.5 to 0.9: strong; faithful to the prompt with small flaws.
- -0.4 to 0.4: middling; partly faithful, or of uneven quality. 0.0 means exactly neutral.
- -0.9 to -0.5: poor; important parts of the prompt are missing or badly broken.
- -1.0: worst; the image ignores or contradicts the prompt.

Answer in exactly this format:
Score: <one number from -1.0 to 1.0>
Reason: <one or two sentences>

Example, for the prompt "two green apples" showing one green apple and one red apple, both well drawn:
Score: -0.3
Reason: The count is right and the rendering clean, but one apple has the wrong colour.
"""

_DECOMPOSE = """Split this image prompt into short yes/no questions that a picture matching it answers with yes, \
one per line: one per object with its attributes, one per count, one per spatial relation.

Prompt: "{prompt}"
"""

_REGION_QUESTION = 'Is the object in {box} one that "{prompt}" asks for?'

_REQUIRED_FIELDS: dict[str, frozenset[str]] = {
    "global_template": frozenset({"prompt"}),
    "region_template": frozenset({"prompt", "regions", "width", "height"}),
    "single_region_template": frozenset({"prompt", "box", "width", "height"}),
    "sample_template": frozenset({"prompt"}),
    "decompose_template": frozenset({"prompt"}),
    "region_question_template": frozenset({"prompt", "box"}),
}


def _template_fields(name: str, template: object) -> set[str]:
    if not isinstance(template, str):
        raise ValueError(f"{name}: expected a string, got {type(template).__name__}")
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as error:
        raise ValueError(f"{name}: not a valid format string ({error})") from None


def _digest(instructions: ScoringInstructions) -> str:
    text = "\0".join(getattr(instructions, name) for name in _REQUIRED_FIELDS)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _pixel(name: str, value: Any) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected an integer pixel value, got {value!r}") from None


def box_text(box: Sequence[Any], width: int, height: int) -> str:
    """``[x1, y1, x2, y2]`` after checking the box is a non-empty integer box inside the image."""
    if len(box) != 4:
        raise ValueError(f"a box needs 4 coordinates [x1, y1, x2, y2], got {list(box)}")
    x1, y1, x2, y2 = (_pixel("box", c) for c in box)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"box [{x1}, {y1}, {x2}, {y2}] is empty or outside the {width}x{height} image "
                         f"(need 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height)")
    return f"[{x1}, {y1}, {x2}, {y2}]"


def _size(width: Any, height: Any) -> tuple[int, int]:
    width, height = _pixel("width", width), _pixel("height", height)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    return width, height


@dataclasses.dataclass(frozen=True)
class ScoringInstructions:
    """The scoring templates and the version recorded with every score they produce."""

    global_template: str = _GLOBAL
    """Layout against the prompt's spatial intent. Fields: ``{prompt}``."""
    region_template: str = _REGION
    """Every proposed box, one answer block each. Fields: ``{prompt}``, ``{regions}``, ``{width}``, ``{height}``."""
    single_region_template: str = _SINGLE_REGION
    """One box, answered as ``Score:``/``Reason:``. Fields: ``{prompt}``, ``{box}``, ``{width}``, ``{height}``."""
    sample_template: str = _SAMPLE
    """Whole-image overall impression. Fields: ``{prompt}``."""
    decompose_template: str = _DECOMPOSE
    """Asks the model, in text, for the prompt's atomic yes/no questions (decomposed scoring). Fields:
    ``{prompt}``."""
    region_question_template: str = _REGION_QUESTION
    """The yes/no question about one box of decomposed scoring. Fields: ``{prompt}``, ``{box}``."""
    version: str = "srum-1"
    """Names the wording; stored next to every score."""

    def __post_init__(self) -> None:
        for name, required in _REQUIRED_FIELDS.items():
            found = _template_fields(name, getattr(self, name))
            missing, unknown = sorted(required - found), sorted(found - required)
            if missing or unknown:
                problems = [f"{kind} field(s) {', '.join('{' + f + '}' for f in fields)}"
                            for kind, fields in (("missing", missing), ("unknown", unknown)) if fields]
                raise ValueError(f"{name}: {'; '.join(problems)} (it needs exactly "
                                 f"{', '.join('{' + f + '}' for f in sorted(required))})")
        if not isinstance(self.version, str) or not self.version:
            raise ValueError(f"version must be a non-empty string, got {self.version!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> ScoringInstructions:
        """The defaults with the templates (and version) named in ``data`` replaced, e.g. from a YAML config."""
        return DEFAULT_INSTRUCTIONS.replace(**data)

    def replace(self, **changes: str) -> ScoringInstructions:
        """A copy with some templates replaced. Without an explicit ``version``, changed wording gets
        ``<base version>+<hash of the templates>`` so scores from different texts never share a version."""
        names = {field.name for field in dataclasses.fields(self)}
        if unknown := sorted(set(changes) - names):
            raise ValueError(f"unknown scoring instruction field(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(sorted(names))}")
        new = dataclasses.replace(self, **changes)
        if "version" in changes or all(getattr(new, name) == getattr(self, name) for name in _REQUIRED_FIELDS):
            return new
        return dataclasses.replace(new, version=f"{self.version.split('+')[0]}+{_digest(new)}")

    def global_instruction(self, prompt: str) -> str:
        return self.global_template.format(prompt=prompt)

    def region_instruction(self, prompt: str, boxes: Sequence[Sequence[int]], width: int, height: int) -> str:
        """Boxes are ``[x1, y1, x2, y2]`` integer pixels of the image the model sees (``width`` x ``height``);
        they are listed with 1-based ``Region ID``s in the given order."""
        width, height = _size(width, height)
        if not boxes:
            raise ValueError("region_instruction needs at least one box")
        regions = "\n\n".join(f"Region ID: {i}\nBounding Box: {box_text(box, width, height)}"
                              for i, box in enumerate(boxes, start=1))
        return self.region_template.format(prompt=prompt, regions=regions, width=width, height=height)

    def single_region_instruction(self, prompt: str, box: Sequence[int], width: int, height: int) -> str:
        width, height = _size(width, height)
        return self.single_region_template.format(prompt=prompt, box=box_text(box, width, height), width=width,
                                                  height=height)

    def sample_instruction(self, prompt: str) -> str:
        return self.sample_template.format(prompt=prompt)

    def decompose_instruction(self, prompt: str) -> str:
        return self.decompose_template.format(prompt=prompt)

    def region_question(self, prompt: str, box: Sequence[int], width: int, height: int) -> str:
        width, height = _size(width, height)
        return self.region_question_template.format(prompt=prompt, box=box_text(box, width, height))


DEFAULT_INSTRUCTIONS = ScoringInstructions()


def score_candidates(step: float = 0.1) -> list[str]:
    """The score strings ``-1.0``, ``-1.0 + step``, ..., ``1.0``, printed with the decimals of ``step``; each is
    a continuation of ``SCORE_PREFIX`` whose probability the model is asked for."""
    if not (math.isfinite(step) and step > 0) or (2 / Decimal(str(step))) % 1 != 0:
        raise ValueError(f"step must be positive and divide 2 exactly, got {step}")
    exact = Decimal(str(step))
    places = Decimal(1).scaleb(min(exact.as_tuple().exponent, -1))
    return [str((Decimal(-1) + i * exact).quantize(places)) for i in range(int(2 / exact) + 1)]


def read_instructions(path: str | Path) -> ScoringInstructions:
    """Scoring instructions from a YAML (or JSON) mapping of template names to texts; unnamed ones keep the
    defaults."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read scoring instructions ({error})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping of template names to strings")
    try:
        return ScoringInstructions.from_dict(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
