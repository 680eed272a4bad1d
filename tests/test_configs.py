"""Tests for configs/*.json: partial configs that `asl-train --config` accepts as they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.config import TrainConfig
from train.optim import OPTIMIZERS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_is_a_usable_partial_config(path: Path) -> None:
    options = json.loads(path.read_text())
    cfg = TrainConfig.from_json(path)  # unknown keys, wrong types and out-of-bounds values are refused here
    cfg.check()  # start epochs below --epochs, buildable model and augmentation
    assert {k: getattr(cfg, k) for k in options} == options
    assert cfg.optimizer in OPTIMIZERS
    assert cfg.awp > 0 and cfg.late_dropout is not None  # each recipe turns both pieces on


def test_both_recipes_are_shipped() -> None:
    assert {p.name for p in CONFIGS} >= {"gislr-1st.json", "cpu-quick.json"}
