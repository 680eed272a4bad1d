"""Scoring on shards: a checkpoint, or the ensemble of several, run over a loader's batches; the validation
report `evaluate` prints. Shared by the training loop (validation) and inference, which both import it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import cache_view
from pipeline.shards import ShardError, read_manifest
from train.batch import Batch
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.config import ConfigError, TrainConfig
from train.data import checked, make_loader
from train.distributed import autocast, resolve_device
from train.ensemble import ensemble_of, shared_label_map, shared_max_len


@torch.no_grad()
def predict_batches(model: torch.nn.Module, loader: Any, device: torch.device) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch on device, logits) for every batch of a loader, in eval mode."""
    model.eval()
    for batch in checked(loader):
        batch = batch.to(device, non_blocking=device.type == "cuda")
        with autocast(device):
            logits = model(batch.x, batch.mask)
        yield batch, logits.float()


@dataclass
class Members:
    """Checkpoints loaded as the members of an ensemble (one is an ensemble of one) and their shared label map."""

    paths: list[Path]
    checkpoints: list[dict[str, Any]]
    label_map: dict[str, int]

    def models(self, use_ema: bool = True) -> list[torch.nn.Module]:
        models = [model_from_checkpoint(c, use_ema) for c in self.checkpoints]
        shared_max_len([(str(p), m.cfg.max_len) for p, m in zip(self.paths, models, strict=True)])
        return models

    def configs(self) -> list[TrainConfig]:
        return [TrainConfig.from_dict(c["config"]) for c in self.checkpoints]


def load_members(paths: Sequence[str | Path]) -> Members:
    """Checkpoints as ensemble members; one line naming two files whose label maps differ."""
    checkpoints = [load_checkpoint(p) for p in paths]
    label_map = shared_label_map([(str(p), c["label_map"]) for p, c in zip(paths, checkpoints, strict=True)])
    return Members([Path(p) for p in paths], checkpoints, label_map)


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
    longest = max((max(e["lengths"], default=0) for e in manifest["shards"] if e["fold"] in folds), default=0)
    if longest > model.cfg.max_len:
        raise ConfigError(
            f"{first} takes sequences of up to {model.cfg.max_len} frames (its max_len); folds "
            f"{','.join(map(str, folds))} of {shards} hold some of {longest}"
        )
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
    trained = trained_folds(manifest, configs, folds)
    return score_samples(model, loader, dev), members, {"shards": str(shards), "folds": list(folds), **trained}


def trained_folds(manifest: dict[str, Any], configs: Sequence[TrainConfig], folds: Sequence[int]) -> dict[str, Any]:
    """{"trained_folds": the folds of `folds` that a member trained on (every fold of the manifest but its
    validation folds)}: their scores are not held out."""
    known = [f["fold"] for f in manifest["folds"]]
    seen = {f for cfg in configs for f in known if f not in cfg.val_folds}
    return {"trained_folds": [f for f in folds if f in seen]}


def accuracy_by(groups: Sequence[str], hits: np.ndarray) -> dict[str, dict[str, Any]]:
    """{group: {top1, samples}} of boolean `hits` grouped by `groups` (one per sample), in group order."""
    names, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    counts = np.bincount(index, minlength=len(names))
    right = np.bincount(index, weights=hits.astype(np.float64), minlength=len(names))
    return {str(n): {"top1": float(r / c), "samples": int(c)} for n, r, c in zip(names, right, counts, strict=True)}


def _member(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    weights = "EMA" if ckpt.get("ema") else "raw"
    return {"checkpoint": str(path), "epoch": ckpt.get("epoch"), "step": ckpt.get("step"), "weights": weights}


def evaluation_report(checkpoints: str | Path | Sequence[str | Path], **options: Any) -> dict[str, Any]:
    """Top-1/top-5 on validation folds, per-sign and per-participant accuracy, the most confused pairs and the
    confusion among the most confused signs, as plain JSON-able data (`options` and their defaults: those of
    `evaluation_scores`)."""
    from train.confusion import confusion_of

    scores, members, where = evaluation_scores(checkpoints, **options)
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
