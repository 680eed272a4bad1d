"""The training loop imports no inference code, and no module of the training core is in an import cycle: read
from the source (function-local imports too), so a cycle hidden inside a function is found."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "train")
INFERENCE = {"train.predict", "train.export", "train.tflite", "train.modelpair"}
CORE = {
    f"train.{m}"
    for m in ("checkpoint", "config", "cli", "loop", "cv", "distributed", "ensemble", "model", "optim", "report")
} | {"train.scoring", "pipeline.errors", "pipeline.text"}


def import_graph() -> dict[str, set[str]]:
    """Each package module -> the package modules it imports anywhere in its source."""
    modules = {f"{p}.{f.stem}": f for p in PACKAGES for f in (ROOT / p).glob("*.py") if f.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_the_graph_sees_function_local_imports() -> None:
    graph = import_graph()
    assert "train.loop" in graph["train.cli"]  # imported inside the group's function only
    assert "train.checkpoint" in graph["train.cv"]


def test_the_training_loop_imports_no_inference_code() -> None:
    graph = import_graph()
    assert "train.scoring" in graph["train.loop"]
    assert not reachable(graph, "train.loop") & INFERENCE
    assert not reachable(graph, "train.scoring") & INFERENCE


def test_no_module_of_the_training_core_is_in_an_import_cycle() -> None:
    graph = import_graph()
    cyclic = sorted(m for m in CORE if m in graph and m in reachable(graph, m))
    assert cyclic == []
