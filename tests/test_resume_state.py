"""A last.pt is validated whole before a resume uses it: each field out of range, of another size or type, and a
manifest edited in place, is one line naming the file and the field, never a traceback, a loop or a silent run."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from demo_data import demo_dataset, demo_shards

from train.checkpoint import save_checkpoint
from train.cli import main as train_cli
from train.config import TrainConfig
from train.loop import train

pytestmark = pytest.mark.slow  # trains a model


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(shards, a finished one-epoch run on them, its batches per epoch); read-only for the tests."""
    base = tmp_path_factory.mktemp("resume-state")
    built = demo_shards(base, demo_dataset(base, sequences=300, signs=5, participants=6), shard_size=40, folds=3)
    shards = base / "shards"
    shutil.copytree(built, shards)
    run = base / "run"
    cfg = TrainConfig(
        shards=str(shards), out=str(run), preset="tiny", batch_size=16, workers=0, device="cpu", seed=5, epochs=1
    )
    train(cfg)
    return shards, run, torch.load(run / "last.pt", weights_only=True)["step"]


def _resumed(tmp_path: Path, finished: tuple[Path, Path, int], change: Callable[[dict[str, Any], int], None]) -> str:
    """The one line `asl-train --resume` prints for a copy of the run whose last.pt `change` edited."""
    _, run, per_epoch = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = torch.load(copy / "last.pt", weights_only=True)
    change(ckpt, per_epoch)
    save_checkpoint(copy / "last.pt", ckpt)
    result = CliRunner().invoke(train_cli, ["--resume", str(copy), "--epochs", "3"])
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"Error: {copy / 'last.pt'}: cannot resume from it: "), lines[0]
    return lines[0].split(": cannot resume from it: ", 1)[1]


def _set(**fields: Any) -> Callable[[dict[str, Any], int], None]:
    return lambda ckpt, per_epoch: ckpt.update(fields)


def _mid_epoch(batch: int) -> Callable[[dict[str, Any], int], None]:
    """The position `batch` batches into the second epoch, consistently in step, epoch and batch_in_epoch."""
    return lambda ckpt, per_epoch: ckpt.update(step=per_epoch + batch, epoch=1, batch_in_epoch=batch)


def _optimizer_state(ckpt: dict[str, Any], per_epoch: int) -> None:
    state = ckpt["optimizer"]["state"]
    state[0]["exp_avg"] = torch.zeros(3)  # every other weight's moments keep their shapes


def _rng_of_another_size(ckpt: dict[str, Any], per_epoch: int) -> None:
    ckpt["rng"][0]["torch"] = torch.zeros(10, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(step=-1), r"step is -1, not a whole number in \[0, "),
        (_set(step=1.5), r"step is 1\.5, not a whole number"),
        (_set(epoch=10**9), r"epoch is 1000000000, not a whole number in \[0, 1\]"),
        (_set(epoch=1e9), r"epoch is 1000000000\.0, not a whole number in \[0, 1\]"),
        (_set(best_top1=math.nan), r"best_top1 is nan, not a top-1 in \[0, 1\] \(or -1: none yet\)"),
        (_set(best_top1=7.0), r"best_top1 is 7\.0, not a top-1"),
        (_set(epoch_sums=[1.0, 2.0, 3.0]), r"epoch_sums is \[1\.0, 2\.0, 3\.0\], not two finite sums >= 0"),
        (_set(epoch_sums=[math.inf, 2.0]), r"epoch_sums is \[inf, 2\.0\], not two finite sums >= 0"),
        (_set(rng=[]), r"rng is not a list of each rank's RNG states"),
        (_set(scheduler={"x": 1}), r"scheduler state is not a dict with last_epoch, base_lrs"),
        (_set(optimizer={"state": {}, "param_groups": []}), r"optimizer does not fit this run \(.*parameter groups"),
        (_optimizer_state, r"optimizer state 'exp_avg' of a weight of shape \(\d+(, \d+)*\) is \(3,\)"),
        (_rng_of_another_size, r"rng does not fit this run \("),
    ],
)
def test_a_field_out_of_range_is_one_line_naming_it(
    tmp_path: Path, finished: tuple[Path, Path, int], change: Callable, message: str
) -> None:

    assert re.match(message, _resumed(tmp_path, finished, change))


def test_a_batch_past_the_epochs_end_is_refused_not_looped_on(tmp_path: Path, finished: tuple[Path, Path, int]) -> None:
    per_epoch = finished[2]
    reason = _resumed(tmp_path, finished, _mid_epoch(per_epoch + 5))
    assert reason == f"batch_in_epoch is {per_epoch + 5}, past the epoch's end ({per_epoch} batches)"


def test_a_step_that_is_not_where_epoch_and_batch_put_it_is_refused(
    tmp_path: Path, finished: tuple[Path, Path, int]
) -> None:
    per_epoch = finished[2]
    reason = _resumed(tmp_path, finished, lambda c, n: c.update(step=n + 3, epoch=1, batch_in_epoch=2))
    assert reason == f"step is {per_epoch + 3}, not epoch 1 x {per_epoch} batches + batch_in_epoch 2"


def test_a_trained_sample_record_of_another_size_is_refused(tmp_path: Path, finished: tuple[Path, Path, int]) -> None:
    def change(ckpt: dict[str, Any], per_epoch: int) -> None:
        _mid_epoch(2)(ckpt, per_epoch)
        ckpt["epoch_trained"] = torch.zeros(1, dtype=torch.uint8)

    assert _resumed(tmp_path, finished, change).startswith("epoch_trained the checkpoint's trained-sample record")


@pytest.mark.parametrize("edit", ["reorder labels", "drop a shard"])
def test_a_manifest_edited_in_place_is_not_the_shard_set(
    tmp_path: Path, finished: tuple[Path, Path, int], edit: str
) -> None:
    shards, run, _ = finished
    edited, copy = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(shards, edited)
    shutil.copytree(run, copy)
    manifest = json.loads((edited / "manifest.json").read_text())
    if edit == "reorder labels":
        manifest["shards"][0]["labels"].reverse()
    else:
        dropped = manifest["shards"].pop()
        fold = next(f for f in manifest["folds"] if f["fold"] == dropped["fold"])
        fold["samples"] -= dropped["samples"]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(train_cli, ["--resume", str(copy), "--epochs", "3", "--shards", str(edited)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines() == [
        f"Error: {edited} is not the shard set {copy} was trained on (its manifest differs)"
    ]


def test_the_unchanged_run_resumes(tmp_path: Path, finished: tuple[Path, Path, int]) -> None:
    """The control: the same copy, unedited, trains on to its new last epoch."""
    copy = tmp_path / "run"
    shutil.copytree(finished[1], copy)
    result = CliRunner().invoke(train_cli, ["--resume", str(copy), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert torch.load(copy / "last.pt", weights_only=True)["step"] == 2 * finished[2]
