"""Reader throughput against a bare pyarrow read of x, y, z on the same demo files, in one run.

    python bench/read.py [--files 1000] [--data-dir DIR] [--rounds 3]

Prints files/s for: the bare read, `read_landmarks` (validating reader), and read + preprocess,
with ratios against the bare read. Target: the reader within 1.3x of the bare read time.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from common import best_rate, ensure_demo

from pipeline.features import compact_features
from pipeline.read import read_landmarks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--data-dir", type=Path, default=None, help="reuse a demo dataset (generated when absent)")
    ap.add_argument("--rounds", type=int, default=3, help="best of N rounds per method, interleaved")
    args = ap.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-read-"))
    files = ensure_demo(data_dir, args.files)

    def bare() -> int:
        for f in files:
            pq.read_table(f, columns=["x", "y", "z"]).column("x").to_numpy()
        return len(files)

    def reader() -> int:
        for f in files:
            read_landmarks(f)
        return len(files)

    def reader_and_features() -> int:
        for f in files:
            compact_features(read_landmarks(f))
        return len(files)

    rates = {"bare pyarrow x,y,z": 0.0, "read_landmarks": 0.0, "read + preprocess": 0.0}
    for _ in range(args.rounds):  # interleave so that machine noise hits every method alike
        for name, fn in zip(rates, (bare, reader, reader_and_features), strict=True):
            rates[name] = max(rates[name], best_rate(fn, 1))
    base = rates["bare pyarrow x,y,z"]
    print(f"{len(files)} demo files, one process, best of {args.rounds} rounds")
    print(f"{'method':<22} {'files/s':>9} {'time vs bare':>13}")
    for name, rate in rates.items():
        print(f"{name:<22} {rate:>9.0f} {base / rate:>12.2f}x")
    ratio = base / rates["read_landmarks"]
    print(f"target: reader within 1.30x of the bare read time -> {ratio:.2f}x {'PASS' if ratio <= 1.3 else 'MISS'}")


if __name__ == "__main__":
    main()
