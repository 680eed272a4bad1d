"""Inference: raw parquet files -> top-k signs (a checkpoint, an exported ONNX or LiteRT file)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.features import compact_features, pack_missing
from pipeline.read import InputFileError, LandmarkFileError, read_file
from pipeline.video import VideoError, is_video
from train.data import Decoded, collate
from train.distributed import resolve_device
from train.ensemble import EnsembleScorer, ensemble_of
from train.scoring import load_members, predict_batches
from train.videoinput import read_sequence

MAX_LIST_BYTES = 256 << 20  # an @LIST of every Kaggle file is about 5 MB
LIST_PREFIX = "@"  # `@paths.txt` on the command line: the parquet paths listed in paths.txt
FORMATS = ("text", "json", "csv")


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (sign, probability), best first
    error: str | None = None
    video: dict[str, Any] | None = None  # a video's frames read and share of frames with a hand found

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: {"path", "top": [[sign, probability], ...], "error"}, and a video's "frames", "hand_share"."""
        return {"path": self.path, "top": [[s, q] for s, q in self.top], "error": self.error, **(self.video or {})}


class Scorer(Protocol):
    """Anything that turns raw sequences into sign probabilities."""

    label_map: dict[str, int]

    def probabilities(self, sequences: list[np.ndarray]) -> np.ndarray:
        """(T_i, 543, 3) raw landmarks of each sequence -> (N, n_signs) probabilities."""
        ...


class CheckpointScorer:
    """Training checkpoints' models in PyTorch, on the pipeline's numpy preprocessing, a batch at a time.

    Several checkpoints form an ensemble: the mean of their probabilities (they must share one label map).
    """

    def __init__(
        self, checkpoints: str | Path | Sequence[str | Path], device: str = "auto", use_ema: bool = True
    ) -> None:
        self.device = resolve_device(device)
        paths = [checkpoints] if isinstance(checkpoints, str | Path) else list(checkpoints)
        members = load_members(paths)
        self.label_map: dict[str, int] = members.label_map
        self.model = ensemble_of(members.models(use_ema)).to(self.device)

    def probabilities(self, sequences: list[np.ndarray]) -> np.ndarray:
        samples = []
        for xyz in sequences:
            compact, missing = compact_features(xyz, self.model.cfg.max_len)  # truncated as the export truncates
            samples.append(Decoded(compact, pack_missing(missing), 0, ""))
        _, logits = next(predict_batches(self.model, [collate(samples)], self.device))
        return torch.softmax(logits, dim=-1).cpu().numpy()


def model_scorer(paths: Sequence[str | Path], label_map: str | Path | None = None) -> Scorer:
    """Model files (ONNX or LiteRT, told apart by their contents), or the ensemble of several (the mean of their
    probabilities; one label map). `label_map`: a label map file, for models without our metadata."""
    from train.modelfile import ModelFile

    members = [ModelFile(p, label_map) for p in paths]
    return members[0] if len(members) == 1 else EnsembleScorer(members, [str(p) for p in paths])


def expand_inputs(args: Iterable[str | Path]) -> list[Path]:
    """The parquet files named on a command line, in order.

    A directory stands for every `*.parquet` under it (recursively, sorted); `@LIST` for the paths
    listed in the file LIST, one a line (blank lines and lines starting with `#` skipped; relative paths
    are relative to the current directory, as on the command line; a listed directory expands too).
    Any other argument is a file, kept as given (a missing one is reported by the prediction).
    """
    files: list[Path] = []
    for arg in args:
        text = str(arg)
        listed = text.startswith(LIST_PREFIX)
        for path in _list_lines(Path(text[len(LIST_PREFIX) :])) if listed else [Path(text)]:
            files.extend(_files_at(path))
    return files


def _list_lines(path: Path) -> list[Path]:
    try:  # the input gate: a FIFO or /dev/zero is refused, never waited on or read without end
        lines = read_file(path, MAX_LIST_BYTES).decode().splitlines()
    except InputFileError as exc:
        raise InputFileError(path, f"cannot read the list of files ({exc.reason})") from None
    except UnicodeDecodeError:
        raise InputFileError(path, "the list of files is not UTF-8 text") from None
    return [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _files_at(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    found = sorted(p for p in path.rglob("*") if p.suffix == ".parquet" or (is_video(p) and not p.is_dir()))
    if not found:
        raise InputFileError(path, "no *.parquet files under this directory")
    return found


def iter_predictions(
    scorer: Scorer, files: Sequence[str | Path], k: int = 5, batch_size: int = 64
) -> Iterator[Prediction]:
    """Top-k signs for each file in order, read and scored `batch_size` files at a time (memory stays flat).

    A file that cannot be read gets its reason in `error` and no signs; the others are still predicted.
    """
    names = {v: s for s, v in scorer.label_map.items()}
    for start in range(0, len(files), batch_size):
        chunk = [str(f) for f in files[start : start + batch_size]]
        results: dict[int, Prediction] = {}
        good: list[tuple[int, np.ndarray]] = []
        videos: dict[int, dict[str, Any] | None] = {}
        for i, path in enumerate(chunk):
            try:
                xyz, videos[i] = read_sequence(path)
                good.append((i, xyz))
            except (LandmarkFileError, VideoError) as exc:
                results[i] = Prediction(path, [], exc.reason)
        if good:
            probs = scorer.probabilities([xyz for _, xyz in good])  # (N, n_signs)
            for (i, _), p in zip(good, probs, strict=True):
                best = np.argsort(-p, kind="stable")[:k]
                results[i] = Prediction(chunk[i], [(names[int(j)], float(p[j])) for j in best], video=videos[i])
        yield from (results[i] for i in range(len(chunk)))


def csv_header(k: int) -> str:
    """The CSV header line: path, then sign_i and probability_i for i = 1..k, then error."""
    ranks = [f"{name}_{i}" for i in range(1, k + 1) for name in ("sign", "probability")]
    return _csv_line(["path", *ranks, "error"])


def format_prediction(p: Prediction, fmt: str, k: int) -> str:
    """One line for a prediction: `text` (path: sign probability, ...), `json` (one object) or `csv` (k columns)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(p.as_dict())
    if fmt == "csv":
        cells = [c for sign, q in p.top for c in (sign, repr(q))]
        return _csv_line([p.path, *cells, *[""] * (2 * k - len(cells)), p.error or ""])
    if p.error:
        return f"{p.path}: ERROR {p.error}"
    return f"{p.path}: " + ", ".join(f"{s} {q:.3f}" for s, q in p.top)


def _csv_line(cells: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue()
