"""Tiny demo datasets and shards shared by the tests, built once per session and cached by their arguments.

Both are built in the test's own process (`jobs=1`): the tests that run worker processes say so (marker `slow`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.build import BuildOptions, build_shards
from pipeline.demo import write_demo_dataset

_CACHE: dict[tuple, Path] = {}


def demo_dataset(base: Path, sequences: int = 300, signs: int = 5, participants: int = 6, seed: int = 0) -> Path:
    """A demo dataset in the Kaggle layout under `base` (reused for the same arguments)."""
    key = ("data", sequences, signs, participants, seed)
    if key not in _CACHE:
        out = base / f"demo-{sequences}-{signs}-{participants}-{seed}"
        write_demo_dataset(out, sequences=sequences, signs=signs, participants=participants, seed=seed, jobs=1)
        _CACHE[key] = out
    return _CACHE[key]


def demo_shards(
    base: Path, data_dir: Path, shard_size: int = 40, folds: int = 3, dtype: str = "float16", layout: str = "compact"
) -> Path:
    """Shards built from `data_dir` (reused for the same arguments); treat them as read-only."""
    key = ("shards", str(data_dir), shard_size, folds, dtype, layout)
    if key not in _CACHE:
        out = base / f"shards-{data_dir.name}-{shard_size}-{folds}-{dtype}-{layout}"
        build_shards(
            data_dir, out, BuildOptions(shard_size=shard_size, folds=folds, dtype=dtype, layout=layout), jobs=1
        )
        _CACHE[key] = out
    return _CACHE[key]
