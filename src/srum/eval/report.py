"""Reports: one JSON file per benchmark run, shown as rich tables, and the difference of two runs.

A report holds ``benchmark``, ``run`` (what was evaluated, and how), ``metrics`` (the headline rows) and
``details`` (a breakdown, e.g. per category), both ``{row: {field: number or null}}``, and ``notes``. Two reports
of one benchmark compare row by row and field by field.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from srum.io.jsonl import write_json

SECTIONS = ("metrics", "details")
FORMAT = 1


def make_report(benchmark: str, run: dict, metrics: dict[str, dict], details: dict[str, dict],
                notes: list[str]) -> dict:
    return {"benchmark": benchmark, "format": FORMAT, "run": run, "metrics": metrics, "details": details,
            "notes": notes}


def save_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report)


def _is_table(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(row, dict) for row in value.values())


def read_report(path: Path) -> dict:
    """A report file; anything else raises a ValueError that names the file and the field."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the report ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(report, dict) or not isinstance(report.get("benchmark"), str):
        raise ValueError(f"{path}: benchmark: expected a report of srum validate (an object with a benchmark name)")
    for section in SECTIONS:
        if not _is_table(report.get(section)):
            raise ValueError(f"{path}: {section}: expected an object of rows, each an object of fields")
    return report


def _cell(value: object, sign: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{sign}.2f}" if isinstance(value, float) else f"{value:{sign}}"


def _fields(rows: dict[str, dict]) -> list[str]:
    return list(dict.fromkeys(field for row in rows.values() for field in row))


def report_tables(report: dict, title: str) -> list[Table]:
    """One table per non-empty section."""
    tables = []
    for section in SECTIONS:
        rows = report[section]
        if not rows:
            continue
        fields = _fields(rows)
        table = Table(title=f"{title}: {section}")
        table.add_column("")
        for field in fields:
            table.add_column(field, justify="right")
        for name, row in rows.items():
            table.add_row(name, *(_cell(row.get(field)) for field in fields))
        tables.append(table)
    return tables


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def comparison_table(before: dict, after: dict, before_name: str, after_name: str) -> Table:
    """Every numeric field of the later report's rows: before, after and after - before ("-" where one of the
    two lacks it)."""
    if before["benchmark"] != after["benchmark"]:
        raise ValueError(f"{after_name}: benchmark: expected {before['benchmark']!r} (as in {before_name}), "
                         f"got {after['benchmark']!r}")
    table = Table(title=f"{before['benchmark']}: {before_name} -> {after_name}")
    for column, justify in (("row", "left"), ("field", "left"), ("before", "right"), ("after", "right"),
                            ("change", "right")):
        table.add_column(column, justify=justify)
    for section in SECTIONS:
        for name, row in after[section].items():
            earlier = before[section].get(name, {})
            for field, value in row.items():
                old = earlier.get(field)
                change = _cell(value - old, "+") if _number(value) and _number(old) else "-"
                if _number(value) or _number(old):
                    table.add_row(name, field, _cell(old), _cell(value), change)
    return table
