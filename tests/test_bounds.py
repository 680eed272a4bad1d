"""Bounds of what a run, a config file and an ensemble may ask: a model.max_len below the data's lengths, a model
that cannot be allocated, a key given twice in a config file, fold numbers that are not ASCII digits, members that
truncate sequences differently, options that are not finite: each one line, before any work."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SAMPLE_ROOT
from demo_data import demo_dataset, demo_shards

import train.checkpoint
from train.checkpoint import build_model, save_checkpoint
from train.cli import main as train_cli
from train.config import ConfigError, TrainConfig, parse_folds
from train.ensemble import EnsembleError, EnsembleModel
from train.loop import augment_config
from train.scoring import load_members

OLD = Path(__file__).parent / "data" / "checkpoint-format-1.pt"


def _one_line(args: list[str], code: int) -> str:
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 or lines[-1].startswith("Error:"), result.output
    return lines[-1]


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"epochs": 3, "lr": 0.01, "epochs": 5}')
    with pytest.raises(ConfigError, match=rf"^{path}: option 'epochs' is given twice$"):
        TrainConfig.from_json(path)
    path.write_text('{"model": {"dim": 64, "dim": 4096}}')  # nested objects too
    with pytest.raises(ConfigError, match="option 'dim' is given twice"):
        TrainConfig.from_json(path)
    path.write_text('{"epochs": 3, "lr": 0.01}')
    assert (TrainConfig.from_json(path).epochs, TrainConfig.from_json(path).lr) == (3, 0.01)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("²", "expected fold numbers"),
        ("٣", "expected fold numbers"),
        ("0,", "expected fold numbers"),
        ("", "expected fold numbers"),
        ("1000000", "expected fold numbers"),
        ("2,2", "named twice"),
    ],
)
def test_one_fold_parser_takes_ascii_digits_only(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_folds(text)


@pytest.mark.parametrize("command", [["cv"], ["evaluate", "--checkpoint", str(OLD)]])
@pytest.mark.parametrize("value", ["²", "0,0", "x"])
def test_folds_options_refuse_in_one_line(command: list[str], value: str) -> None:
    line = _one_line([*command, "--folds", value], 2)
    assert line.startswith("Error: Invalid value for '--folds': ") and "fold" in line


@pytest.mark.parametrize("value", ["nan", "inf", "1e400"])
def test_evaluate_cache_limit_must_be_finite(value: str) -> None:
    line = _one_line(["evaluate", "--checkpoint", str(OLD), "--cache-limit", value], 2)
    assert (
        line.startswith("Error: Invalid value for '--cache-limit': ")
        and "must be a finite number of GB above 0" in line
    )


def test_augmentation_never_resamples_past_the_models_max_len() -> None:
    assert augment_config({}, 384).max_len == 384
    assert augment_config({}, 100).max_len == 100
    assert augment_config({"max_len": 50}, 100).max_len == 50


def test_a_model_that_cannot_be_allocated_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(cfg):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 8 GB")

    monkeypatch.setattr(train.checkpoint, "SignModel", no_memory)
    with pytest.raises(
        ConfigError, match=r"^the 'tiny' model with overrides \{\} cannot be allocated here \(\[enforce"
    ):
        build_model(TrainConfig(preset="tiny"), 3)

    def a_bug(cfg):
        raise RuntimeError("shape mismatch in our own code")

    monkeypatch.setattr(train.checkpoint, "SignModel", a_bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not a failed allocation: stays a traceback
        build_model(TrainConfig(preset="tiny"), 3)


def _tiny(path: Path, **model: int) -> Path:
    cfg = TrainConfig(preset="tiny", model=model)
    weights = build_model(cfg, 3).state_dict()
    save_checkpoint(path, {"model": weights, "config": asdict(cfg), "label_map": {"a": 0, "b": 1, "c": 2}})
    return path


def test_ensemble_members_of_other_max_lens_are_one_line(tmp_path: Path) -> None:
    a, b = _tiny(tmp_path / "a.pt"), _tiny(tmp_path / "b.pt", max_len=100)
    with pytest.raises(EnsembleError, match=rf"^{a} and {b} truncate sequences at different lengths \(384 and 100"):
        load_members([a, b]).models()
    with pytest.raises(EnsembleError, match="differ in their number of signs or their max_len"):
        EnsembleModel(load_members([a]).models() + load_members([b]).models())
    sample = SAMPLE_ROOT / "22343" / "239181.parquet"
    if sample.exists():
        line = _one_line(["predict", "--checkpoint", str(a), "--checkpoint", str(b), str(sample)], 1)
        assert line.startswith(f"Error: {a} and {b} truncate sequences at different lengths")


@pytest.mark.slow  # builds shards with worker processes
def test_a_max_len_below_the_datas_lengths_is_one_line_before_training(tmp_path: Path) -> None:
    shards = demo_shards(tmp_path, demo_dataset(tmp_path, sequences=60, signs=3, participants=3), folds=3)
    longest = max(max(e["lengths"]) for e in json.loads((shards / "manifest.json").read_text())["shards"])
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"preset": "tiny", "model": {"max_len": longest - 1}, "workers": 0}))
    out = tmp_path / "run"
    line = _one_line(["--config", str(config), "--shards", str(shards), "--out", str(out), "--device", "cpu"], 1)
    assert line == (
        f"Error: {shards} holds sequences of up to {longest} frames, more than the model's max_len {longest - 1} "
        f"(model.max_len in the config); set it to {longest} or more"
    )
    assert not (out / "last.pt").exists() and not (out / "metrics.jsonl").exists()

    cfg = TrainConfig(preset="tiny", shards=str(shards), model={"max_len": longest - 1}, workers=0)
    short = tmp_path / "short.pt"
    manifest = json.loads((shards / "manifest.json").read_text())
    save_checkpoint(
        short,
        {"model": build_model(cfg, 3).state_dict(), "config": asdict(cfg), "label_map": manifest["label_map"]},
    )
    folds = sorted(e["fold"] for e in manifest["shards"] if longest in e["lengths"])[:1]
    line = _one_line(["evaluate", "--checkpoint", str(short), "--folds", str(folds[0]), "--device", "cpu"], 1)
    assert line == (
        f"Error: {short} takes sequences of up to {longest - 1} frames (its max_len); folds {folds[0]} of {shards} "
        f"hold some of {longest}"
    )


def test_predict_truncates_a_long_file_at_the_models_max_len(tmp_path: Path) -> None:
    """A 30-frame file and a model of max_len 20: scored on its first 20 frames, as the exported graph does."""
    sample = SAMPLE_ROOT / "22343" / "239181.parquet"
    if not sample.exists():
        pytest.skip("shared sample data not found")
    short = _tiny(tmp_path / "short.pt", max_len=20)
    result = CliRunner().invoke(train_cli, ["predict", "--checkpoint", str(short), "--format", "json", str(sample)])
    assert result.exit_code == 0, result.output
    top = json.loads(result.output)["top"]
    assert len(top) == 3 and sum(p for _, p in top) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "args",
    [
        ["--workers", "100000"],
        ["--batch-size", "1000000000"],
        ["evaluate", "--checkpoint", str(OLD), "--workers", "1000000"],
        ["evaluate", "--checkpoint", str(OLD), "--batch-size", "1000000000"],
    ],
)
def test_options_that_size_processes_or_memory_have_upper_bounds(args: list[str]) -> None:
    line = _one_line(args, 2)
    assert "is not in the range" in line and ("<=256" in line or "<=65536" in line)


def test_a_config_file_over_the_bounds_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"workers": 100000}')
    with pytest.raises(ConfigError, match="workers 100000 is above its maximum 256"):
        TrainConfig.from_json(path)
