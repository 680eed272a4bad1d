"""`asl-pipeline`: the offline stage (parquet -> shards) and its tools."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from pipeline import build as build_mod
from pipeline.clishared import ErrorGroup, cache_options
from pipeline.features import MAX_LEN
from pipeline.location import stop_commands_on_signals
from pipeline.policy import MIN_RATE, RETRIES, STALL_S, ReadPolicy
from pipeline.read import clip
from pipeline.shards import MANIFEST, as_location, manifest_stats, manifest_totals, read_manifest, verify_shards


@click.group(cls=ErrorGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Offline stage for the Kaggle asl-signs landmarks: parquet files -> WebDataset shards."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")
    stop_commands_on_signals()  # a remote location's commands die with this process


def _valid_folds(folds: int) -> int:
    """`--folds`, or a usage error saying what to do instead."""
    problem = build_mod.folds_problem(folds)
    if problem:
        raise click.BadParameter(problem)
    return folds


@main.command("build-shards")
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Kaggle layout: train.csv, sign_to_prediction_index_map.json, train_landmark_files/.",
)
@click.option(
    "--out",
    default="shards",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory for the shards and manifest.json.",
)
@click.option("--jobs", "-j", default=0, show_default="all cores", type=int, help="Parallel worker processes.")
@click.option("--shard-size", default=500, show_default=True, type=click.IntRange(min=1), help="Samples per shard.")
@click.option(
    "--folds",
    default=5,
    show_default=True,
    type=int,
    callback=lambda ctx, param, value: _valid_folds(value),
    help=f"Folds, grouped by participant; 2 to {build_mod.MAX_FOLDS:,} (the trainer chooses which validate, or none).",
)
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]))
@click.option(
    "--layout",
    default="compact",
    show_default=True,
    type=click.Choice(["compact", "padded"]),
    help="compact: real frames only (L,118,6); padded: (384,118,6) + mask.npy.",
)
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use only the first N rows of train.csv.")
@click.option(
    "--max-file-mb",
    default=build_mod.MAX_FILE_MB,
    show_default=True,
    type=click.IntRange(min=1),
    help="Reject landmark files larger than this (MiB; the real ones are under 10).",
)
@click.option("--force", is_flag=True, help="Delete shards built with other options or inputs and rebuild.")
def build_shards_cmd(
    data_dir: Path,
    out: Path,
    jobs: int,
    shard_size: int,
    folds: int,
    dtype: str,
    layout: str,
    limit: int | None,
    max_file_mb: int,
    force: bool,
) -> None:
    """Preprocess every sequence into (L, 118, 6) features and write fold-tagged tar shards.

    Resumable: a rerun builds only missing or incomplete shards; an identical rerun does
    nothing. A bad landmark file is rejected with its reason and the rest still built.
    Exit status: 0 all inputs written, 3 finished but some inputs were rejected (listed in
    OUT/rejects.jsonl and the manifest), 1 stopped with one line: a bad train.csv or label
    map, options that clash with existing shards, another build writing to OUT, or OUT not
    writable or full.
    """
    opts = build_mod.BuildOptions(
        shard_size=shard_size, folds=folds, dtype=dtype, layout=layout, limit=limit, max_file_mb=max_file_mb
    )
    jobs = jobs if jobs > 0 else (os.cpu_count() or 1)
    start = time.perf_counter()
    with tqdm(unit="file", desc="build-shards", dynamic_ncols=True, disable=None) as bar:
        rejected = 0

        def progress(files: int, rejects: int, total: int) -> None:
            nonlocal rejected
            rejected += rejects
            bar.total = total
            bar.update(files)
            bar.set_postfix(rejected=rejected, refresh=False)

        result = build_mod.build_shards(data_dir, out, opts, jobs=jobs, force=force, progress=progress)
    totals = result.manifest["totals"]
    if result.built == 0 and result.skipped and not result.manifest_written:
        click.echo(f"{out}: all {result.skipped} shards are complete and match these options; nothing to do.")
    elif result.built == 0 and result.skipped:
        click.echo(f"{out}: all {result.skipped} shards are complete; manifest rewritten from their markers.")
    seconds = time.perf_counter() - start
    click.echo(
        f"{totals['samples']} samples in {totals['shards']} shards ({totals['bytes'] / 1e6:.1f} MB) -> {out}; "
        f"built {result.built}, reused {result.skipped}, rejected {totals['rejected']}, {seconds:.1f}s"
    )
    if result.rejects:
        for r in result.rejects[:10]:
            click.echo(f"  rejected {clip(r['path'], 200)}: {r['reason']}", err=True)
        if len(result.rejects) > 10:
            click.echo(f"  ... {len(result.rejects) - 10} more in {out / 'rejects.jsonl'}", err=True)
    sys.exit(result.exit_code)


LOCATION_HELP = (
    "SHARDS is a directory, a file:// or http(s):// URL of one, or a pipe: command template whose {} "
    "stands for a file name (e.g. 'pipe:aws s3 cp s3://bucket/shards/{} -')."
)


@main.command("verify", epilog=LOCATION_HELP)
@click.argument("shards", default="shards")
@cache_options
@click.option(
    "--io-timeout",
    default=STALL_S,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds without a byte before a remote read is abandoned.",
)
@click.option(
    "--io-min-rate",
    default=MIN_RATE / 1000,
    show_default=True,
    type=click.FloatRange(min=0),
    help="kB/s a remote read must average after its first --io-timeout s; 0: no such limit.",
)
@click.option(
    "--io-retries",
    default=RETRIES,
    show_default=True,
    type=click.IntRange(min=0),
    help="Further attempts at a remote shard read that failed (cut short, stalled), after 1 s, 2 s, ...",
)
def verify_cmd(
    shards: str,
    cache_dir: Path | None,
    cache_limit: float | None,
    io_timeout: float,
    io_min_rate: float,
    io_retries: int,
) -> None:
    """Check every shard against the manifest: size, sha256, sample count, keys, labels and shapes.

    Exit status 1 on any mismatch (each one is listed).
    """
    from pipeline.cache import cache_view

    policy = ReadPolicy.from_options(io_timeout, io_min_rate, io_retries)
    manifest = read_manifest(shards, policy)
    totals = manifest_totals(manifest)  # not the manifest's own totals: those are not what is checked
    cache = cache_view(cache_dir, cache_limit, shards, manifest)
    with tqdm(total=totals["bytes"], unit="B", unit_scale=True, desc="verify", disable=None) as bar:
        problems = verify_shards(shards, manifest, progress=bar.update, policy=policy, cache=cache)
    for p in problems:
        click.echo(f"FAIL {p}", err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {shards}")
    click.echo(f"OK: {totals['shards']} shards, {totals['samples']} samples match the manifest")


@main.command("stats", epilog=LOCATION_HELP)
@click.argument("shards", default="shards")
@click.option("--top", default=10, show_default=True, help="Signs to list at each end of the count ranking.")
def stats_cmd(shards: str, top: int) -> None:
    """Counts per fold and sign, and the sequence length distribution, from the manifest."""
    stats = manifest_stats(read_manifest(shards), top, source=as_location(shards).url(MANIFEST))
    totals = stats["totals"]
    click.echo(
        f"{totals['samples']} samples, {totals['shards']} shards, {totals['bytes'] / 1e6:.1f} MB, "
        f"{totals['rejected']} rejected"
    )
    click.echo("fold  samples  shards  participants")
    for fold, samples, shards, participants in stats["folds"]:
        click.echo(f"{fold:>4}  {samples:>7}  {shards:>6}  {participants}")
    click.echo(f"signs: {stats['signs']}; most: " + ", ".join(f"{n} {c}" for n, c in stats["most"]))
    click.echo("fewest: " + ", ".join(f"{n} {c}" for n, c in stats["fewest"]))
    lengths = stats["lengths"]
    if lengths.get("count"):
        click.echo(
            "frames: "
            + ", ".join(f"{k} {lengths[k]}" for k in ("min", "p25", "median", "mean", "p75", "p95", "p99", "max"))
        )
        click.echo(f"truncated to {MAX_LEN}: {lengths['truncated']}")
        click.echo("stored length histogram: " + ", ".join(f"[{a},{b}) {n}" for a, b, n in stats["histogram"]))


@main.command("extract")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory in the Kaggle layout (train.csv, train_landmark_files/, ...).",
)
@click.option("--jobs", "-j", default=0, show_default="all cores", type=int, help="Parallel worker processes.")
@click.option(
    "--scheduler",
    default=None,
    help="Run on Dask: 'local' (a cluster of --jobs processes here) or a scheduler address (tcp://host:8786).",
)
@click.option("--fps", default=None, type=click.FloatRange(min=0, min_open=True), help="Resample to this frame rate.")
@click.option("--start", default=0.0, show_default=True, type=click.FloatRange(min=0), help="Skip frames before (s).")
@click.option("--end", default=None, type=click.FloatRange(min=0), help="Stop at this time (s).")
@click.option("--max-frames", default=None, type=click.IntRange(min=1), help="Keep at most N frames per video.")
@click.option("--max-seconds", default=None, type=click.FloatRange(min=0, min_open=True), help="Keep at most S s.")
@click.option("--mirror", is_flag=True, help="Flip frames left-right first (a selfie camera's mirrored picture).")
@click.option(
    "--model-complexity",
    default=1,
    show_default=True,
    type=click.IntRange(0, 2),
    help="Holistic's pose model (the mediapipe wheel ships 1 only).",
)
@click.option("--min-detection-confidence", default=0.5, show_default=True, type=click.FloatRange(0, 1))
@click.option("--min-tracking-confidence", default=0.5, show_default=True, type=click.FloatRange(0, 1))
@click.option(
    "--label-map",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write this sign_to_prediction_index_map.json (e.g. the competition's) instead of the sorted signs.",
)
@click.option("--participant", default="0", show_default=True, help="participant_id of videos that give none.")
@click.option(
    "--preview",
    "preview_dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write <sequence_id>.gif here: each video with its landmarks drawn.",
)
@click.option("--force", is_flag=True, help="Extract every video again, also those already extracted.")
def extract_cmd(
    inputs: tuple[str, ...],
    out: Path,
    jobs: int,
    scheduler: str | None,
    label_map: Path | None,
    participant: str,
    preview_dir: Path | None,
    force: bool,
    **options: Any,
) -> None:
    """Landmarks of videos by MediaPipe Holistic, in the Kaggle layout: INPUTS are video files, directories of
    them, @LIST files or CSV files (video,sign[,participant_id][,sequence_id]).

    Resumable: a rerun skips videos already extracted. Exit status: 0 every video extracted, 3 finished
    but some were rejected (OUT/rejects.jsonl, one line each with the reason), 1 stopped with one line.
    """
    from pipeline.extract import extract_options, extract_videos, rejects_summary

    start = time.perf_counter()
    with tqdm(unit="frame", desc="extract", dynamic_ncols=True, disable=None) as bar:
        counts = {"videos": 0, "rejected": 0}

        def progress(frames: int, videos: int, rejects: int) -> None:
            counts["videos"] += videos
            counts["rejected"] += rejects
            bar.update(frames)
            bar.set_postfix(counts, refresh=False)

        result = extract_videos(
            inputs,
            out,
            extract_options(**options),
            jobs=jobs if jobs > 0 else (os.cpu_count() or 1),
            scheduler=scheduler,
            preview_dir=preview_dir,
            label_map=label_map,
            participant=participant,
            force=force,
            progress=progress,
        )
    seconds = time.perf_counter() - start
    click.echo(
        f"{len(result.rows)} videos in {out / 'train.csv'}: extracted {result.extracted} ({result.frames} frames, "
        f"{result.frames / max(seconds, 1e-9):.1f} frames/s), already there {result.skipped}, "
        f"rejected {len(result.rejects)}, {seconds:.1f}s"
    )
    for line in rejects_summary(result.rejects):
        click.echo(f"  {line}", err=True)
    sys.exit(result.exit_code)


@main.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--sequences", default=2000, show_default=True, type=click.IntRange(min=1))
@click.option("--signs", default=25, show_default=True, type=click.IntRange(min=2))
@click.option("--participants", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--jobs", "-j", default=0, show_default="all cores", type=int)
def demo_data_cmd(out: Path, sequences: int, signs: int, participants: int, seed: int, jobs: int) -> None:
    """Write a synthetic dataset in exactly the Kaggle layout (same seed, same bytes)."""
    from pipeline.demo import write_demo_dataset

    jobs = jobs if jobs > 0 else (os.cpu_count() or 1)
    start = time.perf_counter()
    summary = write_demo_dataset(out, sequences=sequences, signs=signs, participants=participants, seed=seed, jobs=jobs)
    click.echo(f"{summary} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
