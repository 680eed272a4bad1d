"""What each piece of the 1st-place recipe is worth on demo data, in one run.

    python bench/recipe.py [--shards DIR | --sequences 2000 --signs 25] [--preset small] [--epochs 24] [--seeds 3]
                           [--rows default,awp,...]

Trains the default recipe, each piece added alone (AWP, late dropout, RAdam, RAdam in Lookahead) and
all of them together, over several seeds, validating on one held-out fold of participants (fold 0),
and prints for each row the mean ± std (population, over seeds) of the last epoch's top-1 (no epoch
is selected on the held-out fold), the difference from the default row, and the time per epoch with
its ratio to the default row's, all measured in this run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from common import ensure_demo

from pipeline.build import BuildOptions, build_shards
from train.config import TrainConfig
from train.loop import train

# Each row: the options it changes from the default recipe. The epoch a piece starts at is a
# quarter of the run, as 15 of the published 300 epochs came after the warm first ones.
AWP = {"awp": 0.2, "awp_from": None}
LATE_DROPOUT = {"late_dropout": 0.5, "late_dropout_from": None}
ROWS: dict[str, dict[str, Any]] = {
    "default": {},
    "awp": AWP,
    "late-dropout": LATE_DROPOUT,
    "radam": {"optimizer": "radam"},
    "radam-lookahead": {"optimizer": "radam-lookahead"},
    "all": {**AWP, **LATE_DROPOUT, "optimizer": "radam-lookahead"},
}
RECIPE_FIELDS = ("optimizer", "awp", "awp_from", "late_dropout", "late_dropout_from")


def row_config(name: str, base: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The options of row `name`: the base ones, the row's changes, start epochs at a quarter of the run."""
    changes = {k: (epochs // 4 if v is None else v) for k, v in ROWS[name].items()}
    return {**base, **changes}


def run_row(name: str, base: dict[str, Any], epochs: int, seed: int, out: Path) -> tuple[float, float]:
    """(last epoch's validation top-1, seconds per epoch) of one row and seed."""
    cfg = TrainConfig(**row_config(name, base, epochs), seed=seed, out=str(out / f"{name}-seed{seed}"))
    start = time.perf_counter()
    result = train(cfg)
    return result.metrics["val_top1"], (time.perf_counter() - start) / epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, default=None, help="shard directory (default: build from demo data)")
    ap.add_argument("--sequences", type=int, default=2000)
    ap.add_argument("--signs", type=int, default=25)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, from {', '.join(ROWS)}")
    args = ap.parse_args()
    if missing := [f for f in RECIPE_FIELDS if f not in {f.name for f in fields(TrainConfig)}]:
        sys.exit(f"TrainConfig lacks the recipe options {', '.join(missing)}: this trainer cannot run the benchmark")
    rows = args.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        sys.exit(f"--rows: unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if "default" not in rows:
        rows.insert(0, "default")  # the baseline every ratio is taken against
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    shards = args.shards
    if shards is None:
        ensure_demo(tmp / "data", args.sequences, args.signs)
        shards = tmp / "shards"
        build_shards(tmp / "data", shards, BuildOptions(folds=5), jobs=2)
    base = {
        "shards": str(shards),
        "preset": args.preset,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "workers": args.workers,
        "val_folds": [0],
        "device": "auto",
    }
    results: dict[str, list[tuple[float, float]]] = {}
    for name in rows:
        results[name] = [run_row(name, base, args.epochs, seed, tmp / "runs") for seed in range(args.seeds)]
    top1 = {n: [t for t, _ in r] for n, r in results.items()}
    epoch_s = {n: statistics.mean(s for _, s in r) for n, r in results.items()}
    ref_top1, ref_s = statistics.mean(top1["default"]), epoch_s["default"]
    print(f"{args.preset} preset, {args.epochs} epochs, {args.seeds} seeds, validated on fold 0 of {shards}")
    print(f"{'row':<16} {'top-1 (mean ± std)':>20} {'vs default':>11} {'s/epoch':>8} {'time ratio':>11}")
    for name in rows:
        mean, std = statistics.mean(top1[name]), statistics.pstdev(top1[name])
        print(
            f"{name:<16} {mean:>12.4f} ± {std:.4f} {mean - ref_top1:>+11.4f} {epoch_s[name]:>8.2f} "
            f"{epoch_s[name] / ref_s:>10.2f}x"
        )


if __name__ == "__main__":
    main()
