"""The ``srum`` program: parameter listings equal the official checkpoint's, subcommands stay in sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from srum.cli import COMMANDS, main


def _reference_table(path) -> list[str]:
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return sorted(f"{name}\t{shape}" for name, shape, *_ in rows)


@pytest.mark.parametrize("part, table", [("bagel", "bagel-7b-mot-params.tsv"), ("ae", "flux-ae-params.tsv")])
def test_7b_parameters_equal_the_official_checkpoint(shared_dir, capsys, part, table):
    main(["model", "params", "--preset", "bagel-7b-mot", "--part", part])
    printed = capsys.readouterr().out.splitlines()
    assert sorted(printed) == _reference_table(shared_dir / "reference" / table)


def test_params_of_a_checkpoint_folder(tmp_path, capsys):
    main(["model", "init", "--preset", "tiny", "--out", str(tmp_path)])
    capsys.readouterr()
    main(["model", "params", "--checkpoint", str(tmp_path)])
    from_folder = capsys.readouterr().out
    main(["model", "params", "--preset", "tiny"])
    assert from_folder == capsys.readouterr().out
    assert "language_model.model.layers.1.mlp_moe_gen.down_proj.weight\t64x128" in from_folder


def test_params_needs_exactly_one_source(capsys):
    with pytest.raises(SystemExit, match="exactly one of --preset or --checkpoint"):
        main(["model", "params"])
    with pytest.raises(SystemExit, match="preset: expected one of"):
        main(["model", "params", "--preset", "nope"])


def test_overfit_lowers_the_loss(capsys):
    main(["model", "overfit", "--samples", "3", "--steps", "6"])
    assert "cross-entropy" in capsys.readouterr().out


def test_help_lists_every_subcommand():
    overview = subprocess.run([sys.executable, "-m", "srum", "--help"], capture_output=True, text=True, check=True)
    for name in ["fit", "validate", "test", "predict", *COMMANDS]:
        assert f"\n  {name}" in overview.stdout, name
    for name in COMMANDS["model"]:
        assert f"  model {name}" in overview.stdout, name


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=str)
def test_every_config_parses(path, capsys):
    """Every recipe in configs/ is accepted by its subcommand (parsed and printed, not run)."""
    command = CONFIG_COMMANDS[path.stem]
    with pytest.raises(SystemExit) as done:
        main([*command, "--config", str(path), "--print_config"])
    assert done.value.code in (None, 0)
    assert capsys.readouterr().out.strip()


CONFIG_COMMANDS = {"overfit-tiny": ["model", "overfit"], "compbench": ["fit"],
                   "shapeworld_pretrain": ["shapeworld", "pretrain"],
                   "shapeworld_pretrain_v3": ["shapeworld", "pretrain"], "eval_compbench": ["validate", "compbench"],
                   "shapes": ["fit"]}
