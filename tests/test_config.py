"""TrainConfig as the one source of the training options: the command line generated from it, config files
under the command line, the bounds, and the resume rule's option names."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import train.loop
from train.cli import _field_options, main
from train.config import FIELDS, RESUMABLE, ConfigError, TrainConfig, fixed_options, flag, option


def _params() -> dict[str, click.Parameter]:
    return {p.name: p for p in main.params}


def test_every_option_of_the_command_line_is_a_field_with_its_default() -> None:
    params = _params()
    model_keys = FIELDS["model"].metadata["keys"]
    for name, f in FIELDS.items():
        if f.metadata.get("help") is None:
            assert name not in params, name  # config files only
            continue
        p = params[name]
        assert p.opts[0] == flag(name) and p.help == f.metadata["help"]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        parse = f.metadata.get("parse")
        assert (parse(p.default) if parse else p.default) == default, name
    # the command line's own options, the model's overrides, and nothing else
    own = {"config", "resume", "allow_pipe"}
    assert set(params) == {*own, *model_keys, *(n for n, f in FIELDS.items() if f.metadata["help"])}


def test_a_new_field_is_a_new_option_with_its_type_and_bounds() -> None:
    @dataclasses.dataclass
    class Extra:
        passes: int = option(3, "Passes over the data.", min=1)
        ratio: float = option(0.5, "A ratio.", min=0, max=1, resumable=True)
        secret: float = option(2.0)  # no help: config files only

    hints = {"passes": int, "ratio": float, "secret": float}

    @click.command()
    def cmd(**kwargs: Any) -> None:
        click.echo(json.dumps(kwargs))

    for f in reversed(dataclasses.fields(Extra)):
        for decorate in _field_options(f, hints[f.name]):
            cmd = decorate(cmd)
    assert json.loads(CliRunner().invoke(cmd, []).output) == {"passes": 3, "ratio": 0.5}
    assert json.loads(CliRunner().invoke(cmd, ["--passes", "7"]).output)["passes"] == 7
    refused = CliRunner().invoke(cmd, ["--ratio", "1.5"])
    assert refused.exit_code == 2 and "1.5 is not in the range 0<=x<=1" in refused.output


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """The configs `asl-train` would train with (the training itself replaced by a recorder)."""
    seen: list[TrainConfig] = []
    monkeypatch.setattr(train.loop, "train", lambda cfg, resume=None: seen.append(cfg))
    return seen


def test_no_options_train_with_the_fields_defaults(captured: list[TrainConfig], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert captured == [TrainConfig(out=str(tmp_path / "run"))]


def test_the_command_line_wins_over_a_partial_config_file(captured: list[TrainConfig], tmp_path: Path) -> None:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"epochs": 3, "lr": 0.5, "augment": False, "model": {"dim": 48}}))
    args = ["--config", str(path), "--lr", "0.1", "--depth", "2", "--val-folds", "none", "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    expected = TrainConfig(
        out=str(tmp_path / "r"), epochs=3, lr=0.1, augment=False, model={"dim": 48, "depth": 2}, val_folds=[]
    )
    assert captured == [expected]
    # a flag pair sets a boolean back from the file's value
    CliRunner().invoke(main, [*args, "--augment"])
    assert captured[-1].augment is True


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"batch_size": 0}, "batch_size 0 is below its minimum 1"),
        ({"warmup": 1.5}, "warmup 1.5 is above its maximum 1"),
        ({"io_timeout": 0}, "io_timeout must be above 0"),
        ({"lr": math.inf}, "lr must be a finite number, not inf"),
        ({"grad_clip": math.nan}, "grad_clip must be a finite number, not nan"),
    ],
)
def test_config_file_values_out_of_bounds_are_refused(tmp_path: Path, content: dict, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))  # json writes inf and nan as Infinity and NaN, which it reads back
    with pytest.raises(ConfigError, match=f"^{path}: {message}$"):
        TrainConfig.from_json(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": {"dim": 33}}, "dim 33 is not divisible by heads"),
        ({"augment_options": {"no_such": 1}}, r"^unknown augment_options key\(s\) no_such; known: enabled, "),
        ({"augment_options": {"shift": math.inf}}, r"^augment_options holds a number that is not finite"),
        ({"model": {"dim": 40_000}}, r"dim 40000 is not an integer in \[1, 4096\]$"),
        ({"model": {"dim": 4096, "depth": 32}}, r"a model of [\d,]+ parameters, over the limit of 500,000,000$"),
        ({"model": {"heads": 2.0}}, r"heads 2.0 is not an integer in \[1, 64\]$"),
        ({"lr": math.inf}, r"^lr must be a finite number, not inf$"),
        ({"weight_decay": -1.0}, r"^weight_decay -1.0 is below its minimum 0$"),
        ({"val_folds": [0.5]}, r"^wrong type for val_folds \(\[0.5\], expected list\[int\]\)$"),
    ],
)
def test_overrides_that_cannot_be_built_are_one_error(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(preset="tiny", **changes).check()


def test_the_resume_rule_names_the_options_as_typed() -> None:
    stored = TrainConfig(preset="tiny", model={"dim": 48})
    changed = dataclasses.replace(stored, lr=0.5, out="elsewhere", epochs=99, model={"dim": 64, "depth": 2})
    assert fixed_options(stored, changed) == ["--depth", "--dim", "--lr", "--out"]  # epochs may change
    assert "epochs" in RESUMABLE and "lr" not in RESUMABLE
    assert fixed_options(stored, dataclasses.replace(stored, report_to=["csv"], max_steps=5)) == []


def test_an_option_typed_with_its_default_value_still_wins(captured: list[TrainConfig], tmp_path: Path) -> None:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"epochs": 3, "lr": 0.5}))
    result = CliRunner().invoke(main, ["--config", str(path), "--epochs", "30", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (captured[0].epochs, captured[0].lr) == (30, 0.5)
