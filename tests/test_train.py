"""Trainer tests through the real entry points: smoke, learning, resume after SIGKILL, DDP, evaluate, predict."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from demo_data import demo_dataset, demo_shards

from pipeline.features import preprocess
from pipeline.read import read_landmarks
from pipeline.shards import read_manifest
from train import loop
from train.checkpoint import load_checkpoint, model_from_checkpoint, stored_config
from train.cli import main as train_cli
from train.config import TrainConfig
from train.data import make_loader, train_val_folds
from train.distributed import gathered_rng, restore_rng
from train.loop import train
from train.model import SignModel
from train.optim import AWP

BIN = Path(sys.executable).parent
TESTS = Path(__file__).parent

pytestmark = pytest.mark.slow  # every test trains or reads a trained run


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("train")
    return demo_shards(base, demo_dataset(base, sequences=300, signs=5, participants=6), shard_size=40, folds=3)


@pytest.fixture(scope="session")
def smoke_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One short run through the real CLI entry point (EMA on), shared by the tests that inspect it."""
    out = tmp_path_factory.mktemp("runs") / "smoke"
    args = [
        "--shards",
        str(shards),
        "--preset",
        "tiny",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--workers",
        "0",
        "--ema",
        "0.9",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(train_cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


def _steps_per_epoch(shards: Path, batch_size: int) -> int:
    train_folds, _ = train_val_folds(read_manifest(shards), [0])
    return len(make_loader(shards, train_folds, batch_size, train=True, workers=0))


def test_smoke_run_writes_metrics_config_and_checkpoints(shards: Path, smoke_run: tuple[Path, str]) -> None:
    out, output = smoke_run
    manifest = read_manifest(shards)
    fold0 = next(f["samples"] for f in manifest["folds"] if f["fold"] == 0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["step"] == 2 * _steps_per_epoch(shards, 32)
    assert all(r["val_samples"] == fold0 and 0 <= r["val_top1"] <= r["val_top5"] <= 1 for r in rows)
    assert [r["train_samples"] for r in rows] == [sum(f["samples"] for f in manifest["folds"] if f["fold"] != 0)] * 2
    assert json.loads((out / "config.json").read_text())["preset"] == "tiny"
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert set(ckpt) >= {"model", "optimizer", "scheduler", "ema", "step", "epoch", "rng", "config", "label_map"}
        assert ckpt["label_map"] == manifest["label_map"]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == rows[-1]["step"]
    if importlib.util.find_spec("matplotlib"):  # a dev extra; the curves are optional for users
        assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_run_ends_with_the_best_epoch_and_its_files(smoke_run: tuple[Path, str]) -> None:
    out, output = smoke_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["val_top1"])  # the first of equal maxima: best.pt is replaced on a rise only
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == best["epoch"]
    curves = f"  curves       {out / 'curves.png'}" if importlib.util.find_spec("matplotlib") else "  curves       not"
    *_, head, best_line, last_line, curves_line = output.strip().splitlines()
    assert head.startswith(
        f"best epoch {best['epoch']} of 2: validation top-1 {best['val_top1']:.4f}, top-5 "
        f"{best['val_top5']:.4f} on {best['val_samples']} samples"
    )
    assert best_line == f"  best.pt      {out / 'best.pt'}  (epoch {best['epoch']}, step {best['step']})"
    assert last_line == f"  last.pt      {out / 'last.pt'}  (epoch 2, step {rows[-1]['step']})"
    assert curves_line.startswith(curves)


def test_evaluate_best_pt_scores_the_printed_best_epoch_exactly(smoke_run: tuple[Path, str]) -> None:
    """The run has EMA on: the printed top-1 and evaluate's must both come from the EMA weights, on the same batches."""
    out, _ = smoke_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["val_top1"])
    result = CliRunner().invoke(
        train_cli, ["evaluate", "--checkpoint", str(out / "best.pt"), "--device", "cpu", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["weights"] == "EMA" and report["epoch"] == best["epoch"]
    assert (report["samples"], report["top1"], report["top5"]) == (
        best["val_samples"],
        best["val_top1"],
        best["val_top5"],
    )


def test_evaluate_cli_reports_the_validation_metrics(shards: Path, smoke_run: tuple[Path, str]) -> None:
    out, _ = smoke_run
    result = CliRunner().invoke(
        train_cli, ["evaluate", "--checkpoint", str(out / "last.pt"), "--workers", "0", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"top-1 {last['val_top1']:.4f}, top-5 {last['val_top5']:.4f}" in result.output
    assert "worst signs" in result.output and "most confused" in result.output


def test_predict_real_files_matches_direct_preprocessing(smoke_run: tuple[Path, str], sample_file) -> None:
    out, _ = smoke_run
    path, _ = sample_file
    result = CliRunner().invoke(
        train_cli, ["predict", "--checkpoint", str(out / "last.pt"), str(path), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"{path}: ")
    probs = [float(part.rsplit(" ", 1)[1]) for part in line.split(": ", 1)[1].split(", ")]
    # independent route: the padded (384) tensor straight from preprocessing; padding must not matter
    model = model_from_checkpoint(load_checkpoint(out / "last.pt"))
    x, mask = preprocess(read_landmarks(path))
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x)[None], torch.from_numpy(mask)[None]), -1)[0]
    np.testing.assert_allclose(probs, expected.sort(descending=True).values[:5].numpy(), atol=1.5e-3)


def test_predict_reports_bad_files_and_still_predicts_the_rest(
    smoke_run: tuple[Path, str], bad_dir: Path, sample_file
) -> None:
    out, _ = smoke_run
    good, _ = sample_file
    bad = bad_dir / "webcam_no_row_id.parquet"
    result = CliRunner().invoke(
        train_cli, ["predict", "--checkpoint", str(out / "last.pt"), str(bad), str(good), "--device", "cpu"]
    )
    assert result.exit_code == 1
    assert f"{bad}: ERROR missing column 'row_id'" in result.output
    assert f"{good}: " in result.output


def test_learns_few_signs_to_90_percent(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("learn")
    shards = demo_shards(base, demo_dataset(base, sequences=600, signs=5, participants=6, seed=1), shard_size=100)
    cfg = TrainConfig(
        shards=str(shards),
        out=str(base / "run"),
        preset="small",
        epochs=20,
        batch_size=32,
        lr=3e-3,
        workers=0,
        device="cpu",
    )
    metrics = train(cfg).metrics
    assert metrics["val_top1"] >= 0.9, metrics


def _wait_for_mid_epoch_checkpoint(proc: subprocess.Popen, path: Path, min_step: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed; make it longer"
        try:
            ckpt = torch.load(path, weights_only=True)
        except (FileNotFoundError, RuntimeError, EOFError):
            ckpt = None
        if ckpt and ckpt["step"] >= min_step and ckpt["batch_in_epoch"] > 0:
            return ckpt
        time.sleep(0.05)
    raise AssertionError("no mid-epoch checkpoint appeared in time")


def test_resume_after_sigkill_continues_the_same_schedule(shards: Path, tmp_path: Path) -> None:
    report_to = "tensorboard,csv" if importlib.util.find_spec("tensorboard") else "csv"
    args = [
        "--shards",
        str(shards),
        "--preset",
        "tiny",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--save-every",
        "1",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--report-to",
        report_to,
        "--log-every",
        "1",
    ]
    reference = tmp_path / "reference"
    subprocess.run([BIN / "asl-train", *args, "--out", str(reference)], check=True, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [BIN / "asl-train", *args, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        seen = _wait_for_mid_epoch_checkpoint(proc, run / "last.pt", min_step=_steps_per_epoch(shards, 4) + 3)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = torch.load(run / "last.pt", weights_only=True)  # loadable whatever the moment of the kill
    assert killed_at["step"] >= seen["step"]
    subprocess.run([BIN / "asl-train", "--resume", str(run)], check=True, capture_output=True)

    done, ref = torch.load(run / "last.pt", weights_only=True), torch.load(reference / "last.pt", weights_only=True)
    assert done["step"] == ref["step"] == 2 * _steps_per_epoch(shards, 4)
    assert done["scheduler"]["last_epoch"] == ref["scheduler"]["last_epoch"]
    assert done["optimizer"]["state"][0]["step"] == ref["optimizer"]["state"][0]["step"]
    # same data order, same augmentation draws, same optimizer state: the same weights as the uninterrupted run
    for name, value in ref["model"].items():
        torch.testing.assert_close(done["model"][name], value, rtol=0, atol=0, msg=name)
    # one metrics line per epoch, as in the uninterrupted run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows] == [1, 2]
    # a resumed epoch's training loss and sample count include what it trained before the kill
    kept = ("train_loss", "train_samples", "val_loss")
    assert [[r[k] for k in kept] for r in rows] == [[r[k] for k in kept] for r in ref_rows]
    # the logs too: what the killed session logged after its checkpoint is dropped, so each step appears once
    steps = [_logged(p) for p in (run / "steps.csv", reference / "steps.csv")]
    assert steps[0] == steps[1] and [s[0] for s in steps[0]] == [str(s) for s in range(1, done["step"] + 1)]
    assert _logged(run / "epochs.csv") == _logged(reference / "epochs.csv")
    if "tensorboard" in report_to:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = [EventAccumulator(str(r / "tensorboard")) for r in (run, reference)]
        for e in events:
            e.Reload()
        killed, whole = ([(x.step, x.value) for x in e.Scalars("train/loss")] for e in events)
        assert len(list((run / "tensorboard").glob("events.*"))) == 2 and killed == whole


class _Stopped(Exception):
    """Stands for a kill at a chosen step."""


def test_resume_with_the_recipe_options_is_bit_identical(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWP, late dropout and RAdam in Lookahead on, stopped mid-epoch after both pieces started (and between two
    Lookahead syncs), then resumed: the weights and optimizer state of an uninterrupted run."""
    steps = _steps_per_epoch(shards, 16)
    stop = 2 * steps + 3 if (2 * steps + 3) % 5 else 2 * steps + 4  # in epoch 2, not at a Lookahead sync (k=5)
    cfg = TrainConfig(
        shards=str(shards),
        preset="tiny",
        epochs=3,
        batch_size=16,
        workers=0,
        device="cpu",
        seed=5,
        save_every=stop,
        optimizer="radam-lookahead",
        awp=0.1,
        awp_from=1,
        late_dropout=0.5,
        late_dropout_from=2,
    )
    attacks, rates = [], []
    attack, set_rate = AWP.attack_backward, SignModel.set_late_dropout
    monkeypatch.setattr(AWP, "attack_backward", lambda self, fn: attacks.append(1) or attack(self, fn))
    monkeypatch.setattr(SignModel, "set_late_dropout", lambda self, p: rates.append(p) or set_rate(self, p))
    reference = tmp_path / "reference"
    train(replace(cfg, out=str(reference)))
    assert len(attacks) == 2 * steps and rates == [0.0, 0.0, 0.5]  # AWP from epoch 1, late dropout from epoch 2

    step = loop._step

    def stopping_step(run: loop.Run, batch: object) -> object:
        if run.step == stop:
            raise _Stopped
        return step(run, batch)

    monkeypatch.setattr(loop, "_step", stopping_step)
    run = tmp_path / "stopped"
    with pytest.raises(_Stopped):
        train(replace(cfg, out=str(run)))
    monkeypatch.setattr(loop, "_step", step)
    stopped = torch.load(run / "last.pt", weights_only=True)
    assert (stopped["step"], stopped["epoch"], stopped["batch_in_epoch"]) == (stop, 2, stop - 2 * steps)
    train(stored_config(run), resume=run)

    done, ref = (torch.load(r / "last.pt", weights_only=True) for r in (run, reference))
    assert done["step"] == ref["step"] == 3 * steps
    for name, value in ref["model"].items():
        torch.testing.assert_close(done["model"][name], value, rtol=0, atol=0, msg=name)
    assert done["optimizer"]["steps"] == ref["optimizer"]["steps"] == 3 * steps
    for slow, ref_slow in zip(done["optimizer"]["slow"], ref["optimizer"]["slow"], strict=True):
        torch.testing.assert_close(slow, ref_slow, rtol=0, atol=0)
    for i, state in ref["optimizer"]["inner"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(done["optimizer"]["inner"]["state"][i][key], value, rtol=0, atol=0)


def _logged(path: Path) -> list[tuple[str, ...]]:
    """The rows of a CSV log without its timing column (samples/s)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [tuple(v for k, v in r.items() if k != "samples_per_s") for r in rows]


def test_resume_refuses_other_shards(shards: Path, tmp_path: Path) -> None:
    mine = tmp_path / "shards"
    shutil.copytree(shards, mine)
    run = tmp_path / "run"
    args = [
        "--shards",
        str(mine),
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--out",
        str(run),
        "--device",
        "cpu",
    ]
    assert CliRunner().invoke(train_cli, args).exit_code == 0
    manifest = json.loads((mine / "manifest.json").read_text())
    (mine / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "rebuilt"}))
    result = CliRunner().invoke(train_cli, ["--resume", str(run)])
    assert result.exit_code == 1 and "is not the shard set" in result.output, result.output


def test_fresh_run_refuses_an_existing_run_directory(smoke_run: tuple[Path, str], shards: Path) -> None:
    out, _ = smoke_run
    result = CliRunner().invoke(train_cli, ["--shards", str(shards), "--preset", "tiny", "--out", str(out)])
    assert result.exit_code == 1 and "already holds a run" in result.output


def test_evaluate_refuses_shards_with_another_label_map(
    smoke_run: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    out, _ = smoke_run
    base = tmp_path_factory.mktemp("other")
    other = demo_shards(base, demo_dataset(base, sequences=60, signs=3, participants=3), shard_size=40, folds=3)
    result = CliRunner().invoke(
        train_cli, ["evaluate", "--checkpoint", str(out / "last.pt"), "--shards", str(other), "--workers", "0"]
    )
    assert result.exit_code == 1 and "label map" in result.output


def test_ddp_two_cpu_processes_equal_batches_and_identical_weights(shards: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        str(TESTS / "ddp_check.py"),
        str(shards),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"ddp_rank{r}.json").read_text()) for r in (0, 1)]
    train_folds, _ = train_val_folds(read_manifest(shards), [0])
    per_rank = len(make_loader(shards, train_folds, 16, train=True, workers=0, rank=0, world_size=2))
    assert [r["batches"] for r in reports] == [per_rank, per_rank]
    assert reports[0]["sha256"] == reports[1]["sha256"]
    fold0 = next(f["samples"] for f in read_manifest(shards)["folds"] if f["fold"] == 0)
    assert reports[0]["val_samples"] == reports[1]["val_samples"] == fold0  # reduced over both ranks
    assert (tmp_path / "last.pt").exists() and not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "ddp_rng.json").read_text()) == {"ranks": 2, "augment_equal": False}


def test_resume_refuses_another_world_size() -> None:
    generator = torch.Generator()
    states = gathered_rng(generator, torch.device("cpu"), world=1) * 2  # as written by 2 ranks
    with pytest.raises(ValueError, match="written by 2 rank"):
        restore_rng(states, rank=0, world=1, generator=generator, device=torch.device("cpu"))
    restore_rng(states[:1], rank=0, world=1, generator=generator, device=torch.device("cpu"))
