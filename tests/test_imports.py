"""What the package modules import: the offline stage never loads torch or webdataset (not on import, not when it
reads local shards), no two modules import each other, and neither does the offline stage import the trainer."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from demo_data import demo_dataset, demo_shards

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "webdataset")
_LOADED = "import json, sys; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"


def loaded_after(code: str) -> list[str]:
    """Which of HEAVY a fresh interpreter has imported after running `code`."""
    script = f"{code}\n" + _LOADED.format(heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
def test_control_the_check_sees_a_heavy_import() -> None:
    assert loaded_after("import webdataset") == ["torch", "webdataset"]


@pytest.mark.slow
def test_importing_the_offline_stage_loads_neither_torch_nor_webdataset() -> None:
    modules = ("cli", "build", "shards", "location", "tario", "files", "read", "features", "demo")
    assert loaded_after("import " + ", ".join(f"pipeline.{m}" for m in modules)) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", ["verify", "stats"])
def test_reading_local_shards_loads_neither(tmp_path: Path, command: str) -> None:
    shards = demo_shards(tmp_path, demo_dataset(tmp_path, sequences=60, signs=4, participants=4), shard_size=20)
    code = (
        "from pipeline.cli import main\n"
        f"try:\n    main([{command!r}, {str(shards)!r}])\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code"
    )
    assert loaded_after(code) == []


# ---------------------------------------------------------------- the import graph, read from the source

PACKAGES = ("pipeline", "train")
INFERENCE = ("train.predict", "train.export", "train.tflite")  # what a training run must never load


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the packages by dotted name (`pipeline.build`), package `__init__` files included."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, source: str, modules: Iterable[str], is_package: bool = False) -> set[str]:
    """The package modules that the module `name` imports anywhere in `source` (function-local imports too).

    `from a import b` counts `a`, and `a.b` as well where that is a module; relative imports are resolved
    (from `name` itself when it is a package's `__init__`).
    """
    known = set(modules)
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports, for every module of the packages."""
    modules = package_modules(root)
    return {
        name: imports_of(name, path.read_text(), modules, is_package=path.name == "__init__.py")
        for name, path in modules.items()
    }


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle `[a, b, ..., a]` per group of modules that import each other (strongly connected), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(_cycle_through(min(group), group, graph) for group in groups)


def _cycle_through(start: str, group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest import path from `start` back to itself inside `group` (breadth first)."""
    paths = [[start, nxt] for nxt in sorted(graph[start] & group)]
    while paths:
        path = paths.pop(0)
        if path[-1] == start:
            return path
        paths.extend([*path, nxt] for nxt in sorted(graph[path[-1]] & group) if nxt not in path[1:])
    raise AssertionError(f"{start} is in an import group without a cycle")


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module `start` loads, directly or through others, with one shortest chain of imports to it."""
    chains = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in chains:
                chains[nxt] = [*chains[node], nxt]
                queue.append(nxt)
    del chains[start]
    return chains


def test_the_reader_sees_local_relative_and_module_imports() -> None:
    modules = ["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e"]
    source = (
        "import os\n"
        "from pkg import b, CONSTANT\n"
        "def f():\n    from pkg.c import thing\n"
        "class K:\n    def g(self):\n        import pkg.d\n"
        "from . import e\n"
    )
    assert imports_of("pkg.a", source, modules) == {"pkg", "pkg.b", "pkg.c", "pkg.d", "pkg.e"}
    assert imports_of("pkg", "from .a import x\nfrom . import b\n", modules, is_package=True) == {"pkg.a", "pkg.b"}


def test_the_cycle_finder_reports_each_circle_once() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"g"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"], ["g", "g"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert reachable({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == {"b": ["a", "b"], "c": ["a", "b", "c"]}


def test_the_graph_holds_every_module_and_a_known_import() -> None:
    graph = import_graph()
    assert {"pipeline.build", "pipeline.cli", "train.loop", "train.cli"} <= set(graph)
    assert "pipeline.build" in graph["pipeline.cli"] and "pipeline.errors" in graph["pipeline.build"]


def test_no_two_package_modules_import_each_other() -> None:
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles (function-local imports count):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_offline_stage_never_imports_the_trainer() -> None:
    graph = import_graph()
    top = {m: m.split(".")[0] for m in graph}
    wrong = [
        f"{m} imports {t}" for m in sorted(graph) if top[m] == "pipeline" for t in sorted(graph[m]) if top[t] == "train"
    ]
    assert not wrong, "the offline stage imports the trainer:\n" + "\n".join(wrong)


def test_the_training_loop_loads_no_inference_code() -> None:
    chains = reachable(import_graph(), "train.loop")
    wrong = [" -> ".join(chains[m]) for m in INFERENCE if m in chains]
    assert not wrong, "train.loop loads inference code:\n" + "\n".join(wrong)


def test_the_shared_homes_are_imported_one_way() -> None:
    """The homes that broke the old circles: both export writers share exportgraph, the remote readers share the
    read policy, the epoch split is one module that data and resplit import."""
    graph = import_graph()
    for writer, other in [("train.onnxexport", "train.tflite"), ("train.tflite", "train.onnxexport")]:
        assert "train.exportgraph" in graph[writer] and other not in reachable(graph, writer)
    assert not {"train.onnxexport", "train.tflite"} & set(reachable(graph, "train.exportgraph"))
    assert "pipeline.location" not in reachable(graph, "pipeline.http")
    assert not {"pipeline.location", "pipeline.http"} & set(reachable(graph, "pipeline.policy"))
    assert "train.split" in graph["train.data"] and "train.split" in graph["train.resplit"]
    assert "train.data" not in reachable(graph, "train.resplit")
