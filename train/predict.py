"""Inference with a trained checkpoint: raw parquet files -> top-k signs, and a validation report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.features import compact_features, pack_missing
from pipeline.read import LandmarkFileError, read_landmarks
from pipeline.shards import read_manifest
from train.data import Decoded, collate, make_loader
from train.loop import TrainConfig, load_checkpoint, model_from_checkpoint, predict_batches, resolve_device


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (sign, probability), best first
    error: str | None = None


def predict_files(checkpoint: str | Path, files: list[str | Path], k: int = 5, device: str = "auto",
                  batch_size: int = 64) -> list[Prediction]:  # fmt: skip
    """Top-k signs for raw Kaggle parquet files, through the pipeline's reader and preprocessing."""
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt).to(dev)
    names = {v: s for s, v in ckpt["label_map"].items()}
    results: dict[int, Prediction] = {}
    samples: list[tuple[int, Decoded]] = []
    for i, path in enumerate(files):
        try:
            compact, missing = compact_features(read_landmarks(path))
        except LandmarkFileError as exc:
            results[i] = Prediction(str(path), [], exc.reason)
            continue
        samples.append((i, Decoded(compact, pack_missing(missing), 0, str(path))))
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        _, logits = next(predict_batches(model, [collate([s for _, s in chunk])], dev))
        for (i, s), row in zip(chunk, logits.cpu(), strict=True):
            probs = torch.softmax(row, dim=-1)
            p, idx = probs.topk(min(k, len(names)))
            results[i] = Prediction(s.key, [(names[int(j)], float(q)) for q, j in zip(p, idx, strict=True)])
    return [results[i] for i in range(len(files))]


def evaluation_report(checkpoint: str | Path, shards: str | Path | None = None, folds: list[int] | None = None,
                      device: str = "auto", batch_size: int | None = None,
                      workers: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Top-1/top-5 on validation folds, per-sign accuracy and the most confused pairs, as plain JSON-able data.

    The defaults (the run's shards, validation folds, batch size, bucketing and workers, and its EMA
    weights when it has them) form the same batches of the same weights as the run's validation,
    so best.pt scores the best epoch's top-1 exactly (on one process and the same device type).
    """
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"])
    shards = shards or cfg.shards
    folds = folds if folds is not None else cfg.val_folds
    if not folds:
        raise ValueError(f"{checkpoint} was trained on every fold (--val-folds none), so it has no validation folds; "
                         "pass --folds to choose folds (they were seen in training)")  # fmt: skip
    if read_manifest(shards)["label_map"] != ckpt["label_map"]:
        raise ValueError(f"{shards}: its label map is not the one {checkpoint} was trained with")
    model = model_from_checkpoint(ckpt).to(dev)
    names = {v: s for s, v in ckpt["label_map"].items()}
    loader = make_loader(shards, folds, batch_size or cfg.batch_size, train=False,
                         workers=cfg.workers if workers is None else workers, bucket=cfg.bucket)  # fmt: skip
    labels, top5 = [], []
    for batch, logits in predict_batches(model, loader, dev):
        labels.append(batch.labels.cpu())
        top5.append(logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu())
    y, t5 = torch.cat(labels).numpy(), torch.cat(top5).numpy()
    pred = t5[:, 0]
    per_sign = []
    for label in np.unique(y):
        sel = y == label
        per_sign.append({"sign": names[int(label)], "top1": float((pred[sel] == label).mean()),
                         "samples": int(sel.sum())})  # fmt: skip
    confused = Counter((names[int(a)], names[int(b)]) for a, b in zip(y, pred, strict=True) if a != b)
    return {
        "checkpoint": str(checkpoint),
        "epoch": ckpt.get("epoch"),
        "step": ckpt.get("step"),
        "weights": "EMA" if ckpt.get("ema") else "raw",
        "shards": str(shards),
        "folds": list(folds),
        "samples": int(len(y)),
        "top1": float((pred == y).mean()),
        "top5": float((t5 == y[:, None]).any(axis=1).mean()),
        "worst_signs": sorted(per_sign, key=lambda w: (w["top1"], w["sign"]))[:10],
        "confused_pairs": [{"true": a, "predicted": b, "count": n} for (a, b), n in confused.most_common(10)],
    }
