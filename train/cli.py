"""`asl-train`: train on shards, evaluate a checkpoint, predict signs for raw parquet files.

The training options are generated from `train.config.TrainConfig`'s fields: a new option is one field.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch.distributed as dist
from click.core import ParameterSource

from pipeline.errors import AslError
from pipeline.location import stop_commands_on_signals
from train.config import RESUMABLE, ConfigError, OptionsError, TrainConfig, flag, parse_folds, with_options
from train.runfiles import run_summary


def _parsed(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that parses an option's text with `parse` (a ConfigError is the option's error)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return value if value is None else parse(value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def _click_type(f: dataclasses.Field, hint: Any) -> Any:
    """The click type of a TrainConfig field: its choices, path kind or bounds, else its Python type."""
    meta = f.metadata
    if "choices" in meta:
        return click.Choice(meta["choices"])
    if "path" in meta:
        return click.Path(exists=True, dir_okay=False) if meta["path"] == "file" else click.Path()
    base = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    if base in (int, float) and ("min" in meta or "max" in meta):
        kind = click.IntRange if base is int else click.FloatRange
        return kind(min=meta.get("min"), max=meta.get("max"), min_open=meta.get("min_open", False))
    return base


def _field_options(f: dataclasses.Field, hint: Any) -> list[Callable[[Any], Any]]:
    """The click options of one TrainConfig field (none for an option of config files only)."""
    meta, name = f.metadata, f.name
    if keys := meta.get("keys"):  # a dict of overrides: one option per key, unset unless given
        return [click.option(flag(k), k, default=None, type=t, help=h) for k, (t, h) in keys.items()]
    if meta.get("help") is None:
        return []
    if hint is bool:
        return [
            click.option(
                f"{flag(name)}/--no-{flag(name)[2:]}",
                name,
                default=f.default,
                show_default=f.default,
                help=meta["help"],
            )
        ]
    if "parse" in meta:
        return [
            click.option(
                flag(name),
                name,
                default=meta["show"],
                show_default=True,
                callback=_parsed(meta["parse"]),
                help=meta["help"],
            )
        ]
    return [
        click.option(
            flag(name),
            name,
            default=f.default,
            show_default=f.default is not None,
            type=_click_type(f, hint),
            help=meta["help"],
        )
    ]


def train_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate `command` with an option for each TrainConfig field, in field order."""
    hints = typing.get_type_hints(TrainConfig)
    options = [o for f in dataclasses.fields(TrainConfig) for o in _field_options(f, hints[f.name])]
    for option in reversed(options):
        command = option(command)
    return command


def _given(ctx: click.Context, options: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig values of the options typed on the command line (the others are left to the base)."""
    given: dict[str, Any] = {}
    owner = {k: f.name for f in dataclasses.fields(TrainConfig) for k in f.metadata.get("keys") or ()}
    for name, value in options.items():
        if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            continue
        if name in owner:  # an option for one key of a dict field (--dim: model["dim"])
            given.setdefault(owner[name], {})[name] = value
        else:
            given[name] = value
    return given


CONFIG_OPTION = click.option(
    "--config",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Take the options from a JSON file (a run's RUN/config.json reruns its experiment; a file may hold any "
    "subset of the options, the others take their defaults); options given on the command line win. Give a new "
    "--out.",
)


ALLOW_PIPE_OPTION = click.option(
    "--allow-pipe",
    is_flag=True,
    help="Run a pipe: shard location named in a file (a --config file, a resumed run, a checkpoint): such a location "
    "runs a shell command, so by default only one typed as --shards on this command line runs.",
)


def _commands_typed(typed: str | Path | None, origin: str, allow_pipe: bool) -> None:
    """The pipe: trust rule of this command line: only `typed` runs, unless --allow-pipe."""
    from pipeline.location import run_any_command, run_only_typed_commands

    if not allow_pipe:
        run_only_typed_commands([None if typed is None else str(typed)], origin)
        click.get_current_context().call_on_close(run_any_command)  # for this command only (tests run several)


@click.group(
    invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@CONFIG_OPTION
@ALLOW_PIPE_OPTION
@train_options
@click.option(
    "--resume",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help=f"Continue the run in this directory from its last.pt, with its stored options; only "
    f"{', '.join(flag(name) for name in RESUMABLE)} may change. A finished run is extended by a larger --epochs "
    "(see --epochs), and refused otherwise.",
)
@click.pass_context
def main(ctx: click.Context, config: Path | None, allow_pipe: bool, resume: Path | None, **options: Any) -> None:
    """Train a sign classifier on shards (the default command), or run a subcommand.

    Multi-GPU: torchrun --nproc_per_node=N $(which asl-train) --shards shards/ ...
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    stop_commands_on_signals()  # a remote location's commands die with this process
    if ctx.invoked_subcommand is not None:
        return
    from train.loop import train

    given = _given(ctx, options)
    origin = f"--config {config}" if config else f"the run {resume}" if resume else "the defaults"
    _commands_typed(given.get("shards"), origin, allow_pipe)
    cfg = _train_config(config, resume, given)
    _in_process_group(lambda: train(cfg, resume=resume))
    if int(os.environ.get("RANK", "0")) == 0:
        for line in run_summary(Path(cfg.out), cfg.report_to):
            click.echo(line)


def _in_process_group(call: Callable[[], Any]) -> None:
    """Run `call`, then leave the process group it may have joined; an AslError or OSError is a one-line error."""
    error = None
    try:
        call()
    except (AslError, OSError) as exc:
        error = str(exc)  # raised below: the failed run's frames (DDP among them) must go before the process group
    finally:
        if dist.is_initialized():
            gc.collect()  # a failed run's objects in reference cycles (DDP's reducer among them) go first
            dist.destroy_process_group()
    if error is not None:
        raise click.ClickException(error)


def _train_config(config: Path | None, resume: Path | None, given: dict[str, Any]) -> TrainConfig:
    """The options `given` over a --config file's, a resumed run's (within the resume rule), or the defaults."""
    from train.checkpoint import check_resumable, stored_config

    try:
        if config and resume:
            raise OptionsError("--config starts a new run and --resume continues one: give only one of them")
        base = stored_config(resume) if resume else TrainConfig.from_json(config) if config else TrainConfig()
        cfg = with_options(base, given)
        if resume:
            check_resumable(resume, base, cfg)
        cfg.check()
    except OptionsError as exc:
        raise click.UsageError(str(exc)) from None
    except AslError as exc:
        raise click.ClickException(str(exc)) from None
    return cfg


def _folds(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        folds = parse_folds(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None
    if not folds:
        raise click.BadParameter(f"{value!r} names no fold; e.g. --folds 0 or 0,1")
    return folds


def _cv_folds(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    from train import cv

    try:
        return None if value is None else cv.parse_folds(value)
    except cv.CvError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command("cv")
@CONFIG_OPTION
@ALLOW_PIPE_OPTION
@click.option(
    "--folds",
    "cv_folds",
    default=None,
    callback=_cv_folds,
    help="The folds to run, e.g. 0,2 (default: every fold of the shards).",
)
@train_options
@click.pass_context
def cv_cmd(
    ctx: click.Context, config: Path | None, allow_pipe: bool, cv_folds: list[int] | None, **options: Any
) -> None:
    """Cross-validation: for each fold k, a run in OUT/fold{k}/ validated on fold k and trained on the others,
    one after the other; then OUT/cv.json, OUT/oof.csv and a one-screen summary (after every fold too).

    Every fold's scores are what `evaluate` gives for its best.pt. Rerunning the same command continues:
    finished folds are kept, an interrupted fold resumes from its last.pt (its options may change as
    --resume allows). Multi-GPU: torchrun --nproc_per_node=N $(which asl-train) cv --shards ... --out ...
    """
    if ctx.get_parameter_source("val_folds") is ParameterSource.COMMANDLINE:
        raise click.UsageError(
            "--val-folds has no meaning under cv (fold k is validated on fold k); choose the folds to run with --folds"
        )
    from train.cv import run_cv

    given = _given(ctx, options)
    _commands_typed(given.get("shards"), f"--config {config}", allow_pipe)
    cfg = _train_config(config, None, given)
    _in_process_group(lambda: run_cv(cfg, cv_folds, click.echo))
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"wrote {Path(cfg.out) / 'cv.json'} and {Path(cfg.out) / 'oof.csv'}")


def _cache_limit(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    from pipeline.cli import cache_limit_checked  # asl-pipeline's check; imported only when the option is given

    return value if value is None else cache_limit_checked(ctx, param, value)


@main.command("evaluate")
@click.option(
    "--checkpoint",
    "checkpoints",
    required=True,
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A training checkpoint; repeat the option to evaluate the ensemble of several (the mean of their "
    "probabilities; they must share one label map, and their validation folds unless --folds is given).",
)
@click.option(
    "--shards",
    default=None,
    help="Shard location: a directory, URL or pipe: template (default: the one the checkpoint was trained on).",
)
@click.option(
    "--folds", default=None, callback=_folds, help="Folds to evaluate (default: the checkpoint's validation folds)."
)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=0),
    help="DataLoader workers (default: the run's, so that batches, and so every number, match its validation).",
)
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Default: the run's.")
@click.option(
    "--cache-dir",
    default=None,
    type=click.Path(path_type=Path),
    help="Read remote shards through this shard cache (see asl-train --cache-dir).",
)
@click.option(
    "--cache-limit",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    callback=_cache_limit,
    help="GB the cache may hold (default: no limit).",
)
@ALLOW_PIPE_OPTION
@click.option(
    "--format",
    "fmt",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: the whole report as one JSON object on stdout (full-precision numbers).",
)
@click.option(
    "--plot",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the confusion matrix of the most confused signs into this PNG (needs matplotlib: the plot extra).",
)
def evaluate_cmd(
    checkpoints: tuple[Path, ...],
    shards: str | None,
    folds: list[int] | None,
    device: str,
    workers: int | None,
    batch_size: int | None,
    cache_dir: Path | None,
    cache_limit: float | None,
    allow_pipe: bool,
    fmt: str,
    plot: Path | None,
) -> None:
    """Top-1, top-5, the worst signs and participants and the most confused pairs on validation folds.

    With the run's defaults it scores best.pt exactly as the run's validation did: the top-1 that
    asl-train printed for the best epoch.
    """
    from train.confusion import plot_confusion
    from train.predict import evaluation_report

    _commands_typed(shards, f"the checkpoint {checkpoints[0]}", allow_pipe)
    try:
        r = evaluation_report(
            list(checkpoints),
            shards,
            folds,
            device=device,
            workers=workers,
            batch_size=batch_size,
            cache_dir=cache_dir,
            cache_limit=cache_limit,
        )
        if plot is not None:
            members = f"{len(checkpoints)} checkpoints" if len(checkpoints) > 1 else str(checkpoints[0])
            plot_confusion(r["confusion"], plot, f"{members}, folds {','.join(map(str, r['folds']))}")
    except (AslError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if fmt == "json":
        click.echo(json.dumps(r, indent=2))
        return
    for m in r["members"]:
        click.echo(f"checkpoint {m['checkpoint']} of epoch {m['epoch']}, step {m['step']} ({m['weights']} weights)")
    if len(r["members"]) > 1:
        click.echo(f"ensemble of {len(r['members'])}: the mean of their probabilities")
    click.echo(f"folds {r['folds']}: {r['samples']} samples, top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f}")
    click.echo("worst signs (top-1, samples):")
    for w in r["worst_signs"]:
        click.echo(f"  {w['sign']:<20} {w['top1']:.3f}  {w['samples']}")
    people = sorted(r["participants"].items(), key=lambda kv: (kv[1]["top1"], kv[0]))
    click.echo(f"participants (top-1, samples), worst {min(10, len(people))} of {len(people)}:")
    for pid, v in people[:10]:
        click.echo(f"  {pid:<20} {v['top1']:.3f}  {v['samples']}")
    click.echo("most confused (true -> predicted: count):")
    for c in r["confused_pairs"]:
        click.echo(f"  {c['true']} -> {c['predicted']}: {c['count']}")
    if plot is not None:
        click.echo(f"wrote {plot}")


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A training checkpoint (.pt): predict with PyTorch. Repeat it for an ensemble (the mean of the members' "
    "probabilities; they must share one label map).",
)
@click.option(
    "--model",
    "onnx_models",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file written by `asl-train export`: .onnx runs with onnxruntime (the export extra), .tflite with "
    "ai-edge-litert (the tflite extra); the file's contents decide, not its name. Repeat it for an ensemble.",
)
@click.option("--top", "k", default=5, show_default=True, type=click.IntRange(min=1), help="Signs per file.")
@click.option(
    "--format",
    "fmt",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json", "csv"]),
    help="text: 'path: sign p, ...'; json: one object a line {path, top: [[sign, p], ...], error}; "
    "csv: a header, then path, sign_i, probability_i ..., error.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="For --checkpoint (an exported model runs on the CPU).",
)
def predict_cmd(
    inputs: tuple[str, ...], checkpoints: tuple[Path, ...], onnx_models: tuple[Path, ...], k: int, fmt: str, device: str
) -> None:
    """Top-k signs with probabilities for raw Kaggle landmark parquet files.

    INPUTS are parquet files, directories (every *.parquet under them, recursively, sorted) or
    @LIST, a text file of paths one a line (relative to the current directory; # starts a comment).
    Give --checkpoint or --model (either repeated for an ensemble), not both. Exit status 1 when any
    file could not be read (the others are still predicted); with --format text its error goes to stderr.
    """
    from train.predict import (
        CheckpointScorer,
        csv_header,
        expand_inputs,
        format_prediction,
        iter_predictions,
        model_scorer,
    )

    if bool(checkpoints) == bool(onnx_models):
        raise click.UsageError("give exactly one of --checkpoint or --model (either may be repeated for an ensemble)")
    try:
        files = expand_inputs(inputs)
        scorer = model_scorer(onnx_models) if onnx_models else CheckpointScorer(checkpoints, device)
    except AslError as exc:
        raise click.ClickException(str(exc)) from None
    if fmt == "csv":
        click.echo(csv_header(k))
    failed = 0
    for p in iter_predictions(scorer, files, k=k):
        failed += p.error is not None
        click.echo(format_prediction(p, fmt, k), err=fmt == "text" and p.error is not None)
    sys.exit(1 if failed else 0)


@main.command("export")
@click.option(
    "--checkpoint",
    "checkpoints",
    required=True,
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The training checkpoint to export (e.g. runs/NAME/best.pt); repeat it for an ensemble in one file "
    "(its output: the log of the members' mean probability). Members must share one label map.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The file to write: model.onnx (ONNX) or model.tflite (LiteRT, the tflite extra); its metadata goes "
    "beside it with .json (model.json).",
)
@click.option(
    "--format",
    "fmt",
    default=None,
    type=click.Choice(["onnx", "tflite"]),
    help="The format to write (default: the one --out's suffix names).",
)
@click.option(
    "--opset",
    default=None,
    type=click.IntRange(min=18),
    help="ONNX opset version (default: the exporter's, 20 with torch 2.13; 18 to 22 pass the parity check, 23 "
    "does not: onnxruntime 1.32's Attention kernel refuses the model's key-padding mask). ONNX only.",
)
@click.option(
    "--ema/--no-ema",
    default=True,
    show_default=True,
    help="Export the checkpoint's EMA weights when it has them, or its raw trained weights.",
)
@click.option(
    "--check",
    "check_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A parquet file to add to the parity check (repeat the option for more).",
)
def export_cmd(
    checkpoints: tuple[Path, ...],
    out: Path,
    fmt: str | None,
    opset: int | None,
    ema: bool,
    check_files: tuple[Path, ...],
) -> None:
    """Write a deployable ONNX or LiteRT (TFLite) model that takes one sequence's raw landmarks.

    Input `inputs`: float32 (T, 543, 3), NaN where undetected, any T >= 1; output `outputs`:
    float32 (n_signs,) logits (several --checkpoint: one file holding every member, whose output is the log
    of their mean probability); the label map is in the file's metadata and in the .json beside it,
    written as a pair (a kill leaves the old pair or the new one). The preprocessing is inside the graph.
    Before anything is written, the file's runtime (onnxruntime or ai-edge-litert) must agree with the
    PyTorch model or ensemble (same top-1, probabilities within 1e-4) on
    built-in sequences (demo signing, T = 1, 2, 450, a hand or the face missing throughout) and on
    the --check files.
    """
    from train.export import export_model

    try:
        r = export_model(checkpoints, out, fmt=fmt, opset=opset, use_ema=ema, check_files=check_files)
    except AslError as exc:
        raise click.ClickException(str(exc)) from None
    worst = max(row.max_prob_diff for row in r.parity)
    click.echo(
        f"parity: {len(r.parity)} sequences ({min(row.frames for row in r.parity)}.."
        f"{max(row.frames for row in r.parity)} frames), top-1 equal, largest probability difference "
        f"{worst:.1e}"
    )
    made = f"opset {r.opset}, " if r.opset is not None else ""
    made += f"{r.members} members, " if r.members > 1 else ""
    click.echo(f"wrote {r.path} ({r.size / 1e6:.2f} MB, {made}{r.weights} weights) and {r.metadata_path}")
