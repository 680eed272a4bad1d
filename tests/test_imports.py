"""The offline stage never loads torch or webdataset: not on import, not when it reads local shards."""

from __future__ import annotations

import json
import subprocess
import sys
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
