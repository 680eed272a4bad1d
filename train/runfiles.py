"""The files of a run directory besides checkpoints: metrics.jsonl, config.json, curves.png, and the
lines that sum a run up. (`--report-to` backends: `train.report`.)

metrics.jsonl holds one JSON object per finished epoch; a resumed run first drops the epochs logged
after the checkpoint it starts from, so each epoch appears once.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import AslError
from pipeline.files import LockHeldError, atomic_file, locked, write_atomic, write_json_atomic

METRICS = "metrics.jsonl"
LOCK = "run.lock"  # held while a process trains into the directory (`run_lock`)


class RunDirError(AslError, OSError):
    """A run directory that cannot be used: it already holds a run, or it cannot be written."""


def check_new_run(out: Path) -> None:
    """Refuse a directory that holds a run already (its last.pt)."""
    if (out / "last.pt").exists():
        raise RunDirError(f"{out} already holds a run; continue it with --resume {out}, or pick another --out")


def open_run_dir(out: Path, config: dict[str, Any], epochs_done: int) -> None:
    """Create `out`, keep the metrics of its first `epochs_done` epochs, write config.json."""
    out.mkdir(parents=True, exist_ok=True)
    keep_metrics(out / METRICS, epochs_done)
    write_json_atomic(out / "config.json", config)


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold `out`/run.lock (creating `out`) while a process writes the run: a second process is refused at once,
    naming the holder's pid."""
    held, created = False, not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        try:
            with locked(out / LOCK):
                held = True
                yield
        finally:
            if created and held:  # a new run that failed before writing anything leaves no directory behind
                with contextlib.suppress(OSError):
                    out.rmdir()
    except LockHeldError as exc:
        if held:
            raise
        raise RunDirError(
            f"{out} is in use by another run (pid {exc.pid}); wait for it to end, or pick another --out"
        ) from None
    except OSError as exc:
        if held:
            raise
        raise RunDirError(f"{out}: cannot create the run directory or its lock ({exc.strerror or exc})") from None


def append_metrics(out: Path, row: dict[str, Any]) -> None:
    """One epoch's row at the end of metrics.jsonl."""
    try:
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as exc:
        raise RunDirError(f"{out / METRICS}: cannot write the epoch's metrics ({exc.strerror or exc})") from None


def keep_metrics(path: Path, epochs: int) -> None:
    """Keep the metrics of the first `epochs` epochs only (none for a new run), rewritten atomically."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if _epoch_of(line) is not None]
    kept = "".join(line + "\n" for line in rows if _epoch_of(line) <= epochs)
    write_atomic(path, kept.encode())


def _epoch_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The epochs' rows of run/metrics.jsonl, in order (none when it does not exist yet)."""
    path = Path(run) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if _epoch_of(line) is not None]


def best_epoch(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row of the first epoch with the highest validation top-1: the epoch best.pt holds (None: no validation)."""
    return max((r for r in rows if "val_top1" in r), key=lambda r: r["val_top1"], default=None)


def run_summary(out: Path, report_to: list[str]) -> list[str]:
    """The last lines of a run: its result (best epoch or, without validation, the last) and where its files are."""
    rows = read_metrics(out)
    if not rows:
        return [f"no epoch finished -> {out}"]
    last, best = rows[-1], best_epoch(rows)
    if best is not None:
        lines = [
            f"best epoch {best['epoch']} of {last['epoch']}: validation top-1 {best['val_top1']:.4f}, top-5 "
            f"{best['val_top5']:.4f} on {best['val_samples']} samples (what `asl-train evaluate --checkpoint "
            f"{out / 'best.pt'}` reports)",
            f"  best.pt      {out / 'best.pt'}  (epoch {best['epoch']}, step {best['step']})",
        ]
    else:
        lines = [
            f"no validation (--val-folds none): trained on every fold, {last['train_samples']} samples an "
            f"epoch; the result is last.pt (no best.pt is written)"
        ]
    lines.append(f"  last.pt      {out / 'last.pt'}  (epoch {last['epoch']}, step {last['step']})")
    curves = out / "curves.png"
    lines.append(
        f"  curves       {curves}"
        if curves.exists()
        else "  curves       not drawn: matplotlib is not installed (pip install -e '.[plot]')"
    )
    if "tensorboard" in report_to:
        lines.append(f"  tensorboard  {out / 'tensorboard'}  (tensorboard --logdir {out / 'tensorboard'})")
    if "csv" in report_to:
        lines.append(f"  csv          {out / 'steps.csv'}, {out / 'epochs.csv'}")
    return lines


def plot_curves(run: Path) -> Path | None:
    """Write run/curves.png from metrics.jsonl when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(run)
    if not rows:
        return None
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    folds = ",".join(map(str, cfg.get("val_folds", []))) or "none"
    fig = curves_figure(rows, f"{run.resolve().name}  (preset {cfg.get('preset', '?')}, val folds {folds})")
    try:
        with atomic_file(run / "curves.png") as f:
            fig.savefig(f, format="png")
    except OSError as exc:
        raise RunDirError(f"{run / 'curves.png'}: cannot write the curves ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return run / "curves.png"


def curves_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """Loss and validation accuracy against whole epochs, the best epoch marked (a matplotlib Figure)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    best = best_epoch(rows)
    fig, axes = plt.subplots(1, 2 if best else 1, figsize=(11 if best else 6, 4.5), squeeze=False)
    loss = axes[0][0]
    epochs = [r["epoch"] for r in rows]
    loss.plot(epochs, [r["train_loss"] for r in rows], marker=".", label="train")
    loss.set_ylabel("loss")
    if best:
        acc = axes[0][1]
        loss.plot(epochs, [r["val_loss"] for r in rows], marker=".", label="validation")
        acc.plot(epochs, [r["val_top1"] for r in rows], marker=".", label="top-1")
        acc.plot(epochs, [r["val_top5"] for r in rows], marker=".", label="top-5")
        acc.plot(
            [best["epoch"]],
            [best["val_top1"]],
            "r*",
            markersize=14,
            label=f"best: epoch {best['epoch']}, top-1 {best['val_top1']:.4f}",
        )
        acc.set_ylabel("validation accuracy")
        for ax in axes[0]:
            ax.axvline(best["epoch"], color="red", linestyle=":", linewidth=1)
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.suptitle(title if best else f"{title}: no validation, the result is last.pt")
    fig.tight_layout()
    return fig
