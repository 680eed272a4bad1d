"""`asl-train`: train on shards, evaluate a checkpoint, predict signs for raw parquet files."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
import torch.distributed as dist

from train.model import PRESETS


def _folds(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated fold numbers, e.g. 0 or 0,1") from None


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"],
                                                            "max_content_width": 100})  # fmt: skip
@click.option(
    "--shards",
    default="shards",
    show_default=True,
    help="Shards written by `asl-pipeline build-shards`: a directory, a file:// or http(s):// URL of one, or a "
    "pipe: command template whose {} stands for a file name (e.g. 'pipe:aws s3 cp s3://bucket/shards/{} -').",
)
@click.option("--val-folds", default="0", show_default=True, help="Validation folds, comma-separated.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1))
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
    default="sha256",
    show_default=True,
    type=click.Choice(["sha256", "size"]),
    help="What every shard read is checked against in the manifest: size and sha256, or size only (cheaper).",
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
    "--resume",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Continue the run in this directory from its last.pt (its stored options apply).",
)
@click.pass_context
def main(ctx: click.Context, shards: str, val_folds: str, epochs: int, batch_size: int, lr: float,
         weight_decay: float, warmup: float, label_smoothing: float, preset: str, dim: int | None,
         depth: int | None, dropout: float | None, drop_path: float | None, ema: float, device: str, workers: int,
         out: Path, max_steps: int | None, save_every: int, shard_check: str, io_timeout: float, io_retries: int,
         no_augment: bool, no_bucket: bool, compile_: bool, seed: int, resume: Path | None) -> None:  # fmt: skip
    """Train a sign classifier on shards (the default command), or run a subcommand.

    Multi-GPU: torchrun --nproc_per_node=N $(which asl-train) --shards shards/ ...
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if ctx.invoked_subcommand is not None:
        return
    from train.loop import TrainConfig, train

    overrides = {k: v for k, v in {"dim": dim, "depth": depth, "dropout": dropout, "drop_path": drop_path}.items()
                 if v is not None}  # fmt: skip
    cfg = TrainConfig(
        shards=str(shards), out=str(out), val_folds=_folds(val_folds), epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup=warmup, label_smoothing=label_smoothing, preset=preset, model=overrides,
        augment=not no_augment, ema=ema, compile=compile_, bucket=not no_bucket, device=device, workers=workers,
        seed=seed, max_steps=max_steps, save_every=save_every, shard_check=shard_check, io_timeout=io_timeout,
        io_retries=io_retries,
    )  # fmt: skip
    metrics, error = {}, None
    try:
        metrics = train(cfg, resume=resume).metrics
    except (OSError, ValueError, RuntimeError) as exc:
        error = str(exc)  # raised below: the failed run's frames (DDP among them) must go before the process group
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if error is not None:
        raise click.ClickException(error)
    if metrics and int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"validation top-1 {metrics['val_top1']:.4f}, top-5 {metrics['val_top5']:.4f} "
                   f"({metrics['val_samples']} samples) after {metrics['step']} steps -> {resume or out}")  # fmt: skip


@main.command("evaluate")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--shards",
    default=None,
    help="Shard location: a directory, URL or pipe: template (default: the one the checkpoint was trained on).",
)
@click.option("--folds", default=None, help="Folds to evaluate (default: the checkpoint's validation folds).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0))
def evaluate_cmd(checkpoint: Path, shards: str | None, folds: str | None, device: str, workers: int) -> None:
    """Top-1, top-5, the worst signs and the most confused pairs on validation folds."""
    from train.predict import evaluation_report

    try:
        r = evaluation_report(checkpoint, shards, _folds(folds) if folds else None, device=device, workers=workers)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"folds {r['folds']}: {r['samples']} samples, top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f}")
    click.echo("worst signs (top-1, samples):")
    for sign, (acc, n) in r["worst_signs"]:
        click.echo(f"  {sign:<20} {acc:.3f}  {n}")
    click.echo("most confused (true -> predicted: count):")
    for (a, b), n in r["confused_pairs"]:
        click.echo(f"  {a} -> {b}: {n}")


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
    help="A file written by `asl-train export` (.onnx): predict with onnxruntime (the export extra).",
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
        OnnxScorer,
        csv_header,
        expand_inputs,
        format_prediction,
        iter_predictions,
    )

    if (checkpoint is None) == (onnx_model is None):
        raise click.UsageError("give exactly one of --checkpoint or --model")
    try:
        files = expand_inputs(inputs)
        scorer = OnnxScorer(onnx_model) if onnx_model else CheckpointScorer(checkpoint, device)
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
    help="The ONNX file to write (e.g. model.onnx); its metadata goes beside it with .json (model.json).",
)
@click.option(
    "--opset",
    default=None,
    type=click.IntRange(min=18),
    help="ONNX opset version (default: the exporter's, 20 with torch 2.13; 18 to 22 pass the parity check, 23 "
    "does not: onnxruntime 1.32's Attention kernel refuses the model's key-padding mask).",
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
def export_cmd(checkpoint: Path, out: Path, opset: int | None, ema: bool, check_files: tuple[Path, ...]) -> None:
    """Write a deployable ONNX model that takes one sequence's raw landmarks.

    Input `inputs`: float32 (T, 543, 3), NaN where undetected, any T >= 1; output `outputs`:
    float32 (n_signs,) logits; the label map is in the file's metadata and in the .json beside it.
    The preprocessing is inside the graph. Before anything is written, onnxruntime must agree with
    the PyTorch model (same top-1, probabilities within 1e-4) on built-in sequences (demo signing,
    T = 1, 2, 450, a hand or the face missing throughout) and on the --check files.
    """
    from pipeline.read import LandmarkFileError
    from train.export import ExportError, export_onnx

    try:
        r = export_onnx(checkpoint, out, opset=opset, use_ema=ema, check_files=check_files)
    except (ExportError, LandmarkFileError, OSError, ValueError) as exc:  # ValueError: CheckpointError
        raise click.ClickException(str(exc)) from None
    worst = max(row.max_prob_diff for row in r.parity)
    click.echo(f"parity: {len(r.parity)} sequences ({min(row.frames for row in r.parity)}.."
               f"{max(row.frames for row in r.parity)} frames), top-1 equal, largest probability difference "
               f"{worst:.1e}")  # fmt: skip
    click.echo(f"wrote {r.path} ({r.size / 1e6:.2f} MB, opset {r.opset}, {r.weights} weights) and {r.metadata_path}")
