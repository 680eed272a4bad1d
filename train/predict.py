"""Inference: raw parquet files -> top-k signs (a checkpoint, an exported ONNX or LiteRT file); validation reports."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.cache import cache_view
from pipeline.features import compact_features, pack_missing
from pipeline.read import InputFileError, LandmarkFileError, read_file, read_landmarks
from pipeline.shards import ShardError, read_manifest
from train.batch import Batch
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.config import ConfigError, TrainConfig
from train.data import Decoded, checked, collate, make_loader
from train.distributed import autocast, resolve_device
from train.ensemble import EnsembleScorer, ensemble_of, shared_label_map

MAX_LIST_BYTES = 256 << 20  # an @LIST of every Kaggle file is about 5 MB
LIST_PREFIX = "@"  # `@paths.txt` on the command line: the parquet paths listed in paths.txt
FORMATS = ("text", "json", "csv")


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (sign, probability), best first
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: {"path", "top": [[sign, probability], ...], "error"}."""
        return {"path": self.path, "top": [[s, q] for s, q in self.top], "error": self.error}


@torch.no_grad()
def predict_batches(model: torch.nn.Module, loader: Any, device: torch.device) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch on device, logits) for every batch of a loader, in eval mode."""
    model.eval()
    for batch in checked(loader):
        batch = batch.to(device, non_blocking=device.type == "cuda")
        with autocast(device):
            logits = model(batch.x, batch.mask)
        yield batch, logits.float()


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
            compact, missing = compact_features(xyz)
            samples.append(Decoded(compact, pack_missing(missing), 0, ""))
        _, logits = next(predict_batches(self.model, [collate(samples)], self.device))
        return torch.softmax(logits, dim=-1).cpu().numpy()


@dataclass
class Members:
    """Checkpoints loaded as the members of an ensemble (one is an ensemble of one) and their shared label map."""

    paths: list[Path]
    checkpoints: list[dict[str, Any]]
    label_map: dict[str, int]

    def models(self, use_ema: bool = True) -> list[torch.nn.Module]:
        return [model_from_checkpoint(c, use_ema) for c in self.checkpoints]

    def configs(self) -> list[TrainConfig]:
        return [TrainConfig.from_dict(c["config"]) for c in self.checkpoints]


def load_members(paths: Sequence[str | Path]) -> Members:
    """Checkpoints as ensemble members; one line naming two files whose label maps differ."""
    checkpoints = [load_checkpoint(p) for p in paths]
    label_map = shared_label_map([(str(p), c["label_map"]) for p, c in zip(paths, checkpoints, strict=True)])
    return Members([Path(p) for p in paths], checkpoints, label_map)


class OnnxScorer:
    """A file written by `asl-train export`, run by onnxruntime one sequence at a time (its input is one sequence)."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        from train.export import OnnxClassifier

        self.model = OnnxClassifier(path, threads)
        self.label_map = self.model.label_map

    def probabilities(self, sequences: list[np.ndarray]) -> np.ndarray:
        from train.export import softmax

        return np.stack([softmax(self.model.logits(xyz)) for xyz in sequences])


class TFLiteScorer:
    """A `.tflite` file written by `asl-train export`, run by ai-edge-litert one sequence at a time."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from train.tflite import TFLiteClassifier

        self.model = TFLiteClassifier(path, threads)
        self.label_map = self.model.label_map

    def probabilities(self, sequences: list[np.ndarray]) -> np.ndarray:
        from train.export import softmax

        return np.stack([softmax(self.model.logits(xyz)) for xyz in sequences])


def exported_scorer(path: str | Path) -> OnnxScorer | TFLiteScorer:
    """The scorer for an exported file, chosen by its contents: LiteRT's flatbuffers say `TFL3` at byte 4."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise InputFileError(path, f"cannot read the model ({exc.strerror or exc})") from None
    return TFLiteScorer(path) if head[4:8] == b"TFL3" else OnnxScorer(path)


def model_scorer(paths: Sequence[str | Path]) -> Scorer:
    """An exported model, or the ensemble of several (the mean of their probabilities; one label map)."""
    members = [exported_scorer(p) for p in paths]
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
    found = sorted(path.rglob("*.parquet"))
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
        for i, path in enumerate(chunk):
            try:
                good.append((i, read_landmarks(path)))
            except LandmarkFileError as exc:
                results[i] = Prediction(path, [], exc.reason)
        if good:
            probs = scorer.probabilities([xyz for _, xyz in good])  # (N, n_signs)
            for (i, _), p in zip(good, probs, strict=True):
                best = np.argsort(-p, kind="stable")[:k]
                results[i] = Prediction(chunk[i], [(names[int(j)], float(p[j])) for j in best])
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


@dataclass
class SampleScores:
    """The probabilities a model (or ensemble) gives each sample of a loader, with the sample's ids and label."""

    keys: list[str]  # sequence ids
    participants: list[str]
    labels: np.ndarray  # (N,) int64
    probabilities: np.ndarray  # (N, n_signs) float64

    def top(self, k: int = 5) -> np.ndarray:
        """(N, k) label indices, most probable first (ties: the lower index first)."""
        return np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]


def score_samples(model: torch.nn.Module, loader: Any, device: torch.device) -> SampleScores:
    """Every sample of `loader` scored by `model` (logits, or an ensemble's log mean probability)."""
    keys: list[str] = []
    participants: list[str] = []
    labels, probabilities = [], []
    for batch, logits in predict_batches(model, loader, device):
        keys += batch.keys
        participants += batch.participants
        labels.append(batch.labels.cpu())
        probabilities.append(torch.softmax(logits.double(), dim=-1).cpu())  # float64: the logits' order is kept
    return SampleScores(keys, participants, torch.cat(labels).numpy(), torch.cat(probabilities).numpy())


def evaluation_scores(
    checkpoints: str | Path | Sequence[str | Path],
    shards: str | Path | None = None,
    folds: list[int] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    cache_limit: float | None = None,
) -> tuple[SampleScores, Members, dict[str, Any]]:
    """The scores of a checkpoint (or the ensemble of several) on validation folds; the members; where they ran
    (`shards`, `folds`).

    The defaults (the run's shards, validation folds, batch size, bucketing and workers, and its EMA
    weights when it has them) form the same batches of the same weights as the run's validation,
    so best.pt scores the best epoch's top-1 exactly (on one process and the same device type).
    An ensemble takes these defaults from its first member; its members must share their validation folds
    unless `folds` is given.
    """
    dev = resolve_device(device)
    members = load_members([checkpoints] if isinstance(checkpoints, str | Path) else list(checkpoints))
    configs = members.configs()
    cfg, first = configs[0], members.paths[0]
    shards = shards or cfg.shards
    if folds is None:
        for path, other in zip(members.paths, configs, strict=True):
            if other.val_folds != cfg.val_folds:
                raise ConfigError(
                    f"{first} and {path} were validated on different folds ({cfg.val_folds} and "
                    f"{other.val_folds}); pass --folds to choose the folds to evaluate"
                )
        folds = cfg.val_folds
    if not folds:
        raise ConfigError(
            f"{first} was trained on every fold (--val-folds none), so it has no validation folds; "
            "pass --folds to choose folds (they were seen in training)"
        )
    manifest = read_manifest(shards, cfg.read_policy())  # once: from a URL, every read is a fetch
    if manifest["label_map"] != members.label_map:
        raise ShardError(f"{shards}: its label map is not the one {first} was trained with")
    model = ensemble_of(members.models()).to(dev)
    loader = make_loader(
        shards,
        folds,
        batch_size or cfg.batch_size,
        train=False,
        manifest=manifest,
        workers=cfg.workers if workers is None else workers,
        bucket=cfg.bucket,
        policy=cfg.read_policy(),
        cache=cache_view(cache_dir, cache_limit, shards, manifest),
    )
    return score_samples(model, loader, dev), members, {"shards": str(shards), "folds": list(folds)}


def accuracy_by(groups: Sequence[str], hits: np.ndarray) -> dict[str, dict[str, Any]]:
    """{group: {top1, samples}} of boolean `hits` grouped by `groups` (one per sample), in group order."""
    names, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    counts = np.bincount(index, minlength=len(names))
    right = np.bincount(index, weights=hits.astype(np.float64), minlength=len(names))
    return {str(n): {"top1": float(r / c), "samples": int(c)} for n, r, c in zip(names, right, counts, strict=True)}


def _member(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    weights = "EMA" if ckpt.get("ema") else "raw"
    return {"checkpoint": str(path), "epoch": ckpt.get("epoch"), "step": ckpt.get("step"), "weights": weights}


def evaluation_report(
    checkpoints: str | Path | Sequence[str | Path],
    shards: str | Path | None = None,
    folds: list[int] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    cache_limit: float | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 on validation folds, per-sign and per-participant accuracy, the most confused pairs and the
    confusion among the most confused signs, as plain JSON-able data (see `evaluation_scores` for the defaults)."""
    from train.confusion import confusion_of

    scores, members, where = evaluation_scores(
        checkpoints, shards, folds, device, batch_size, workers, cache_dir, cache_limit
    )
    names = np.array(sorted(members.label_map, key=members.label_map.get), dtype=object)
    y, t5 = scores.labels, scores.top(5)
    pred = t5[:, 0]
    hit = pred == y
    per_sign = [{"sign": s, **v} for s, v in accuracy_by(names[y], hit).items()]
    per_participant = accuracy_by(scores.participants, hit)
    confused = Counter((names[a], names[b]) for a, b in zip(y, pred, strict=True) if a != b)
    return {
        **(_member(members.paths[0], members.checkpoints[0]) if len(members.paths) == 1 else {}),
        "members": [_member(p, c) for p, c in zip(members.paths, members.checkpoints, strict=True)],
        **where,
        "samples": int(len(y)),
        "top1": float(hit.mean()),
        "top5": float((t5 == y[:, None]).any(axis=1).mean()),
        "worst_signs": sorted(per_sign, key=lambda w: (w["top1"], w["sign"]))[:10],
        "participants": per_participant,
        "confused_pairs": [{"true": a, "predicted": b, "count": n} for (a, b), n in confused.most_common(10)],
        "confusion": confusion_of(names[y], names[pred]),
    }
