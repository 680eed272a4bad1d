"""Guards of a training run: one process per run directory, finite options and losses, a --max-steps cut that a
resume finishes, one-line refusals of unusable config and list files, logs whose write errors name the file."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from demo_data import demo_dataset, demo_shards

from pipeline.build import worker_count
from pipeline.files import locked
from train import loop, report
from train.checkpoint import build_model, save_checkpoint, stored_config
from train.cli import main as train_cli
from train.config import TrainConfig
from train.loop import DivergedError, train
from train.predict import CheckpointScorer, expand_inputs, iter_predictions
from train.runfiles import LOCK, RunDirError

BIN = Path(sys.executable).parent
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("guards-data")  # the same demo shards as test_train.py (cached per session)
    return demo_shards(base, demo_dataset(base, sequences=300, signs=5, participants=6), shard_size=40, folds=3)


def _cfg(shards: Path, out: Path, **changes) -> TrainConfig:
    return TrainConfig(
        shards=str(shards), out=str(out), preset="tiny", batch_size=16, workers=0, device="cpu", seed=5, **changes
    )


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    return lines[-1]


# ---------------------------------------------------------------------------- one process per run directory


@pytest.mark.slow
def test_two_runs_into_one_new_out_one_refuses_the_other_completes(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "--shards",
        str(shards),
        "--preset",
        "tiny",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--save-every",
        "1",
        "--out",
        str(out),
    ]
    first = subprocess.Popen(
        [BIN / "asl-train", *args, "--seed", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        second = subprocess.run([BIN / "asl-train", *args, "--seed", "2"], capture_output=True, text=True, timeout=120)
        resumed = subprocess.run(
            [BIN / "asl-train", "--resume", str(out), "--epochs", "4"], capture_output=True, text=True, timeout=120
        )
        output, _ = first.communicate(timeout=600)
    finally:
        first.kill()
    for refused in (second, resumed):
        assert refused.returncode == 1, refused.stderr
        assert refused.stderr.strip().splitlines()[-1] == (
            f"Error: {out} is in use by another run (pid {first.pid}); wait for it to end, or pick another --out"
        )
    assert first.returncode == 0, output
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["config"]["seed"] == json.loads((out / "config.json").read_text())["seed"] == 1
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (out / LOCK).exists() and not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_a_refused_new_run_leaves_no_directory_and_a_stale_lock_is_taken_over(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "new"
    with pytest.raises(RunDirError, match=r"is in use by another run \(pid \d+\)"), locked(tmp_path / "held.lock"):
        out.mkdir()
        os.link(tmp_path / "held.lock", out / LOCK)  # the same locked file, as another process would hold it
        train(_cfg(shards, out, max_steps=1))
    os.unlink(out / LOCK)
    out.rmdir()
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / LOCK).write_text("999999\n")  # left by a killed process: no flock is held on it
    train(_cfg(shards, tmp_path / "stale", max_steps=1))
    assert (tmp_path / "stale" / "last.pt").exists() and not (tmp_path / "stale" / LOCK).exists()
    with pytest.raises(Exception, match="val-folds 7"):
        train(_cfg(shards, tmp_path / "failed", val_folds=[7]))
    assert not (tmp_path / "failed").exists()  # a run that failed before writing anything leaves nothing


@pytest.mark.slow
def test_ddp_ranks_all_stop_when_rank_0_cannot_take_the_lock(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with locked(out / LOCK):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29531",
            str(BIN / "asl-train"),
            "--shards",
            str(shards),
            "--preset",
            "tiny",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--max-steps",
            "2",
            "--out",
            str(out),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a hang would time out
    assert result.returncode != 0
    refused = [line for line in result.stderr.splitlines() if line.startswith("Error: rank 0: ")]
    assert len(refused) == 2, result.stderr  # both ranks print rank 0's one line
    assert all(f"{out} is in use by another run (pid {os.getpid()})" in line for line in refused)
    assert not (out / "last.pt").exists()


# ---------------------------------------------------------------------------- silent wrong results


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "inf"], "Invalid value for '--lr': inf is not in the range 0<=x<=10."),
        (["--lr", "nan"], "lr must be a finite number, not nan"),
        (["--weight-decay", "inf"], "Invalid value for '--weight-decay': inf is not in the range 0<=x<=10."),
        (["--grad-clip", "nan"], "grad_clip must be a finite number, not nan"),
        (["--io-timeout", "inf"], "io_timeout must be a finite number, not inf"),
        (["--dropout", "nan"], "model holds a number that is not finite"),
        (["--dim", "40000"], r"dim 40000 is not an integer in [1, 4096]"),
    ],
)
def test_non_finite_and_absurd_options_are_one_line(
    shards: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    line = _one_line_error(["--shards", str(shards), "--out", str(tmp_path / "run"), *args])
    assert message in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_non_finite_loss_stops_at_its_step_keeping_the_last_good_checkpoint(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = loop._step

    def poisoned(run, batch):  # after step 3 the weights turn NaN, as an exploding update would leave them
        out = real_step(run, batch)
        if run.step == 3:
            with torch.no_grad():
                for p in run.model.parameters():
                    p.fill_(float("nan"))
        return out

    monkeypatch.setattr(loop, "_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(DivergedError, match=r"^step 4: the training loss is not finite; training stopped"):
        train(_cfg(shards, out, save_every=2, log_every=3, report_to=["csv"]))
    kept = torch.load(out / "last.pt", weights_only=True)
    assert kept["step"] == 2 and all(torch.isfinite(v).all() for v in kept["model"].values())
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()
    result = CliRunner().invoke(train_cli, ["--resume", str(out)])  # the same failure, through the CLI, one line
    assert result.exit_code == 1 and result.output.startswith("Error: step 4: the training loss is not finite")


@pytest.mark.slow
def test_max_steps_cut_mid_epoch_then_resumed_equals_an_uninterrupted_run(shards: Path, tmp_path: Path) -> None:
    reference, cut = tmp_path / "reference", tmp_path / "cut"
    train(_cfg(shards, reference, epochs=2, report_to=["csv"]))
    per_epoch = torch.load(reference / "last.pt", weights_only=True)["step"] // 2
    assert per_epoch > 4
    stop = per_epoch + 3  # three batches into the second epoch
    train(_cfg(shards, cut, epochs=2, max_steps=stop, report_to=["csv"]))
    at_cut = torch.load(cut / "last.pt", weights_only=True)
    assert (at_cut["step"], at_cut["epoch"], at_cut["batch_in_epoch"]) == (stop, 1, 3)  # the cut epoch is not done

    train(replace(stored_config(cut), max_steps=None), resume=cut)  # on to the end of epoch 2
    done, ref = (torch.load(r / "last.pt", weights_only=True) for r in (cut, reference))
    assert (done["step"], done["epoch"], done["batch_in_epoch"]) == (ref["step"], 2, 0) == (2 * per_epoch, 2, 0)
    for name, value in ref["model"].items():
        torch.testing.assert_close(done["model"][name], value, rtol=0, atol=0, msg=name)
    rows, ref_rows = ([json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (cut, reference))
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows] == [1, 2]
    kept = ("step", "train_loss", "train_samples", "val_loss", "val_top1")
    assert [[r[k] for k in kept] for r in rows] == [[r[k] for k in kept] for r in ref_rows]
    epochs_csv = (cut / "epochs.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in epochs_csv[1:]] == ["1", "2"]  # the cut epoch's row once, as finished


def test_predict_refuses_infinite_coordinates_one_line_per_file(
    good_parquet: Path, good_table: pa.Table, write_parquet, tmp_path: Path
) -> None:
    ckpt_path = tmp_path / "tiny.pt"
    cfg = TrainConfig(preset="tiny")
    save_checkpoint(
        ckpt_path,
        {"model": build_model(cfg, 3).state_dict(), "config": vars(cfg).copy(), "label_map": {"a": 0, "b": 1, "c": 2}},
    )
    bad = []
    for column, value in (("x", np.inf), ("y", -np.inf), ("z", np.inf), ("x", 1e300)):
        values = good_table.column(column).to_numpy().copy()
        values[7] = value
        table = good_table.set_column(good_table.schema.get_field_index(column), column, pa.array(values))
        bad.append(write_parquet(table, f"inf-{column}-{len(bad)}.parquet"))
    files = expand_inputs([bad[0], good_parquet, *bad[1:]])
    predictions = list(iter_predictions(CheckpointScorer(ckpt_path, "cpu"), files, k=2))
    assert [p.error for p in predictions] == ["infinite coordinate values", None, *["infinite coordinate values"] * 3]
    assert len(predictions[1].top) == 2 and np.isfinite([q for _, q in predictions[1].top]).all()


# ---------------------------------------------------------------------------- one-line refusals


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"batch_size": 0}, "batch_size 0 is below its minimum 1"),
        ({"log_every": 0}, "log_every 0 is below its minimum 1"),
        ({"augment_options": {"bogus": 1}}, "unknown augment_options key(s) bogus; known: enabled"),
        ({"model": {"bogus": 1}}, "unknown model config fields ['bogus']"),
        ({"model": {"dim": float("inf")}}, "model holds a number that is not finite"),
        ({"lr": 1e400}, "lr must be a finite number, not inf"),
    ],
)
def test_config_file_values_that_would_crash_or_mislead_are_one_line(
    tmp_path: Path, content: dict, message: str
) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content).replace("1e+400", "1e400"))
    assert message in _one_line_error(["--config", str(path), "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_fifo_or_a_device_as_config_or_list_is_refused_not_waited_on(tmp_path: Path, kind: str) -> None:
    special = Path("/dev/zero")
    if kind == "fifo":
        special = tmp_path / "fifo"
        os.mkfifo(special)  # no writer: a plain open would block forever
    what = "a FIFO" if kind == "fifo" else "a character device"
    line = _one_line_error(["--config", str(special)])
    assert line == f"Error: {special}: not a readable JSON config (not a regular file ({what}))"
    line = _one_line_error(["predict", "--checkpoint", str(TESTS / "data" / "checkpoint-format-1.pt"), f"@{special}"])
    assert line == f"Error: {special}: cannot read the list of files (not a regular file ({what}))"


def test_jobs_are_capped_at_the_cpu_count_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    cpus = os.cpu_count() or 1
    assert [worker_count(j) for j in (1, cpus, -1, 0)] == [1, cpus, cpus, cpus] and not caplog.records
    assert worker_count(1000) == cpus
    assert caplog.messages == [f"--jobs 1000 is more than the {cpus} CPUs; building with {cpus} worker processes"]


# ---------------------------------------------------------------------------- write errors name the file


def _full_disk_after(path_suffix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every write to files ending in `path_suffix` fail with ENOSPC once opened (a disk that filled up)."""
    real_open = open

    class Full:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if str(file).endswith(path_suffix) and "a" in mode else f

    monkeypatch.setattr("builtins.open", fake_open)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["steps.csv", "metrics.jsonl"])
def test_a_full_disk_while_logging_names_the_file(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    _full_disk_after(name, monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(OSError, match=f"{out / name}: cannot write (the log|the epoch's metrics) \\(No space left"):
        train(_cfg(shards, out, max_steps=3, report_to=["csv"]))


def test_a_tensorboard_write_error_names_its_directory(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")

    class Failing:
        def add_scalar(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        flush = close = add_scalar

    reporter = report.TensorBoardReporter(tmp_path, 0, 0)
    reporter.writer.close()
    reporter.writer = Failing()
    for call in (
        lambda: reporter.log_step(1, {"loss": 1.0, "lr": 0.1, "samples_per_s": 1.0}),
        lambda: reporter.log_epoch(1, {"epoch": 1}),
        reporter.close,
    ):
        with pytest.raises(OSError, match=f"^{tmp_path / 'tensorboard'}: cannot write the log \\(No space left"):
            call()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_build_shards_stopped_by_a_signal_leaves_no_workers_or_temporaries(tmp_path: Path, sig: int) -> None:
    data = demo_dataset(tmp_path, sequences=300, signs=5, participants=6)
    out = tmp_path / "shards"
    proc = subprocess.Popen(
        [
            BIN / "asl-pipeline",
            "build-shards",
            "--data-dir",
            str(data),
            "--out",
            str(out),
            "--jobs",
            "2",
            "--shard-size",
            "5",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be stopped"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode in (1, 128 + sig)

    def group() -> list[str]:  # the build's session: its workers and their resource trackers
        rows = subprocess.run(["ps", "-e", "-o", "pgid=,stat="], capture_output=True, text=True).stdout.splitlines()
        return [r for r in rows if r.split()[0] == str(proc.pid) and not r.split()[1].startswith("Z")]

    deadline = time.monotonic() + 10
    while group() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group() == []
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
