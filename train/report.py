"""Where a run's numbers go besides metrics.jsonl (`--report-to`): TensorBoard event files and CSV files.

Every backend takes the same three calls from the training loop (rank 0 only): `log_step` every
`--log-every` steps (loss, lr, samples/s), `log_epoch` at each epoch end (the metrics.jsonl row),
`close` at the end. A resumed run first drops what was logged after the checkpoint it starts from,
so the logs hold each step once, as metrics.jsonl does.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import AslError
from pipeline.files import write_atomic

BACKENDS = ("tensorboard", "csv")
TENSORBOARD_MISSING = "--report-to tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'"
STEP_COLUMNS = ["step", "epoch", "loss", "lr", "samples_per_s"]
EPOCH_COLUMNS = [
    "epoch",
    "step",
    "train_loss",
    "train_samples",
    "lr",
    "samples_per_s",
    "val_loss",
    "val_top1",
    "val_top5",
    "val_samples",
]


class BackendError(AslError, RuntimeError):
    """A backend that is unknown, or whose package is not installed."""


class LogWriteError(AslError, OSError):
    """A log file that cannot be written (a full disk, say); the message names it."""

    def __init__(self, path: str | Path, exc: OSError) -> None:
        super().__init__(f"{path}: cannot write the log ({exc.strerror or exc})")


@contextlib.contextmanager
def writing_log(path: str | Path) -> Iterator[None]:
    """An OSError inside becomes the one-line `LogWriteError` naming `path`."""
    try:
        yield
    except OSError as exc:
        raise LogWriteError(path, exc) from None


class Reporter(Protocol):
    def log_step(self, step: int, values: dict[str, float]) -> None: ...

    def log_epoch(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardReporter:
    """Scalars `train/loss`, `train/lr`, `train/samples_per_s` per logged step, `epoch/<metric>` per epoch."""

    def __init__(self, out: Path, start_step: int, epochs_done: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise BackendError(TENSORBOARD_MISSING) from None
        self.dir = out / "tensorboard"
        # purge_step hides the events a killed run logged after the checkpoint this one resumes from
        self.writer = SummaryWriter(str(self.dir), purge_step=start_step + 1)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        with writing_log(self.dir):  # the event writer's thread keeps a write error and raises it at the next call
            for name in ("loss", "lr", "samples_per_s"):
                self.writer.add_scalar(f"train/{name}", values[name], step)

    def log_epoch(self, step: int, metrics: dict[str, Any]) -> None:
        with writing_log(self.dir):
            for name, value in metrics.items():
                if name != "step":
                    self.writer.add_scalar(f"epoch/{name}", value, step)
            self.writer.flush()

    def close(self) -> None:
        with writing_log(self.dir):
            self.writer.close()


class CsvLog:
    """One CSV file, appended a row at a time and flushed; rows whose `key` is over `last` are dropped first."""

    def __init__(self, path: Path, columns: list[str], last: int, key: str = "step") -> None:
        self.path, self.columns = path, columns
        with writing_log(path):
            keep_rows(path, columns, last, key)
            new = not path.exists()
            self.file = open(path, "a", newline="")  # noqa: SIM115 - open for the whole run, closed by close()
            self.writer = csv.DictWriter(self.file, columns, restval="", extrasaction="ignore")
            if new:
                self.writer.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        with writing_log(self.path):
            self.writer.writerow(row)
            self.file.flush()

    def close(self) -> None:
        with writing_log(self.path):
            self.file.close()


def keep_rows(path: Path, columns: list[str], last: int, key: str = "step") -> None:
    """Rewrite `path` (atomically) with its well-formed rows whose `key` is at most `last` (none for a new run)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [
        r
        for r in rows[1:]
        if len(r) == len(columns) and _int(r, columns, key) is not None and _int(r, columns, key) <= last
    ]
    buf = io.StringIO()
    csv.writer(buf).writerows([columns, *kept])
    write_atomic(path, buf.getvalue().encode())


def _int(row: list[str], columns: list[str], key: str) -> int | None:
    try:
        return int(row[columns.index(key)])
    except ValueError:
        return None  # a row cut short by a kill


class CsvReporter:
    """`steps.csv` (step, epoch, loss, lr, samples/s) and `epochs.csv` (the metrics.jsonl rows) in the run."""

    def __init__(self, out: Path, start_step: int, epochs_done: int) -> None:
        self.steps = CsvLog(out / "steps.csv", STEP_COLUMNS, start_step)
        # by epoch: a run cut mid-epoch by --max-steps logged that epoch's row, which its resume logs again
        self.epochs = CsvLog(out / "epochs.csv", EPOCH_COLUMNS, epochs_done, key="epoch")

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.steps.write({"step": step, **values})

    def log_epoch(self, step: int, metrics: dict[str, Any]) -> None:
        self.epochs.write(metrics)

    def close(self) -> None:
        self.steps.close()
        self.epochs.close()


class Reporters:
    """Every chosen backend behind the one interface (no backend: calls do nothing)."""

    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for r in self.reporters:
            r.log_step(step, values)

    def log_epoch(self, step: int, metrics: dict[str, Any]) -> None:
        for r in self.reporters:
            r.log_epoch(step, metrics)

    def close(self) -> None:
        for r in self.reporters:
            r.close()


def check_backends(names: list[str]) -> None:
    """Refuse unknown backends, and TensorBoard when its package is not installed."""
    if unknown := sorted(set(names) - set(BACKENDS)):
        raise BackendError(f"unknown --report-to {', '.join(unknown)}; choose from none, {', '.join(BACKENDS)}")
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise BackendError(TENSORBOARD_MISSING)


def open_reporters(names: list[str], out: Path, start_step: int, epochs_done: int) -> Reporters:
    """The backends `names` (a subset of BACKENDS) writing into the run directory `out`, continuing a run at
    `start_step` after `epochs_done` whole epochs (0, 0: a new run)."""
    check_backends(names)
    make = {"tensorboard": TensorBoardReporter, "csv": CsvReporter}
    return Reporters([make[name](out, start_step, epochs_done) for name in names])
