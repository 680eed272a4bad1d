"""Shared fixtures: the shared data (real Kaggle files, read-only) and helpers to write modified parquet files.

The shared data is found one way only, here: the directory named by ASL_SHARED, else the checkout's ../shared.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Generator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SHARED = Path(os.environ.get("ASL_SHARED") or Path(__file__).resolve().parents[2] / "shared")
SAMPLE_DATA = SHARED / "gislr-sample"  # three real sequences in the Kaggle layout (train.csv, label map, files)
SAMPLE_ROOT = SAMPLE_DATA / "train_landmark_files"
BAD_ROOT = SHARED / "gislr-bad"

# The three real sequences of shared/gislr-sample and their frame counts (rows / 543).
SAMPLE_FRAMES = {
    "16069/100015657.parquet": 105,
    "22343/239181.parquet": 30,
    "49445/1006440534.parquet": 3,
}
# The file the rejection tests modify: 30 frames numbered 21..50, hands partly NaN.
GOOD_SAMPLE = "22343/239181.parquet"


SKIP_REASON = "shared test data not found"
_MISSING = re.compile(re.escape(SKIP_REASON) + r": (.*) is missing")


def _first_missing(path: Path) -> Path:
    """The outermost missing directory or file from SHARED down to `path`."""
    return next(p for p in [*reversed(path.parents), path] if (p == SHARED or SHARED in p.parents) and not p.exists())


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{SKIP_REASON}: {_first_missing(path)} is missing")
    return path


@pytest.hookimpl(wrapper=True, tryfirst=True)  # the outermost wrapper: its line comes after the short summary
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Generator[None, None, None]:
    """One line saying how many tests skipped for want of the shared data, what is missing, and what to do."""
    result = yield
    reports = terminalreporter.stats.get("skipped", [])
    reasons = [r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr) for r in reports]
    missing = sorted({m.group(1) for reason in reasons if (m := _MISSING.search(reason))})
    if missing:
        skipped = sum(SKIP_REASON in reason for reason in reasons)
        terminalreporter.write_line(
            f"{skipped} tests on real Kaggle files skipped: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (set ASL_SHARED to the project's shared/ directory, "
            "or put it beside the checkout as ../shared; see README, Tests)",
            yellow=True,
        )
    return result


@pytest.fixture
def shared_dir() -> Path:
    """The shared data directory; skips the test when it is absent."""
    return _require(SHARED)


@pytest.fixture
def sample_data() -> Path:
    """shared/gislr-sample: three real sequences in the Kaggle layout (read-only)."""
    return _require(SAMPLE_DATA)


@pytest.fixture
def bad_dir() -> Path:
    """shared/gislr-bad: real files that are not in the Kaggle layout (read-only)."""
    return _require(BAD_ROOT)


@pytest.fixture(params=sorted(SAMPLE_FRAMES), ids=lambda rel: rel.split("/")[-1].removesuffix(".parquet"))
def sample_file(request: pytest.FixtureRequest) -> tuple[Path, int]:
    """(path, frame count) of each real sample sequence in turn."""
    return _require(SAMPLE_ROOT / request.param), SAMPLE_FRAMES[request.param]


@pytest.fixture
def good_parquet(tmp_path: Path) -> Path:
    """A private, writable copy of a real Kaggle landmark file."""
    src = _require(SAMPLE_ROOT / GOOD_SAMPLE)
    dst = tmp_path / "good.parquet"
    shutil.copyfile(src, dst)
    return dst


@pytest.fixture
def good_table(good_parquet: Path) -> pa.Table:
    """The good file's full table (all seven columns, file order)."""
    return pq.read_table(good_parquet)


@pytest.fixture
def write_parquet(tmp_path: Path) -> Callable[..., Path]:
    """`write_parquet(table, name="modified.parquet", **write_table_kwargs) -> path` inside tmp_path."""

    def write(table: pa.Table, name: str = "modified.parquet", **kwargs: object) -> Path:
        path = tmp_path / name
        pq.write_table(table, path, **kwargs)
        return path

    return write
