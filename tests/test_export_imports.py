"""The export modules import in one direction: the writers share `train.exportgraph` and never import each other.

Read from the sources with `ast`, function-local imports included, so that a cycle cannot hide in a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "train")
EXPORT_MODULES = ("train.export", "train.exportgraph", "train.onnxexport", "train.tflite", "train.predict")


def package_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (top level or inside a function)."""
    modules = {f"{pkg}.{p.stem}": p for pkg in PACKAGES for p in (root / pkg).glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), list(graph[start])
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return False


def test_no_export_module_is_in_an_import_cycle() -> None:
    graph = package_imports()
    cycles = [m for m in EXPORT_MODULES if reaches(graph, m, m)]
    assert cycles == []


def test_the_writers_share_exportgraph_and_not_each_other() -> None:
    graph = package_imports()
    for writer, other in [("train.onnxexport", "train.tflite"), ("train.tflite", "train.onnxexport")]:
        assert "train.exportgraph" in graph[writer]
        assert not reaches(graph, writer, other), f"{writer} imports {other}"
    assert "train.onnxexport" not in graph["train.exportgraph"] and "train.tflite" not in graph["train.exportgraph"]


def test_a_function_local_cycle_is_found(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "train" / "export.py").write_text("from train.exportgraph import X\n")
    (tmp_path / "train" / "exportgraph.py").write_text("def f():\n    from train import export\n")
    (tmp_path / "train" / "other.py").write_text("import train.export\n")
    graph = package_imports(tmp_path)
    expected = {"train.export": {"train.exportgraph"}, "train.exportgraph": {"train.export"}}
    assert graph == {**expected, "train.other": {"train.export"}}
    assert reaches(graph, "train.export", "train.export") and not reaches(graph, "train.other", "train.other")
