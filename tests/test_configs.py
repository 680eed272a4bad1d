"""Tests for configs/*.json: partial configs that `asl-train --config` accepts as they are."""

from __future__ import annotations

import json
from dataclasses import replace
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


def test_the_published_recipe_turns_its_pieces_on_and_the_cpu_one_leaves_them_off() -> None:
    """On CPU-sized runs every piece loses (docs/benchmarks.md, recipe pieces), so cpu-quick keeps the defaults."""
    first, quick = (TrainConfig.from_json(CONFIGS[0].parent / name) for name in ("gislr-1st.json", "cpu-quick.json"))
    assert first.awp > 0 and first.late_dropout is not None and first.optimizer == "radam-lookahead"
    assert quick.awp == 0 and quick.late_dropout is None and quick.optimizer == "adamw"
    replace(quick, epochs=3).check()  # any epoch count: no piece starts at a later epoch


def test_both_recipes_are_shipped() -> None:
    assert {p.name for p in CONFIGS} >= {"gislr-1st.json", "cpu-quick.json"}
