"""Shared fixtures: the read-only reference data in ../shared and helpers to write modified parquet files."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Generator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# The checkout's ../shared (the project's read-only reference data); ASL_SHARED points elsewhere.
SHARED = Path(os.environ.get("ASL_SHARED") or Path(__file__).resolve().parents[2] / "shared")
SAMPLE_ROOT = SHARED / "gislr-sample" / "train_landmark_files"
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


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{SKIP_REASON} at {path} (the checkout's ../shared directory is missing)")
    return path


@pytest.hookimpl(wrapper=True, tryfirst=True)  # the outermost wrapper: its line comes after the short summary
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Generator[None, None, None]:
    """One line saying how many tests skipped for want of ../shared, and what to do about it."""
    result = yield
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if SKIP_REASON in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} tests on real Kaggle files skipped: {SHARED} is missing "
            "(put the project's shared/ directory beside the checkout, or set ASL_SHARED; see README, Tests)",
            yellow=True,
        )
    return result


@pytest.fixture
def shared_dir() -> Path:
    """/work/shared (the checkout's ../shared); skips the test when it is absent."""
    return _require(SHARED)


@pytest.fixture
def bad_dir() -> Path:
    """../shared/gislr-bad: real files that are not in the Kaggle layout."""
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
