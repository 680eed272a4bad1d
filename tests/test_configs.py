"""Tests for configs/*.json: every key is a training option (or one of the recipe's), with a usable value."""

from __future__ import annotations

import json
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from train.augment import AugmentConfig
from train.loop import TrainConfig, _fits
from train.model import ModelConfig
from train.optim import OPTIMIZERS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
# The recipe's options, with their types, until TrainConfig carries them (then from_json checks them all).
RECIPE = {"optimizer": str, "awp": float, "awp_from": int, "late_dropout": float | None, "late_dropout_from": int}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_holds_known_options_with_usable_values(path: Path) -> None:
    options = json.loads(path.read_text())
    hints = {**typing.get_type_hints(TrainConfig), **RECIPE}
    assert not set(options) - set(hints), f"unknown options {set(options) - set(hints)}"
    assert all(_fits(v, hints[k]) for k, v in options.items())
    AugmentConfig(**options.get("augment_options", {}))
    assert not set(options.get("model", {})) - {f.name for f in fields(ModelConfig)}
    assert options.get("optimizer", "adamw") in OPTIMIZERS
    epochs = options.get("epochs", TrainConfig.epochs)
    assert options.get("awp_from", 0) < epochs and options.get("late_dropout_from", 0) < epochs
    assert 0 <= options.get("late_dropout", 0.0) < 1 and options.get("awp", 0.0) >= 0


def test_both_recipes_are_shipped() -> None:
    assert {p.name for p in CONFIGS} >= {"gislr-1st.json", "cpu-quick.json"}
