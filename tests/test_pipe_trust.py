"""A `pipe:` shard location runs its shell command only when typed on the command line: one named in a checkpoint,
a resumed run or a --config file is data, and is refused (with the option that allows it) before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.location import Location, LocationSpecError, run_any_command, run_only_typed_commands
from train.checkpoint import load_checkpoint, save_checkpoint
from train.cli import main

OLD = Path(__file__).parent / "data" / "checkpoint-format-1.pt"


def command(marker: Path) -> str:
    """A pipe: location whose command would leave `marker` behind (and then fail: there are no shards)."""
    return f"pipe:touch {marker}; cat /nonexistent/{{}}"


def checkpoint_naming(tmp_path: Path, shards: str) -> Path:
    ckpt = load_checkpoint(OLD)
    ckpt["config"]["shards"] = shards
    path = tmp_path / "shared.pt"
    save_checkpoint(path, ckpt)
    return path


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def test_evaluate_refuses_a_command_stored_in_a_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    ckpt = checkpoint_naming(tmp_path, command(marker))
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(ckpt), "--device", "cpu"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert last_line(result.output) == (
        f"Error: {command(marker)}: not run: a pipe: location runs a shell command, and this one comes from the "
        f"checkpoint {ckpt}, not from this command line; type it with --shards, or pass --allow-pipe to run commands "
        "named in files"
    )
    assert not marker.exists()


def test_training_refuses_a_command_stored_in_a_config_file(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"shards": command(marker), "epochs": 1}))
    for args in (["--config", str(config)], ["cv", "--config", str(config)]):
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run"), "--device", "cpu"])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert f"this one comes from --config {config}, not from this command line" in last_line(result.output)
        assert "--allow-pipe" in last_line(result.output)
    assert not marker.exists()


def test_the_rule_lasts_for_its_command_only(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(checkpoint_naming(tmp_path, command(marker)))])
    assert "not run" in result.output
    loc = Location.parse("pipe:cat {}")
    with pytest.raises(Exception, match="cat: .*manifest.json"):  # the program's own call runs it
        loc.read("manifest.json")


def test_a_typed_location_runs_and_another_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    typed = f"pipe:cat {tmp_path}/{{}}"
    (tmp_path / "manifest.json").write_text("{}")
    try:
        run_only_typed_commands([typed, None], "a checkpoint")
        assert Location.parse(typed).read("manifest.json") == b"{}"
        with pytest.raises(LocationSpecError, match="comes from a checkpoint, not from this command line"):
            Location.parse(command(marker)).read("manifest.json")
        assert Location.parse(str(tmp_path)).read("manifest.json") == b"{}"  # local locations are not commands
    finally:
        run_any_command()
    assert not marker.exists()


@pytest.mark.slow
def test_typed_on_the_command_line_or_allowed_it_runs(tmp_path: Path) -> None:
    for n, extra in enumerate((["--shards", command(tmp_path / "ran0")], ["--allow-pipe"])):
        marker = tmp_path / f"ran{n}"
        ckpt = checkpoint_naming(tmp_path, command(marker))
        result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", *extra])
        assert result.exit_code == 1, result.output
        assert "cannot read the manifest" in last_line(result.output) and "cat: /nonexistent/manifest.json" in (
            result.output
        )
        assert marker.exists()


def test_resume_refuses_a_command_stored_in_the_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    run.mkdir()
    checkpoint_naming(tmp_path, command(marker)).rename(run / "last.pt")
    result = CliRunner().invoke(main, ["--resume", str(run)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"this one comes from the run {run}, not from this command line" in last_line(result.output)
    assert not marker.exists()
