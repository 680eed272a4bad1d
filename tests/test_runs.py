"""Training runs as practitioners drive them, through the real CLI on tiny shards: logging backends,
config files, all-data and fine-tune runs, extending a finished run, machine-readable evaluation."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from demo_data import demo_dataset, demo_shards

import train.loop
from pipeline.shards import read_manifest
from train.cli import main as train_cli
from train.runfiles import curves_figure

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
LR, SEED, EPOCHS, BATCH, LOG_EVERY = 2e-3, 4, 2, 32, 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("runs-data")  # the same demo shards as test_train.py (cached per session)
    return demo_shards(base, demo_dataset(base, sequences=300, signs=5, participants=6), shard_size=40, folds=3)


def _train(*args: str) -> str:
    result = CliRunner().invoke(train_cli, [*args, "--workers", "0", "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _fail(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(train_cli, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output.strip().splitlines()[-1]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor written out again: linear warmup, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


@pytest.fixture(scope="module")
def logged(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[str]]:
    """A 2-epoch EMA run with every logging backend; records the progress bar's epoch labels."""
    out = tmp_path_factory.mktemp("logged") / "run"
    bars: list[str] = []

    class Bar(train.loop.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            bars.append(kwargs["desc"])
            super().__init__(*args, **kwargs)

    report_to = "tensorboard,csv" if HAS_TENSORBOARD else "csv"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.loop, "tqdm", Bar)
        output = _train(
            "--shards",
            str(shards),
            "--preset",
            "tiny",
            "--epochs",
            str(EPOCHS),
            "--batch-size",
            str(BATCH),
            "--lr",
            str(LR),
            "--seed",
            str(SEED),
            "--ema",
            "0.9",
            "--report-to",
            report_to,
            "--log-every",
            str(LOG_EVERY),
            "--out",
            str(out),
        )
    return out, output, bars


@pytest.mark.slow
def test_progress_bar_and_log_number_epochs_alike(logged: tuple[Path, str, list[str]]) -> None:
    out, _, bars = logged
    assert bars == ["epoch 1/2", "epoch 2/2"]
    assert [r["epoch"] for r in _rows(out)] == [1, 2]
    assert [int(r["epoch"]) for r in _csv(out / "epochs.csv")] == [1, 2]


@pytest.mark.slow
def test_csv_logs_steps_and_epochs(logged: tuple[Path, str, list[str]]) -> None:
    out, output, _ = logged
    rows = _rows(out)
    per_epoch = rows[0]["step"]
    total = EPOCHS * per_epoch
    steps = _csv(out / "steps.csv")
    # every LOG_EVERY steps, and at each epoch's end
    assert [int(r["step"]) for r in steps] == [
        s for s in range(1, total + 1) if s % LOG_EVERY == 0 or s % per_epoch == 0
    ]
    assert [int(r["epoch"]) for r in steps] == [math.ceil(int(r["step"]) / per_epoch) for r in steps]
    warmup = max(1, int(0.1 * total))
    for r in steps:  # the rate the logged step trained with
        assert float(r["lr"]) == pytest.approx(LR * _cosine(int(r["step"]) - 1, total, warmup), rel=1e-12)
        assert float(r["loss"]) > 0 and float(r["samples_per_s"]) > 0
    epochs = _csv(out / "epochs.csv")
    assert [{k: float(v) for k, v in r.items()} for r in epochs] == [{k: float(r[k]) for k in epochs[0]} for r in rows]
    assert f"  csv          {out / 'steps.csv'}, {out / 'epochs.csv'}" in output.splitlines()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard not installed (pip install -e '.[tensorboard]')")
def test_tensorboard_event_file_holds_steps_and_epochs(logged: tuple[Path, str, list[str]]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, output, _ = logged
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = _csv(out / "steps.csv")
    for name in ("loss", "lr", "samples_per_s"):  # the same numbers as the CSV backend, as float32
        scalars = events.Scalars(f"train/{name}")
        assert [e.step for e in scalars] == [int(r["step"]) for r in steps]
        assert [e.value for e in scalars] == pytest.approx([float(r[name]) for r in steps], rel=1e-6)
    rows = _rows(out)
    for name in ("epoch", "train_loss", "val_loss", "val_top1", "val_top5"):
        scalars = events.Scalars(f"epoch/{name}")
        assert [(e.step, e.value) for e in scalars] == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in rows]
    assert f"  tensorboard  {out / 'tensorboard'}  (tensorboard --logdir {out / 'tensorboard'})" in output


def test_report_to_refuses_unknown_backends(shards: Path, tmp_path: Path) -> None:
    code, line = _fail("--shards", str(shards), "--report-to", "wandb", "--out", str(tmp_path / "r"))
    assert code == 2 and "expected none, or tensorboard or csv" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_evaluate_json_holds_the_numbers_of_the_text(logged: tuple[Path, str, list[str]]) -> None:
    out, _, _ = logged
    args = ["evaluate", "--checkpoint", str(out / "best.pt"), "--device", "cpu"]
    text = CliRunner().invoke(train_cli, args).output.splitlines()
    report = json.loads(CliRunner().invoke(train_cli, [*args, "--format", "json"]).output)
    best = max(_rows(out), key=lambda r: r["val_top1"])
    assert report["top1"] == best["val_top1"] and report["samples"] == best["val_samples"]
    assert text[0] == f"checkpoint {out / 'best.pt'} of epoch {report['epoch']}, step {report['step']} (EMA weights)"
    assert report["checkpoint"] == str(out / "best.pt") and report["folds"] == [0]
    assert text[1] == f"folds [0]: {report['samples']} samples, top-1 {report['top1']:.4f}, top-5 {report['top5']:.4f}"
    worst = text[3 : 3 + len(report["worst_signs"])]
    assert worst == [f"  {w['sign']:<20} {w['top1']:.3f}  {w['samples']}" for w in report["worst_signs"]]
    assert sum(w["samples"] for w in report["worst_signs"]) == report["samples"]  # 5 signs: all of them listed
    people = sorted(report["participants"].items(), key=lambda kv: (kv[1]["top1"], kv[0]))[:10]
    assert text[3 + len(worst)].startswith("participants (top-1, samples), worst")
    assert text[4 + len(worst) : 4 + len(worst) + len(people)] == [
        f"  {p:<20} {v['top1']:.3f}  {v['samples']}" for p, v in people
    ]
    assert sum(v["samples"] for v in report["participants"].values()) == report["samples"]
    confused = text[5 + len(worst) + len(people) :]
    assert confused == [f"  {c['true']} -> {c['predicted']}: {c['count']}" for c in report["confused_pairs"]]
    wrong = round((1 - report["top1"]) * report["samples"])
    assert sum(c["count"] for c in report["confused_pairs"]) <= wrong


@pytest.mark.slow  # the run fixture trains
def test_evaluate_notes_folds_the_model_trained_on(logged: tuple[Path, str, list[str]]) -> None:
    out, _, _ = logged
    args = ["evaluate", "--checkpoint", str(out / "best.pt"), "--device", "cpu"]
    held_out = CliRunner().invoke(train_cli, args)
    assert held_out.exit_code == 0 and "note:" not in held_out.output
    assert json.loads(CliRunner().invoke(train_cli, [*args, "--format", "json"]).output)["trained_folds"] == []
    seen = CliRunner().invoke(train_cli, [*args, "--folds", "2,0,1"])  # trained on folds 1 and 2 (validated on 0)
    assert seen.exit_code == 0, seen.output
    lines = seen.output.splitlines()
    assert lines[1].startswith("folds [2, 0, 1]: ")
    assert lines[2] == "note: the model trained on fold(s) 2,1: these scores are not held out"
    report = json.loads(CliRunner().invoke(train_cli, [*args, "--folds", "2,0,1", "--format", "json"]).output)
    assert report["trained_folds"] == [2, 1]


@pytest.mark.slow
def test_config_reruns_the_experiment_exactly(logged: tuple[Path, str, list[str]], tmp_path: Path) -> None:
    out, _, _ = logged
    again = tmp_path / "again"
    _train("--config", str(out / "config.json"), "--out", str(again), "--report-to", "none")
    timing = {"samples_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in _rows(again)] == [
        {k: v for k, v in r.items() if k not in timing} for r in _rows(out)
    ]
    for name in ("model", "ema"):
        ours, theirs = (torch.load(run / "last.pt", weights_only=True)[name] for run in (again, out))
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    first, second = (json.loads((run / "config.json").read_text()) for run in (out, again))
    assert {k: v for k, v in second.items() if first[k] != v} == {"out": str(again), "report_to": []}
    assert not (again / "steps.csv").exists()


@pytest.mark.slow
def test_config_options_given_on_the_command_line_win(logged: tuple[Path, str, list[str]], tmp_path: Path) -> None:
    out, _, _ = logged
    run = tmp_path / "changed"
    _train("--config", str(out / "config.json"), "--out", str(run), "--max-steps", "2", "--dropout", "0.3")
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["max_steps"], cfg["model"], cfg["seed"], cfg["lr"], cfg["ema"]) == (2, {"dropout": 0.3}, SEED, LR, 0.9)
    assert [r["step"] for r in _rows(run)] == [2]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"epochs": 2, "lr_max": 0.1}', "unknown option(s) lr_max"),
        ('{"epochs": "2"}', "wrong type for epochs ('2', expected int)"),
        (
            '{"augment": 1, "max_steps": 2.5}',
            "wrong type for augment (1, expected bool), max_steps (2.5, expected int | None)",
        ),
        ("[1, 2]", "expected a JSON object"),
        ('{"epochs": 2', "not a readable JSON config"),
    ],
)
def test_config_file_errors_are_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    code, line = _fail("--config", str(path), "--out", str(tmp_path / "run"))
    assert code == 1 and line.startswith(f"Error: {path}: ") and message in line


@pytest.mark.slow
def test_resume_extends_a_finished_run_on_the_stretched_schedule(
    logged: tuple[Path, str, list[str]], tmp_path: Path
) -> None:
    out, _, _ = logged
    run = tmp_path / "extended"
    shutil.copytree(out, run)
    before = (run / "last.pt").read_bytes()
    code, line = _fail("--resume", str(run))
    per_epoch = _rows(out)[0]["step"]
    assert code == 1 and line == (
        f"Error: {run} has finished: it trained {2 * per_epoch} steps (2 epochs), "
        f"and --epochs 2 asks for {2 * per_epoch}; resume it with a larger --epochs "
        "to go on"
    )
    code, line = _fail("--resume", str(run), "--lr", "0.1", "--out", str(tmp_path / "elsewhere"), "--epochs", "3")
    assert code == 2 and "--lr, --out cannot change" in line
    assert (run / "last.pt").read_bytes() == before and _rows(run) == _rows(out)

    _train("--resume", str(run), "--epochs", "3")
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[:2] == _rows(out)
    assert torch.load(run / "last.pt", weights_only=True)["step"] == rows[-1]["step"] == 3 * per_epoch
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    # from the old end on, the rate follows the 3-epoch schedule: it starts again above 0 and ends at 0
    total, warmup = 3 * per_epoch, max(1, int(0.1 * 3 * per_epoch))
    new = [r for r in _csv(run / "steps.csv") if int(r["step"]) > 2 * per_epoch]
    assert [int(r["step"]) for r in new] == [
        s for s in range(2 * per_epoch + 1, total + 1) if s % LOG_EVERY == 0 or s % per_epoch == 0
    ]
    assert [float(r["lr"]) for r in new] == pytest.approx(
        [LR * _cosine(int(r["step"]) - 1, total, warmup) for r in new], rel=1e-12
    )
    assert float(new[0]["lr"]) > 0.1 * LR and rows[-1]["lr"] == 0.0
    logged_steps = [int(r["step"]) for r in _csv(run / "steps.csv")]
    assert logged_steps == sorted(set(logged_steps))  # each step once


@pytest.mark.slow
def test_val_folds_none_trains_on_every_sample(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "all"
    output = _train(
        "--shards",
        str(shards),
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--batch-size",
        str(BATCH),
        "--val-folds",
        "none",
        "--out",
        str(run),
    )
    manifest = read_manifest(shards)
    total = sum(s["samples"] for s in manifest["shards"])
    assert total == sum(f["samples"] for f in manifest["folds"]) == 300
    (row,) = _rows(run)
    assert row["train_samples"] == total and row["step"] == math.ceil(total / BATCH)
    assert not any(k.startswith("val_") for k in row)
    assert not (run / "best.pt").exists() and (run / "last.pt").exists()
    assert json.loads((run / "config.json").read_text())["val_folds"] == []
    assert (
        f"no validation (--val-folds none): trained on every fold, {total} samples an epoch; the result is "
        "last.pt (no best.pt is written)" in output
    )
    code, line = _fail("evaluate", "--checkpoint", str(run / "last.pt"), "--device", "cpu")
    assert code == 1 and "pass --folds" in line


@pytest.mark.parametrize(
    ("value", "code", "message"),
    [
        ("", 2, "use --val-folds none to train on every fold"),
        (",", 2, "use --val-folds none to train on every fold"),
        ("7", 1, "--val-folds 7: not in the manifest of"),
        ("0,1,2", 1, "--val-folds 0,1,2 leaves no fold of"),
    ],
)
def test_val_folds_errors_say_what_to_do(shards: Path, tmp_path: Path, value: str, code: int, message: str) -> None:
    got, line = _fail(
        "--shards",
        str(shards),
        "--preset",
        "tiny",
        "--val-folds",
        value,
        "--workers",
        "0",
        "--out",
        str(tmp_path / "run"),
    )
    assert got == code and message in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_init_from_starts_from_the_checkpoint_weights(
    logged: tuple[Path, str, list[str]], shards: Path, tmp_path: Path
) -> None:
    out, _, _ = logged
    run = tmp_path / "tuned"
    # lr 0: the weights stay where they started, so last.pt shows them; dropout may differ from the source's
    _train(
        "--shards",
        str(shards),
        "--preset",
        "tiny",
        "--dropout",
        "0.3",
        "--init-from",
        str(out / "best.pt"),
        "--lr",
        "0",
        "--max-steps",
        "2",
        "--out",
        str(run),
    )
    source = torch.load(out / "best.pt", weights_only=True)["ema"]  # the trained (EMA) weights, as evaluate scores
    started = torch.load(run / "last.pt", weights_only=True)
    assert started["step"] == 2 and started["optimizer"]["state"][0]["step"] == 2  # a new optimizer and schedule
    for key, value in source.items():
        torch.testing.assert_close(started["model"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_init_from_another_label_map_needs_a_new_head(
    logged: tuple[Path, str, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    out, _, _ = logged
    base = tmp_path_factory.mktemp("other")
    other = demo_shards(base, demo_dataset(base, sequences=60, signs=3, participants=3), shard_size=40, folds=3)
    args = [
        "--shards",
        str(other),
        "--preset",
        "tiny",
        "--init-from",
        str(out / "best.pt"),
        "--lr",
        "0",
        "--max-steps",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    code, line = _fail(*args, "--out", str(base / "refused"))
    assert code == 1 and "another label map (5 signs; these shards have 3); pass --new-head" in line
    _train(*args, "--new-head", "--out", str(base / "head"))
    source = torch.load(out / "best.pt", weights_only=True)["ema"]
    started = torch.load(base / "head" / "last.pt", weights_only=True)["model"]
    assert started["classifier.weight"].shape == (3, source["classifier.weight"].shape[1])
    for key, value in source.items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(started[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_init_from_refuses_another_architecture(
    logged: tuple[Path, str, list[str]], shards: Path, tmp_path: Path
) -> None:
    out, _, _ = logged
    code, line = _fail(
        "--shards",
        str(shards),
        "--preset",
        "small",
        "--init-from",
        str(out / "best.pt"),
        "--workers",
        "0",
        "--out",
        str(tmp_path / "run"),
    )
    assert code == 1 and "its 'tiny' model differs from this run's in dim 32 (here 64)" in line
    assert "pass --preset tiny" in line
    code, line = _fail("--shards", str(shards), "--new-head", "--out", str(tmp_path / "run"))
    assert code == 2 and "--new-head needs --init-from" in line


def test_curves_have_whole_epochs_the_best_marked_and_the_run_named() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top1 = [0.2, 0.5, 0.7, 0.7, 0.6, 0.65, 0.68]  # the best is the first 0.7: epoch 3
    rows = [
        {
            "epoch": e,
            "step": 10 * e,
            "train_loss": 2 - 0.1 * e,
            "val_loss": 1.9 - 0.1 * e,
            "val_top1": t,
            "val_top5": min(1.0, t + 0.2),
        }
        for e, t in enumerate(top1, start=1)
    ]
    fig = curves_figure(rows, "runs/base")
    fig.canvas.draw()
    assert fig._suptitle.get_text() == "runs/base"
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"] == [3]
    (star,) = [line for line in fig.axes[1].get_lines() if line.get_marker() == "*"]
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([3], [0.7])
    assert "best: epoch 3, top-1 0.7000" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    plt.close(fig)

    fig = curves_figure([{k: r[k] for k in ("epoch", "step", "train_loss")} for r in rows], "runs/all")
    assert len(fig.axes) == 1 and fig._suptitle.get_text() == "runs/all: no validation, the result is last.pt"
    plt.close(fig)


@pytest.mark.slow
@pytest.mark.parametrize("present", [False, True], ids=["absent", "only-an-empty-sample-folder"])
def test_summary_names_what_is_missing_of_the_shared_data(tmp_path: Path, present: bool) -> None:
    """Without the shared data (ASL_SHARED points at nothing, or at a folder lacking parts), the run's summary names
    in one line what is missing, and never a folder that exists."""
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_uses_shared.py").write_text(
        "def test_sample(sample_file):\n    pass\n\ndef test_bad(bad_dir):\n    pass\n\ndef test_plain():\n    pass\n"
    )
    shared = tmp_path / "shared"
    if present:
        (shared / "gislr-sample").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "ASL_SHARED": str(shared)},
        timeout=120,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("1 passed, 4 skipped"), proc.stdout
    missing = (
        f"{shared / 'gislr-bad'}, {shared / 'gislr-sample' / 'train_landmark_files'} are" if present else f"{shared} is"
    )
    assert lines[-2] == (
        f"4 tests on real Kaggle files skipped: {missing} missing (set ASL_SHARED to the project's "
        "shared/ directory, or put it beside the checkout as ../shared; see README, Tests)"
    )
