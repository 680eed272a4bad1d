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

from pipeline.clishared import ErrorGroup, cache_options
from pipeline.errors import AslError, one_line
from pipeline.location import stop_commands_on_signals
from pipeline.text import printable
from train.config import (
    MAX_BATCH,
    MAX_WORKERS,
    RESUMABLE,
    ConfigError,
    OptionsError,
    TrainConfig,
    flag,
    parse_folds,
    with_options,
)
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


def checkpoint_option(help: str, required: bool = True) -> Callable[[Any], Any]:
    """--checkpoint, repeatable (an ensemble), as `checkpoints`: a training checkpoint file."""
    kind = click.Path(exists=True, dir_okay=False, path_type=Path)
    return click.option("--checkpoint", "checkpoints", required=required, multiple=True, type=kind, help=help)


def device_option(help: str | None = None) -> Callable[[Any], Any]:
    """--device auto|cpu|cuda."""
    kind = click.Choice(["auto", "cpu", "cuda"])
    return click.option("--device", default="auto", show_default=True, type=kind, help=help)


def format_option(choices: list[str], help: str, default: str | None = None) -> Callable[[Any], Any]:
    """--format, as `fmt`: one of `choices`."""
    show = default is not None
    kind = click.Choice(choices)
    return click.option("--format", "fmt", default=default, show_default=show, type=kind, help=help)


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
    cls=ErrorGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
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
        if typed := _typed(ctx):
            one = len(typed) == 1
            raise click.UsageError(
                f"{', '.join(typed)} {'is a training option' if one else 'are training options'} of `asl-train` "
                f"itself, which `{ctx.invoked_subcommand}` would ignore: give {'it' if one else 'them'} without a "
                "subcommand to train; a subcommand's own options go after its name"
            )
        return
    from train.loop import train

    given = _given(ctx, options)
    origin = f"--config {config}" if config else f"the run {resume}" if resume else "the defaults"
    _commands_typed(given.get("shards"), origin, allow_pipe)
    cfg = _train_config(config, resume, given)
    _in_process_group(lambda: train(cfg, resume=resume))
    if int(os.environ.get("RANK", "0")) == 0:
        for line in run_summary(Path(cfg.out), cfg.report_to):
            click.echo(printable(line, 1000))


def _typed(ctx: click.Context) -> list[str]:
    """The group's options typed on the command line, as flags (they train: a subcommand would ignore them)."""
    return [
        next((o for o in p.opts if o.startswith("--")), p.opts[0])
        for p in ctx.command.params
        if p.name and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE
    ]


def _in_process_group(call: Callable[[], Any]) -> None:
    """Run `call`, then leave the process group it may have joined."""
    error = None
    try:
        call()
    except (AslError, OSError) as exc:
        # raised below without its frames: the failed run's (DDP among them) must go before the process group
        error = exc.with_traceback(None)
        error.__context__ = error.__cause__ = None
    finally:
        if dist.is_initialized():
            gc.collect()  # a failed run's objects in reference cycles (DDP's reducer among them) go first
            dist.destroy_process_group()
    if error is not None:
        raise error


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
        raise click.UsageError(one_line(exc)) from None
    return cfg


FOLDS = _parsed(parse_folds)  # the one fold parser, for every --folds


@main.command("cv")
@CONFIG_OPTION
@ALLOW_PIPE_OPTION
@click.option(
    "--folds",
    "cv_folds",
    default=None,
    callback=FOLDS,
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
        out = Path(cfg.out)
        click.echo(f"wrote {printable(str(out / 'cv.json'))} and {printable(str(out / 'oof.csv'))}")


@main.command("evaluate")
@checkpoint_option(
    "A training checkpoint; repeat the option to evaluate the ensemble of several (the mean of their "
    "probabilities; they must share one label map, and their validation folds unless --folds is given)."
)
@click.option(
    "--shards",
    default=None,
    help="Shard location: a directory, URL or pipe: template (default: the one the checkpoint was trained on).",
)
@click.option(
    "--folds", default=None, callback=FOLDS, help="Folds to evaluate (default: the checkpoint's validation folds)."
)
@device_option()
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=0, max=MAX_WORKERS),
    help="DataLoader workers (default: the run's, so that batches, and so every number, match its validation).",
)
@click.option("--batch-size", default=None, type=click.IntRange(min=1, max=MAX_BATCH), help="Default: the run's.")
@cache_options
@ALLOW_PIPE_OPTION
@format_option(
    ["text", "json"], "json: the whole report as one JSON object on stdout (full-precision numbers).", "text"
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
    from train.scoring import evaluation_report

    _commands_typed(shards, f"the checkpoint {checkpoints[0]}", allow_pipe)
    r = evaluation_report(
        list(checkpoints),
        shards=shards,
        folds=folds,
        device=device,
        workers=workers,
        batch_size=batch_size,
        cache_dir=cache_dir,
        cache_limit=cache_limit,
    )
    if plot is not None:
        members = f"{len(checkpoints)} checkpoints" if len(checkpoints) > 1 else str(checkpoints[0])
        plot_confusion(r["confusion"], plot, f"{members}, folds {','.join(map(str, r['folds']))}")
    if fmt == "json":
        click.echo(json.dumps(r, indent=2))
        return
    for m in r["members"]:
        path = printable(str(m["checkpoint"]))
        click.echo(f"checkpoint {path} of epoch {m['epoch']}, step {m['step']} ({m['weights']} weights)")
    if len(r["members"]) > 1:
        click.echo(f"ensemble of {len(r['members'])}: the mean of their probabilities")
    click.echo(f"folds {r['folds']}: {r['samples']} samples, top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f}")
    if trained := r["trained_folds"]:
        who = "a member" if len(r["members"]) > 1 else "the model"
        click.echo(f"note: {who} trained on fold(s) {','.join(map(str, trained))}: these scores are not held out")
    click.echo("worst signs (top-1, samples):")
    for w in r["worst_signs"]:
        click.echo(f"  {printable(w['sign'], 60):<20} {w['top1']:.3f}  {w['samples']}")
    people = sorted(r["participants"].items(), key=lambda kv: (kv[1]["top1"], kv[0]))
    click.echo(f"participants (top-1, samples), worst {min(10, len(people))} of {len(people)}:")
    for pid, v in people[:10]:
        click.echo(f"  {printable(pid, 60):<20} {v['top1']:.3f}  {v['samples']}")
    click.echo("most confused (true -> predicted: count):")
    for c in r["confused_pairs"]:
        click.echo(f"  {printable(c['true'], 60)} -> {printable(c['predicted'], 60)}: {c['count']}")
    if plot is not None:
        click.echo(f"wrote {printable(str(plot))}")


def scorer_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--checkpoint, --model, --label-map and --device: what scores sequences, for `predict` and `live`."""
    model_kind = click.Path(exists=True, dir_okay=False, path_type=Path)
    options = [
        checkpoint_option(
            "A training checkpoint (.pt): predict with PyTorch. Repeat it for an ensemble (the mean of the members' "
            "probabilities; they must share one label map).",
            required=False,
        ),
        click.option(
            "--model",
            "onnx_models",
            multiple=True,
            type=model_kind,
            help="A file written by `asl-train export`, or any model in the competition's contract with --label-map: "
            ".onnx runs with onnxruntime (the export extra), .tflite with ai-edge-litert (the tflite extra); the "
            "file's contents decide, not its name. Repeat it for an ensemble.",
        ),
        click.option(
            "--label-map",
            "label_map",
            default=None,
            type=click.Path(dir_okay=False, path_type=Path),
            help="For --model: the label map JSON {sign: index} (the competition's sign_to_prediction_index_map.json) "
            "of a model made elsewhere, with one input (T, 543, 3) float32 and one output per sign, and no metadata "
            "of ours.",
        ),
        device_option("For --checkpoint (an exported model runs on the CPU)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def scorer_of(checkpoints: tuple[Path, ...], onnx_models: tuple[Path, ...], label_map: Path | None, device: str) -> Any:
    """The scorer the options name: checkpoints or model files, never both."""
    from train.predict import CheckpointScorer, model_scorer

    if bool(checkpoints) == bool(onnx_models):
        raise click.UsageError("give exactly one of --checkpoint or --model (either may be repeated for an ensemble)")
    if label_map is not None and not onnx_models:
        raise click.UsageError("--label-map applies to --model (a checkpoint holds its own label map)")
    return model_scorer(onnx_models, label_map) if onnx_models else CheckpointScorer(checkpoints, device)


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True)
@scorer_options
@click.option("--top", "k", default=5, show_default=True, type=click.IntRange(min=1), help="Signs per file.")
@format_option(
    ["text", "json", "csv"],
    "text: 'path: sign p, ...'; json: one object a line {path, top: [[sign, p], ...], error}; "
    "csv: a header, then path, sign_i, probability_i ..., error.",
    "text",
)
def predict_cmd(
    inputs: tuple[str, ...],
    checkpoints: tuple[Path, ...],
    onnx_models: tuple[Path, ...],
    label_map: Path | None,
    device: str,
    k: int,
    fmt: str,
) -> None:
    """Top-k signs with probabilities for raw Kaggle landmark parquet files or videos.

    INPUTS are parquet files, videos (landmarks extracted as `asl-pipeline extract` does; --format json adds
    their frames and hand_share), directories (every *.parquet and video under them, recursively, sorted) or
    @LIST, a text file of paths one a line (relative to the current directory; # starts a comment).
    Give --checkpoint or --model (either repeated for an ensemble), not both. Exit status 1 when any
    file could not be read (the others are still predicted); with --format text its error goes to stderr.
    """
    from train.predict import csv_header, expand_inputs, format_prediction, iter_predictions
    from train.videoinput import require_video_support

    files = expand_inputs(inputs)
    require_video_support(files)
    scorer = scorer_of(checkpoints, onnx_models, label_map, device)
    if fmt == "csv":
        click.echo(csv_header(k))
    failed = 0
    for p in iter_predictions(scorer, files, k=k):
        failed += p.error is not None
        click.echo(format_prediction(p, fmt, k), err=fmt == "text" and p.error is not None)
    sys.exit(1 if failed else 0)


SECONDS = click.FloatRange(min=0)


@main.command("live")
@click.option(
    "--source", required=True, help="A camera index (0), a video file or a stream URL (anything OpenCV opens)."
)
@scorer_options
@click.option("--top", "k", default=3, show_default=True, type=click.IntRange(min=1), help="Signs per segment.")
@click.option("--max-seconds", default=None, type=click.FloatRange(min=0, min_open=True), help="Stop after S s.")
@click.option("--gap", default=0.5, show_default=True, type=SECONDS, help="Seconds without a hand that end a segment.")
@click.option("--pause", default=0.6, show_default=True, type=SECONDS, help="Seconds of still hands ending a segment.")
def live_cmd(
    source: str,
    checkpoints: tuple[Path, ...],
    onnx_models: tuple[Path, ...],
    label_map: Path | None,
    device: str,
    k: int,
    max_seconds: float | None,
    gap: float,
    pause: float,
) -> None:
    """Signs from a camera, video file or stream: MediaPipe Holistic on every frame, one line per signing
    segment as it ends (the hands leave the view, or rest): `start-end s (T frames): sign p, ...`."""
    from train.live import LiveOptions, format_segment, live_predictions

    scorer = scorer_of(checkpoints, onnx_models, label_map, device)
    opts = LiveOptions(gap=gap, pause=pause, max_seconds=max_seconds)
    for segment, top in live_predictions(int(source) if source.isdigit() else source, scorer, opts, k):
        click.echo(format_segment(segment, top))


@main.command("export")
@checkpoint_option(
    "The training checkpoint to export (e.g. runs/NAME/best.pt); repeat it for an ensemble in one file "
    "(its output: the log of the members' mean probability). Members must share one label map."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The file to write: model.onnx (ONNX) or model.tflite (LiteRT, the tflite extra); its metadata goes "
    "beside it, named after it (model.onnx.json).",
)
@format_option(["onnx", "tflite"], "The format to write (default: the one --out's suffix names).")
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

    r = export_model(checkpoints, out, fmt=fmt, opset=opset, use_ema=ema, check_files=check_files)
    worst = max(row.max_prob_diff for row in r.parity)
    click.echo(
        f"parity: {len(r.parity)} sequences ({min(row.frames for row in r.parity)}.."
        f"{max(row.frames for row in r.parity)} frames), top-1 equal, largest probability difference "
        f"{worst:.1e}"
    )
    made = f"opset {r.opset}, " if r.opset is not None else ""
    made += f"{r.members} members, " if r.members > 1 else ""
    written = f"{printable(str(r.path))} ({r.size / 1e6:.2f} MB, {made}{r.weights} weights)"
    click.echo(f"wrote {written} and {printable(str(r.metadata_path))}")
