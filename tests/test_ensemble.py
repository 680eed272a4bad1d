"""Tests for train/ensemble.py: the mean of probabilities, its log form, the label-map check, the module and scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.features import N_CHANNELS
from pipeline.landmarks import N_POINTS
from train.ensemble import (
    EnsembleModel,
    EnsembleScorer,
    mean_log_probability,
    mean_probabilities,
    shared_label_map,
)
from train.model import SignModel, model_config

MAP = {"apple": 0, "bird": 1, "cloud": 2}


def _probs(seed: int, n: int = 4, k: int = 3) -> np.ndarray:
    z = np.random.default_rng(seed).normal(size=(n, k)).astype(np.float32)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def test_mean_probabilities_is_the_elementwise_mean() -> None:
    a, b, c = _probs(0), _probs(1), _probs(2)
    got = mean_probabilities([a, b, c])
    np.testing.assert_allclose(got, (a.astype(np.float64) + b + c) / 3, rtol=1e-6)
    assert got.dtype == np.float32 and np.allclose(got.sum(axis=1), 1.0)
    np.testing.assert_array_equal(mean_probabilities([a]), a)
    with pytest.raises(ValueError, match="differ in shape"):
        mean_probabilities([a, _probs(3, k=4)])


def test_mean_log_probability_softmaxes_to_the_mean_and_stays_finite() -> None:
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 7, generator=g) * 4 for _ in range(3)]
    out = mean_log_probability(logits)
    want = torch.stack([torch.softmax(z, dim=-1) for z in logits]).mean(dim=0)
    torch.testing.assert_close(torch.softmax(out, dim=-1), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.exp(), want, rtol=1e-5, atol=1e-7)  # already normalized
    sure = mean_log_probability([torch.tensor([1000.0, -1000.0]), torch.tensor([-1000.0, 1000.0])])
    assert torch.isfinite(sure).all()
    torch.testing.assert_close(sure.exp(), torch.tensor([0.5, 0.5]))


def test_shared_label_map_names_the_two_files_that_differ() -> None:
    assert shared_label_map([("a.pt", MAP), ("b.pt", dict(MAP))]) == MAP
    other = {"apple": 0, "bird": 1, "dog": 2}
    with pytest.raises(ValueError, match=r"^a.pt and c.pt have different label maps \(3 and 3 signs; 'cloud' is only"):
        shared_label_map([("a.pt", MAP), ("b.pt", MAP), ("c.pt", other)])
    swapped = {"apple": 0, "bird": 2, "cloud": 1}
    with pytest.raises(ValueError, match=r"another order \('bird' is index 1 in one, 2 in the other\)"):
        shared_label_map([("a.onnx", MAP), ("b.onnx", swapped)])
    with pytest.raises(ValueError, match="4 and 3 signs; 'eat' is only in the first"):
        shared_label_map([("a.pt", {**MAP, "eat": 3}), ("b.pt", MAP)])


def _model(seed: int) -> SignModel:
    torch.manual_seed(seed)
    return SignModel(model_config("tiny", 6)).eval()


def test_ensemble_model_outputs_the_log_of_the_members_mean_probability() -> None:
    members = [_model(s) for s in range(3)]
    x = torch.randn(2, 8, N_POINTS, N_CHANNELS)
    mask = torch.arange(8)[None] < torch.tensor([8, 3])[:, None]
    with torch.no_grad():
        out = EnsembleModel(members).eval()(x, mask)
        want = torch.stack([torch.softmax(m(x, mask), dim=-1) for m in members]).mean(dim=0)
        single = EnsembleModel(members[:1]).eval()(x, mask)
        alone = torch.softmax(members[0](x, mask), dim=-1)
    torch.testing.assert_close(torch.softmax(out, dim=-1), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.softmax(single, dim=-1), alone, rtol=1e-5, atol=1e-7)
    assert EnsembleModel(members).cfg.n_classes == 6
    with pytest.raises(ValueError, match="differ in their number of signs"):
        EnsembleModel([members[0], SignModel(model_config("tiny", 5))])


class _Fixed:
    """A scorer that returns given probabilities whatever the sequences."""

    def __init__(self, probs: np.ndarray, label_map: dict[str, int]) -> None:
        self.probs, self.label_map = probs, label_map

    def probabilities(self, sequences: list[np.ndarray]) -> np.ndarray:
        return self.probs[: len(sequences)]


def test_ensemble_scorer_averages_members_with_one_label_map() -> None:
    a, b = _probs(0), _probs(1)
    scorer = EnsembleScorer([_Fixed(a, MAP), _Fixed(b, dict(MAP))], ["a.pt", "b.onnx"])
    assert scorer.label_map == MAP
    np.testing.assert_allclose(scorer.probabilities([np.zeros((3, 543, 3))] * 4), (a + b) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="^a.pt and b.pt have different label maps"):
        EnsembleScorer([_Fixed(a, MAP), _Fixed(b, {"x": 0, "y": 1, "z": 2})], ["a.pt", "b.pt"])
