"""Shared helpers for the benchmark scripts: demo data on demand and best-of-N timing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pipeline.demo import write_demo_dataset


def ensure_demo(data_dir: Path, sequences: int, signs: int = 25, seed: int = 0) -> list[Path]:
    """The parquet files of a demo dataset in `data_dir`, generating it when train.csv is absent."""
    if not (data_dir / "train.csv").exists():
        write_demo_dataset(data_dir, sequences=sequences, signs=signs, seed=seed, jobs=2)
    return sorted((data_dir / "train_landmark_files").glob("*/*.parquet"))[:sequences]


def best_rate(fn: Callable[[], int], rounds: int) -> float:
    """Items per second of `fn()` (which returns the item count), best of `rounds` runs."""
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - start))
    return best
