"""`asl-train`: train on shards, evaluate a checkpoint, predict signs for raw parquet files."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import torch.distributed as dist
from click.core import ParameterSource

from train.model import PRESETS
from train.report import BACKENDS


def _folds(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated fold numbers, e.g. 0 or 0,1") from None


def _val_folds(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    """Fold numbers, or [] for `none` (train on every fold)."""
    if value.strip().lower() == "none":
        return []
    folds = _folds(value)
    if not folds:
        raise click.BadParameter(f"{value!r} names no fold; use --val-folds none to train on every fold without "
                                 "validation, or name folds, e.g. --val-folds 0 or 0,1")  # fmt: skip
    return folds


def _report_to(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    if names == ["none"]:
        return []
    if not names or any(n not in BACKENDS for n in names):
        raise click.BadParameter(f"{value!r}: expected none, or {' or '.join(BACKENDS)} (both: tensorboard,csv)")
    return names


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"],
                                                            "max_content_width": 100})  # fmt: skip
@click.option(
    "--config",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Rerun an experiment: take every option from a run's config.json (RUN/config.json); options given on "
    "the command line win. Give a new --out.",
)
@click.option(
    "--shards",
    default="shards",
    show_default=True,
    help="Shards written by `asl-pipeline build-shards`: a directory, a file:// or http(s):// URL of one, or a "
    "pipe: command template whose {} stands for a file name (e.g. 'pipe:aws s3 cp s3://bucket/shards/{} -').",
)
@click.option(
    "--val-folds",
    default="0",
    show_default=True,
    callback=_val_folds,
    help="Validation folds, comma-separated; or none: train on every fold without validation (the result is then "
    "last.pt, and no best.pt is written).",
)
@click.option(
    "--epochs",
    default=30,
    show_default=True,
    type=click.IntRange(min=1),
    help="Epochs to train. With --resume, a larger value extends the run: from its current step on, the learning "
    "rate follows the warmup + cosine schedule of a run planned for the new length (for 30 -> 40 epochs it "
    "restarts at about 18% of --lr and decays to 0 at epoch 40); the result differs from a run planned that long.",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Per rank.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Peak learning rate (AdamW).")
@click.option("--weight-decay", default=0.05, show_default=True, type=float)
@click.option("--warmup", default=0.1, show_default=True, type=click.FloatRange(0, 1), help="Warmup fraction.")
@click.option("--label-smoothing", default=0.1, show_default=True, type=click.FloatRange(0, 1))
@click.option(
    "--preset",
    default="default",
    show_default=True,
    type=click.Choice(sorted(PRESETS)),
    help="Model size (default ~1.8M parameters; small for a CPU demo).",
)
@click.option("--dim", default=None, type=int, help="Override the preset's width.")
@click.option("--depth", default=None, type=int, help="Override the preset's number of conv+transformer groups.")
@click.option("--dropout", default=None, type=float, help="Override the preset's late dropout.")
@click.option("--drop-path", default=None, type=float, help="Override the preset's drop-path rate.")
@click.option(
    "--ema",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="EMA decay of the weights (e.g. 0.999); 0 turns EMA off.",
)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0), help="DataLoader workers.")
@click.option(
    "--out",
    default="runs/default",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Run directory: checkpoints, metrics.jsonl, config.json.",
)
@click.option("--max-steps", default=None, type=click.IntRange(min=1), help="Stop after this many steps.")
@click.option(
    "--save-every",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Also write last.pt every N steps (0: at epoch ends only).",
)
@click.option(
    "--shard-check",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "sha256", "size"]),
    help="What every shard read is checked against in the manifest, besides its keys, count and labels: sha256 and "
    "size, or size only; auto: sha256 for a remote location (http, pipe:), size for a local directory.",
)
@click.option(
    "--io-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds without a byte before a remote shard read is abandoned.",
)
@click.option(
    "--io-retries",
    default=2,
    show_default=True,
    type=click.IntRange(min=0),
    help="Further attempts at a remote shard read that failed (cut short, stalled, corrupted), after 1 s, 2 s, ...",
)
@click.option("--no-augment", is_flag=True, help="Train on the stored features as they are.")
@click.option("--no-bucket", is_flag=True, help="Pad every batch to 384 frames instead of length bucketing.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--report-to",
    default="none",
    show_default=True,
    callback=_report_to,
    help="Also log per-step loss, lr and samples/s and the per-epoch metrics to: tensorboard (RUN/tensorboard; "
    "needs pip install -e '.[tensorboard]'), csv (RUN/steps.csv, RUN/epochs.csv), or both: tensorboard,csv. "
    "metrics.jsonl and curves.png are always written.",
)
@click.option(
    "--log-every",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Steps between per-step logs (progress bar and --report-to); epoch ends are always logged.",
)
@click.option(
    "--init-from",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Start a new run from this checkpoint's trained weights (its EMA weights when it has them), with a new "
    "optimizer and schedule. The model must have the same architecture (--preset and overrides; dropout may "
    "differ) and the same label map, unless --new-head.",
)
@click.option(
    "--new-head",
    is_flag=True,
    help="With --init-from: a newly initialized classifier head, for shards with another label map.",
)
@click.option(
    "--resume",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Continue the run in this directory from its last.pt, with its stored options; only --epochs, "
    "--max-steps, --save-every, --report-to, --log-every and the shard location and I/O options may change. "
    "A finished run is extended by a larger --epochs (see --epochs), and refused otherwise.",
)
@click.pass_context
def main(ctx: click.Context, **options: Any) -> None:
    """Train a sign classifier on shards (the default command), or run a subcommand.

    Multi-GPU: torchrun --nproc_per_node=N $(which asl-train) --shards shards/ ...
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if ctx.invoked_subcommand is not None:
        return
    from train.loop import train

    resume = options["resume"]
    error = None
    try:
        cfg = _train_config(ctx, options)
        train(cfg, resume=resume)
    except (OSError, ValueError, RuntimeError) as exc:
        error = str(exc)  # raised below: the failed run's frames (DDP among them) must go before the process group
    finally:
        if dist.is_initialized():
            gc.collect()  # a failed run's objects in reference cycles (DDP's reducer among them) go first
            dist.destroy_process_group()
    if error is not None:
        raise click.ClickException(error)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in _run_summary(Path(cfg.out), cfg.report_to):
            click.echo(line)


# Options that set a TrainConfig field of another name; every other option sets the field of its own name.
FIELD_OF = {"no_augment": "augment", "no_bucket": "bucket", "compile_": "compile", "dim": "model", "depth": "model",
            "dropout": "model", "drop_path": "model"}  # fmt: skip


def _train_config(ctx: click.Context, options: dict[str, Any]) -> Any:
    """The TrainConfig of the options: given ones over a --config file or a resumed run's, else over the defaults."""
    from train.loop import RESUMABLE, TrainConfig, resume_config

    values = {k: v for k, v in options.items() if k not in FIELD_OF and k not in ("config", "resume")}
    values.update(
        shards=str(options["shards"]), out=str(options["out"]), augment=not options["no_augment"],
        bucket=not options["no_bucket"], compile=options["compile_"],
        init_from=str(options["init_from"]) if options["init_from"] else None,
        model={k: options[k] for k in ("dim", "depth", "dropout", "drop_path") if options[k] is not None},
    )  # fmt: skip
    unset = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    given = [p for p in ctx.command.params
             if p.name not in ("config", "resume") and ctx.get_parameter_source(p.name) not in unset]  # fmt: skip
    changes = {FIELD_OF.get(p.name, p.name): values[FIELD_OF.get(p.name, p.name)] for p in given}
    config, resume = options["config"], options["resume"]
    if config and resume:
        raise click.UsageError("--config starts a new run and --resume continues one: give only one of them")
    if resume:
        stored = asdict(resume_config(resume))
        if "model" in changes:
            changes["model"] = {**stored["model"], **changes["model"]}
        if fixed := [p.opts[0] for p in given if (f := FIELD_OF.get(p.name, p.name)) not in RESUMABLE
                     and changes[f] != stored[f]]:  # fmt: skip
            raise click.UsageError(f"--resume continues {resume} with its stored options, so {', '.join(fixed)} "
                                   f"cannot change; to change them, start a new run from its weights with "
                                   f"--init-from {resume / 'last.pt'}")  # fmt: skip
        return TrainConfig(**{**stored, **changes})
    if config:
        base = asdict(TrainConfig.from_json(config))
        if "model" in changes:
            changes["model"] = {**base["model"], **changes["model"]}
        cfg = TrainConfig(**{**base, **changes})
    else:
        cfg = TrainConfig(**values)
    if cfg.new_head and not cfg.init_from:
        raise click.UsageError("--new-head needs --init-from: it replaces the head of the weights a run starts from")
    return cfg


def _run_summary(out: Path, report_to: list[str]) -> list[str]:
    """The last lines of a run: its result (best epoch or, without validation, the last) and where its files are."""
    from train.loop import best_epoch, read_metrics

    rows = read_metrics(out)
    if not rows:
        return [f"no epoch finished -> {out}"]
    last, best = rows[-1], best_epoch(rows)
    if best is not None:
        lines = [f"best epoch {best['epoch']} of {last['epoch']}: validation top-1 {best['val_top1']:.4f}, top-5 "
                 f"{best['val_top5']:.4f} on {best['val_samples']} samples (what `asl-train evaluate --checkpoint "
                 f"{out / 'best.pt'}` reports)",
                 f"  best.pt      {out / 'best.pt'}  (epoch {best['epoch']}, step {best['step']})"]  # fmt: skip
    else:
        lines = [f"no validation (--val-folds none): trained on every fold, {last['train_samples']} samples an "
                 f"epoch; the result is last.pt (no best.pt is written)"]  # fmt: skip
    lines.append(f"  last.pt      {out / 'last.pt'}  (epoch {last['epoch']}, step {last['step']})")
    curves = out / "curves.png"
    lines.append(f"  curves       {curves}" if curves.exists() else
                 "  curves       not drawn: matplotlib is not installed (pip install -e '.[plot]')")  # fmt: skip
    if "tensorboard" in report_to:
        lines.append(f"  tensorboard  {out / 'tensorboard'}  (tensorboard --logdir {out / 'tensorboard'})")
    if "csv" in report_to:
        lines.append(f"  csv          {out / 'steps.csv'}, {out / 'epochs.csv'}")
    return lines


@main.command("evaluate")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--shards",
    default=None,
    help="Shard location: a directory, URL or pipe: template (default: the one the checkpoint was trained on).",
)
@click.option("--folds", default=None, help="Folds to evaluate (default: the checkpoint's validation folds).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=0),
    help="DataLoader workers (default: the run's, so that batches, and so every number, match its validation).",
)
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Default: the run's.")
@click.option(
    "--format",
    "fmt",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: the whole report as one JSON object on stdout (full-precision numbers).",
)
def evaluate_cmd(checkpoint: Path, shards: str | None, folds: str | None, device: str, workers: int | None,
                 batch_size: int | None, fmt: str) -> None:  # fmt: skip
    """Top-1, top-5, the worst signs and the most confused pairs on validation folds.

    With the run's defaults it scores best.pt exactly as the run's validation did: the top-1 that
    asl-train printed for the best epoch.
    """
    from train.predict import evaluation_report

    if folds is not None and not _folds(folds):
        raise click.BadParameter(f"{folds!r} names no fold; e.g. --folds 0 or 0,1", param_hint="'--folds'")
    try:
        r = evaluation_report(checkpoint, shards, _folds(folds) if folds else None, device=device, workers=workers,
                              batch_size=batch_size)  # fmt: skip
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if fmt == "json":
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"checkpoint of epoch {r['epoch']}, step {r['step']} ({r['weights']} weights)")
    click.echo(f"folds {r['folds']}: {r['samples']} samples, top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f}")
    click.echo("worst signs (top-1, samples):")
    for w in r["worst_signs"]:
        click.echo(f"  {w['sign']:<20} {w['top1']:.3f}  {w['samples']}")
    click.echo("most confused (true -> predicted: count):")
    for c in r["confused_pairs"]:
        click.echo(f"  {c['true']} -> {c['predicted']}: {c['count']}")


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--checkpoint",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A training checkpoint (.pt): predict with PyTorch.",
)
@click.option(
    "--model",
    "onnx_model",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file written by `asl-train export`: .onnx runs with onnxruntime (the export extra), .tflite with "
    "ai-edge-litert (the tflite extra); the file's contents decide, not its name.",
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
def predict_cmd(inputs: tuple[str, ...], checkpoint: Path | None, onnx_model: Path | None, k: int, fmt: str,
                device: str) -> None:  # fmt: skip
    """Top-k signs with probabilities for raw Kaggle landmark parquet files.

    INPUTS are parquet files, directories (every *.parquet under them, recursively, sorted) or
    @LIST, a text file of paths one a line (relative to the current directory; # starts a comment).
    Give exactly one of --checkpoint or --model. Exit status 1 when any file could not be read
    (the others are still predicted); with --format text its error goes to stderr.
    """
    from train.export import ExportError
    from train.predict import (
        CheckpointScorer,
        csv_header,
        expand_inputs,
        exported_scorer,
        format_prediction,
        iter_predictions,
    )

    if (checkpoint is None) == (onnx_model is None):
        raise click.UsageError("give exactly one of --checkpoint or --model")
    try:
        files = expand_inputs(inputs)
        scorer = exported_scorer(onnx_model) if onnx_model else CheckpointScorer(checkpoint, device)
    except (ValueError, ExportError) as exc:
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
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The training checkpoint to export (e.g. runs/NAME/best.pt).",
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
def export_cmd(checkpoint: Path, out: Path, fmt: str | None, opset: int | None, ema: bool,
               check_files: tuple[Path, ...]) -> None:  # fmt: skip
    """Write a deployable ONNX or LiteRT (TFLite) model that takes one sequence's raw landmarks.

    Input `inputs`: float32 (T, 543, 3), NaN where undetected, any T >= 1; output `outputs`:
    float32 (n_signs,) logits; the label map is in the file's metadata and in the .json beside it.
    The preprocessing is inside the graph. Before anything is written, the file's runtime (onnxruntime
    or ai-edge-litert) must agree with the PyTorch model (same top-1, probabilities within 1e-4) on
    built-in sequences (demo signing, T = 1, 2, 450, a hand or the face missing throughout) and on
    the --check files.
    """
    from pipeline.read import LandmarkFileError
    from train.export import ExportError, export_model

    try:
        r = export_model(checkpoint, out, fmt=fmt, opset=opset, use_ema=ema, check_files=check_files)
    except (ExportError, LandmarkFileError, OSError, ValueError) as exc:  # ValueError: CheckpointError
        raise click.ClickException(str(exc)) from None
    worst = max(row.max_prob_diff for row in r.parity)
    click.echo(f"parity: {len(r.parity)} sequences ({min(row.frames for row in r.parity)}.."
               f"{max(row.frames for row in r.parity)} frames), top-1 equal, largest probability difference "
               f"{worst:.1e}")  # fmt: skip
    made = f"opset {r.opset}, " if r.opset is not None else ""
    click.echo(f"wrote {r.path} ({r.size / 1e6:.2f} MB, {made}{r.weights} weights) and {r.metadata_path}")
