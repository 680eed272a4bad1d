"""Checkpoints stay loadable: a file written by an earlier version of the trainer gives the logits it gave then.

tests/data/checkpoint-format-1.pt is the last.pt of a 3-step run (tiny preset, EMA on) written by the
trainer before its modules were split; checkpoint-format-1.json beside it holds what that version
computed from it: the logits of its EMA and raw weights on fixed inputs, and the probabilities its
predict gave for the three real sample files.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_ROOT

from pipeline.read import read_landmarks
from train.checkpoint import CHECKPOINT_KEYS, RESUME_KEYS, CheckpointError, load_checkpoint, model_from_checkpoint
from train.config import TrainConfig
from train.predict import CheckpointScorer

DATA = Path(__file__).parent / "data"
OLD = DATA / "checkpoint-format-1.pt"
RECORD = json.loads((DATA / "checkpoint-format-1.json").read_text())


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs the record's logits were computed on (see its "inputs")."""
    x = np.random.default_rng(7).standard_normal((3, 12, 118, 6)).astype(np.float32)
    mask = torch.arange(12)[None, :] < torch.tensor(RECORD["frames"])[:, None]
    return torch.from_numpy(x), mask


@pytest.mark.parametrize("use_ema", [True, False], ids=["ema", "raw"])
def test_an_old_checkpoint_gives_the_logits_it_gave(use_ema: bool) -> None:
    ckpt = load_checkpoint(OLD)
    assert set(ckpt) >= {*CHECKPOINT_KEYS, *RESUME_KEYS} and ckpt["step"] == RECORD["step"] == 3
    x, mask = _inputs()
    with torch.no_grad():
        logits = model_from_checkpoint(ckpt, use_ema=use_ema)(x, mask)
    expected = torch.tensor(RECORD["logits_ema" if use_ema else "logits_raw"])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    other = torch.tensor(RECORD["logits_raw" if use_ema else "logits_ema"])
    assert not torch.allclose(logits, other, atol=1e-3)  # the two weight sets differ: the choice is tested


def test_an_old_checkpoint_predicts_the_real_files_as_it_did(shared_dir: Path) -> None:
    scorer = CheckpointScorer(OLD, device="cpu")
    assert scorer.label_map == RECORD["label_map"]
    probs = scorer.probabilities([read_landmarks(SAMPLE_ROOT / f) for f in RECORD["sample_files"]])
    np.testing.assert_allclose(probs, RECORD["sample_probabilities"], rtol=0, atol=1e-6)


def test_an_old_checkpoints_config_reads_back_field_for_field() -> None:
    """The stored config is asdict of the TrainConfig of its day: the same keys, in the same order."""
    stored = torch.load(OLD, weights_only=True)["config"]
    again = asdict(TrainConfig.from_dict(stored))
    assert list(again) == list(stored) and again == stored


def test_a_truncated_old_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    cut = tmp_path / "cut.pt"
    cut.write_bytes(OLD.read_bytes()[: OLD.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not an asl-train checkpoint: empty, truncated"):
        load_checkpoint(cut)
