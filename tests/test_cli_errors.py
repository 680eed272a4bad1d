"""Each command line maps errors in one place: every AslError and OSError is one line and exit status 1 in every
subcommand, a closed or full stdout included; a bug keeps its traceback; options in the wrong place are refused."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SAMPLE_ROOT
from demo_data import demo_dataset, demo_shards

import train.cv
import train.export
import train.loop
import train.predict
import train.scoring
from pipeline.cli import main as pipeline_cli
from pipeline.errors import AslError, one_line
from train.cli import main as train_cli

BIN = Path(sys.executable).parent
OLD = Path(__file__).parent / "data" / "checkpoint-format-1.pt"
SAMPLE = SAMPLE_ROOT / "22343" / "239181.parquet"

# Each subcommand, and the function it calls that the test makes fail.
COMMANDS = {
    "train": ([], train.loop, "train"),
    "cv": (["cv"], train.cv, "run_cv"),
    "evaluate": (["evaluate", "--checkpoint", str(OLD)], train.scoring, "evaluation_report"),
    "predict": (["predict", "--checkpoint", str(OLD), "x.parquet"], train.predict, "expand_inputs"),
    "export": (["export", "--checkpoint", str(OLD), "--out", "m.onnx"], train.export, "export_model"),
}


def _failing(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("error", "line"),
    [
        (OSError(errno.EACCES, "Permission denied", "runs/x/secret"), "Error: runs/x/secret: Permission denied"),
        (OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b"), "Error: a -> b: Invalid cross-device link"),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "Error: Connection reset by peer"),
        (AslError("x.pt: bad \x1b]0;title\x07 name"), "Error: x.pt: bad \\x1b]0;title\\x07 name"),
    ],
)
def test_every_user_error_is_one_line_exit_1_in_every_subcommand(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str, error: Exception, line: str
) -> None:
    args, module, name = COMMANDS[command]
    monkeypatch.setattr(module, name, _failing(error))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(train_cli, [*args, "--device", "cpu"] if command != "export" else args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.splitlines() == [line]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str) -> None:
    args, module, name = COMMANDS[command]
    monkeypatch.setattr(module, name, _failing(KeyError("a bug in our code")))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(train_cli, args)
    assert isinstance(result.exception, KeyError) and result.exc_info[2] is not None


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--epochs", "3", "evaluate", "--checkpoint", str(OLD)], "--epochs is a training option"),
        (["--lr", "0.1", "--dim", "64", "predict", "x"], "--lr, --dim are training options"),
        (["--resume", ".", "export", "--out", "m.onnx"], "--resume is a training option"),
    ],
)
def test_training_options_before_a_subcommand_are_refused(args: list[str], named: str) -> None:
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: {named} of `asl-train` itself, which `") and "would ignore" in line


def test_an_oserror_from_elsewhere_is_not_taken_for_stdout() -> None:
    assert one_line(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"


def _to_dev_full(command: list[str]) -> subprocess.CompletedProcess:
    with open("/dev/full", "w") as full:
        return subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cli-errors")
    return demo_shards(base, demo_dataset(base, sequences=60, signs=3, participants=3), folds=3)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    "command",
    [
        ["asl-train", "--help"],
        ["asl-train", "evaluate", "--help"],
        ["asl-train", "predict", "--checkpoint", str(OLD), str(SAMPLE)],
        ["asl-train", "predict", "--checkpoint", str(OLD), "--format", "json", str(SAMPLE)],
        ["asl-pipeline", "--help"],
        ["asl-pipeline", "stats", "SHARDS"],
        ["asl-pipeline", "verify", "SHARDS"],
    ],
)
def test_a_full_stdout_is_one_line_not_a_traceback(shards: Path, command: list[str]) -> None:
    if "predict" in command and not SAMPLE.exists():
        pytest.skip("shared sample data not found")
    proc = _to_dev_full([str(BIN / command[0]), *(str(shards) if a == "SHARDS" else a for a in command[1:])])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1:] == ["Error: cannot write to standard output (No space left on device)"]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_pipeline_maps_an_oserror_to_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pipeline.cli

    monkeypatch.setattr(pipeline.cli, "read_manifest", _failing(OSError(errno.EIO, "Input/output error", "m.json")))
    result = CliRunner().invoke(pipeline_cli, ["stats", str(tmp_path)])
    assert result.exit_code == 1 and result.output.splitlines() == ["Error: m.json: Input/output error"]
