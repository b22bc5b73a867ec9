"""The package's modules import each other without circles (lazy imports inside functions included): each
module can be read, tested and reused from the bottom up."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(SOURCE).with_suffix("").parts).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in SOURCE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                graph[name] |= {target for target in (node.module, *(f"{node.module}.{a.name}" for a in node.names))
                                if target in modules and target != name}
            elif isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in modules}
    return graph


def test_no_module_imports_itself_through_others():
    graph = _imports()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk found the package
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as error:
        raise AssertionError(f"import circle: {' -> '.join(error.args[1])}") from None
