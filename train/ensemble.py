"""Ensembles of sign classifiers: the mean of the members' probabilities, over members that share one label map."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.errors import AslError
from pipeline.text import printable
from train.model import SignModel


class EnsembleError(AslError, ValueError):
    """Checkpoints or models that cannot make one ensemble; the message names two of them."""


def label_map_difference(a: dict[str, int], b: dict[str, int]) -> str | None:
    """How two label maps differ, in a few words (None when equal)."""
    if a == b:
        return None
    if only := sorted(set(a) - set(b)) or sorted(set(b) - set(a)):
        where = "the first" if only[0] in a else "the second"
        return f"{len(a)} and {len(b)} signs; {only[0]!r} is only in {where}"
    sign = min((s for s in a if a[s] != b[s]), key=a.get)
    return f"the same {len(a)} signs in another order ({sign!r} is index {a[sign]} in one, {b[sign]} in the other)"


def shared_label_map(members: Sequence[tuple[str, dict[str, int]]]) -> dict[str, int]:
    """The label map every member has: members are (file, label map); one line naming two files that differ."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    first, label_map = members[0]
    for name, other in members[1:]:
        if (why := label_map_difference(label_map, other)) is not None:
            raise EnsembleError(
                f"{printable(first)} and {printable(name)} have different label maps ({printable(why)}); "
                "ensemble members must share one"
            )
    return label_map


def shared_max_len(members: Sequence[tuple[str, int]]) -> int:
    """The max_len every member has: members are (file, max_len); one line naming two files that differ (one
    preprocessing truncates every member's input alike)."""
    (first, max_len), *others = members
    for name, other in others:
        if other != max_len:
            raise EnsembleError(
                f"{printable(first)} and {printable(name)} truncate sequences at different lengths ({max_len} and "
                f"{other} frames); ensemble members must share max_len"
            )
    return max_len


def mean_probabilities(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's (N, n_signs) probabilities: the mean of the members' arrays of that shape."""
    if not probabilities:
        raise ValueError("an ensemble needs at least one member")
    shapes = {p.shape for p in probabilities}
    if len(shapes) != 1:
        raise ValueError(f"members' probabilities differ in shape: {sorted(shapes)}")
    return np.mean(np.stack(probabilities), axis=0, dtype=np.float64).astype(probabilities[0].dtype)


def mean_log_probability(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the members' softmax, from their logits (..., n_signs): softmax of it is the mean.

    Computed as logsumexp of the log-softmaxes minus log(members), which stays finite where a member is sure.
    """
    stacked = torch.stack([torch.log_softmax(z.float(), dim=-1) for z in logits])  # (M, ..., n_signs)
    return torch.logsumexp(stacked, dim=0) - math.log(len(logits))


class EnsembleModel(nn.Module):
    """Sign models run side by side: `forward(x, mask)` like one `SignModel`, returning the log of the mean
    probability (so that a softmax, as applied to a single model's logits, gives the ensemble's mean)."""

    def __init__(self, models: Sequence[SignModel]) -> None:
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one member")
        if len({(m.cfg.n_classes, m.cfg.max_len) for m in models}) != 1:
            raise EnsembleError("ensemble members differ in their number of signs or their max_len")
        self.members = nn.ModuleList(models)
        self.cfg = models[0].cfg  # what a single-model wrapper reads (max_len, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, 118, 6), mask (B, T) -> (B, n_signs) log of the members' mean probability."""
        return mean_log_probability([m(x, mask) for m in self.members])


class EnsembleScorer:
    """Scorers (anything with `label_map` and `probabilities(sequences)`) averaged: itself such a scorer."""

    def __init__(self, members: Sequence[object], names: Sequence[str]) -> None:
        if len(members) != len(names):
            raise ValueError("one name per member")
        self.members = list(members)
        self.label_map: dict[str, int] = shared_label_map(
            [(n, m.label_map) for n, m in zip(names, members, strict=True)]  # type: ignore[attr-defined]
        )

    def probabilities(self, sequences: list[np.ndarray]) -> np.ndarray:
        """(T_i, 543, 3) raw landmarks of each sequence -> (N, n_signs) mean probabilities of the members."""
        return mean_probabilities([m.probabilities(sequences) for m in self.members])  # type: ignore[attr-defined]


def ensemble_of(models: Sequence[nn.Module]) -> nn.Module:
    """The one model, or an EnsembleModel of several (its outputs: the log of their mean probability)."""
    return models[0] if len(models) == 1 else EnsembleModel(models)  # type: ignore[arg-type]
