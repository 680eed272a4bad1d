"""Plan and run `build-shards`: folds by participant, one shard per joblib task, resume, rejects.

Work units are shards, never files: each task reads its files, preprocesses them and
streams them into one tar under a temporary name, renames it, then writes a sidecar
`<shard>.json` (its completion marker). A rerun skips every shard whose sidecar
matches the current plan, so a crash or kill loses at most the shards in flight.
The manifest is assembled from the sidecars on every run and written last, unless the one
on disk already says the same (so an interrupted run never leaves a stale manifest behind).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from joblib import Parallel, delayed

from pipeline.features import FEATURES_VERSION, MAX_LEN, N_CHANNELS, REFERENCE_FALLBACK, compact_features
from pipeline.landmarks import POINT_LANDMARKS, REFERENCE_LANDMARK
from pipeline.read import LandmarkFileError, read_landmarks
from pipeline.shards import (
    DTYPES,
    FORMAT_VERSION,
    LAYOUTS,
    MANIFEST,
    REJECTS,
    FeatureRangeError,
    ShardWriter,
    encode_sample,
    write_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)

CSV_COLUMNS = ("path", "participant_id", "sequence_id", "sign")
LABEL_MAP = "sign_to_prediction_index_map.json"
PLAN = "plan.json"
EXIT_REJECTS = 3  # build finished, but some inputs were rejected
# Files a build writes into --out; --force deletes these and nothing else.
_OWNED = re.compile(r"(fold\d+-\d{6}\.(tar|json)|manifest\.json|plan\.json|rejects\.jsonl)(\.tmp)?")


class BuildError(RuntimeError):
    """A problem that stops the build before any work (bad train.csv, options that clash with old shards)."""


@dataclass(frozen=True)
class BuildOptions:
    shard_size: int = 500
    folds: int = 5
    dtype: str = "float16"
    layout: str = "compact"
    limit: int | None = None


@dataclass
class Row:
    sequence_id: str
    participant_id: str
    sign: str
    label: int
    path: str  # relative to the data directory


@dataclass
class ShardTask:
    name: str
    fold: int
    rows: list[Row]
    inputs: str = ""  # hash of the rows and their files' size and mtime: a changed input rebuilds the shard


@dataclass
class BuildResult:
    manifest: dict[str, Any]
    built: int  # shards built in this run
    skipped: int  # shards already complete
    rejects: list[dict[str, str]] = field(default_factory=list)
    manifest_written: bool = True  # False when the manifest on disk already described these shards

    @property
    def exit_code(self) -> int:
        return EXIT_REJECTS if self.rejects else 0


def read_index(data_dir: Path, limit: int | None = None) -> tuple[list[Row], dict[str, int], list[dict[str, str]]]:
    """Rows of train.csv with labels, the label map, and the rows rejected before reading any file."""
    csv = data_dir / "train.csv"
    if not csv.exists():
        raise BuildError(f"{csv}: not found (expected the Kaggle layout: train.csv, train_landmark_files/)")
    df = pl.read_csv(csv, infer_schema=False, n_rows=limit)
    absent = [c for c in CSV_COLUMNS if c not in df.columns]
    if absent:
        raise BuildError(f"{csv}: missing column(s) {', '.join(absent)} (has: {', '.join(df.columns)})")
    label_map = _label_map(data_dir, df["sign"].drop_nulls().unique().to_list())
    rows, rejects, seen = [], [], {}
    for i, (path, participant, sequence, sign) in enumerate(df.select(CSV_COLUMNS).iter_rows()):
        reason = None
        if sign not in label_map:
            reason = f"unknown sign {sign!r} (not in {LABEL_MAP})"
        elif not sequence or not str(sequence).isdigit():
            reason = f"sequence_id {sequence!r} is not a non-negative integer"
        elif sequence in seen:
            reason = f"duplicate sequence_id (first at train.csv row {seen[sequence] + 1})"
        elif not path or _escapes(path):
            reason = f"path {path!r} escapes the data directory"
        if reason:
            rejects.append({"sequence_id": str(sequence), "path": str(path), "reason": reason})
            continue
        seen[sequence] = i
        rows.append(Row(sequence, participant or "", sign, label_map[sign], path))
    return rows, label_map, rejects


def _escapes(path: str) -> bool:
    """True for an absolute path or one that climbs out with `..` (checked lexically: symlinks inside are fine)."""
    norm = os.path.normpath(path)
    return os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep)


def _label_map(data_dir: Path, signs: list[str]) -> dict[str, int]:
    """The Kaggle map when present, else sorted unique signs (recorded in the manifest either way)."""
    path = data_dir / LABEL_MAP
    if path.exists():
        return _read_label_map(path)
    log.warning("%s not found: labels are the sorted unique signs of train.csv", path)
    return {sign: i for i, sign in enumerate(sorted(signs))}


def _read_label_map(path: Path) -> dict[str, int]:
    """A sign -> index JSON object whose indices are exactly 0..N-1; BuildError naming the file otherwise.

    The model's output has one unit per index, so a gap or a repeat would silently train on
    a wrong number of classes or merge two signs.
    """
    try:
        label_map = json.loads(path.read_text())
    except ValueError as exc:
        raise BuildError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(label_map, dict) or not label_map:
        raise BuildError(f"{path}: expected a non-empty JSON object of sign -> index")
    # JSON object keys are always strings; the values must be plain integers (not bools, floats or strings)
    wrong = [k for k, v in label_map.items() if type(v) is not int]
    if wrong:
        raise BuildError(f"{path}: index of {wrong[0]!r} is {label_map[wrong[0]]!r}, expected an integer")
    if sorted(label_map.values()) != list(range(len(label_map))):
        raise BuildError(f"{path}: indices must be 0..{len(label_map) - 1} without gaps or repeats")
    return label_map


def assign_folds(counts: dict[str, int], folds: int) -> dict[str, int]:
    """Participant -> fold, greedy largest-first into the lightest fold; deterministic."""
    totals = [0] * folds
    out = {}
    for participant in sorted(counts, key=lambda p: (-counts[p], p)):
        fold = min(range(folds), key=lambda f: (totals[f], f))
        out[participant] = fold
        totals[fold] += counts[participant]
    return out


def plan_shards(rows: list[Row], fold_of: dict[str, int], opts: BuildOptions) -> list[ShardTask]:
    """Shards of `shard_size` rows per fold, rows in a fixed pseudo-random order so participants mix."""
    tasks = []
    for fold in range(opts.folds):
        members = [r for r in rows if fold_of[r.participant_id] == fold]
        members.sort(key=lambda r: hashlib.sha1(r.sequence_id.encode()).digest())
        for i in range(0, len(members), opts.shard_size):
            tasks.append(
                ShardTask(f"fold{fold}-{i // opts.shard_size:06d}.tar", fold, members[i : i + opts.shard_size])
            )
    return tasks


def build_shards(
    data_dir: str | Path,
    out: str | Path,
    opts: BuildOptions = BuildOptions(),
    jobs: int = -1,
    force: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
) -> BuildResult:
    """Build (or finish) the shards of `data_dir` into `out`.

    `progress(files, rejects, total files)` is called once for the shards already complete, then per shard built.
    """
    if opts.dtype not in DTYPES or opts.layout not in LAYOUTS or opts.shard_size < 1 or opts.folds < 1:
        raise BuildError(f"invalid options {opts}")
    data_dir, out = Path(data_dir), Path(out)
    rows, label_map, rejects = read_index(data_dir, opts.limit)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.participant_id] = counts.get(r.participant_id, 0) + 1
    fold_of = assign_folds(counts, opts.folds)
    tasks = plan_shards(rows, fold_of, opts)
    config = _config(opts, label_map, data_dir)
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    _claim(out, fingerprint, force)
    for task in tasks:
        task.inputs = _inputs_hash(task, data_dir, fingerprint)

    todo = [t for t in tasks if not _complete(out, t)]
    total = sum(len(t.rows) for t in tasks)
    if progress:
        progress(sum(len(t.rows) for t in tasks if t not in todo), 0, total)
    done = Parallel(n_jobs=jobs, return_as="generator_unordered")(
        delayed(build_one_shard)(t, data_dir, out, opts) for t in todo
    )
    for sidecar in done:
        if progress:
            progress(len(sidecar["sequence_ids"]) + len(sidecar["rejects"]), len(sidecar["rejects"]), total)

    # Always from the sidecars: a run that died after its shards but before the manifest left
    # complete shards that the old manifest does not describe.
    manifest = _manifest(out, tasks, config, fingerprint, fold_of, rejects)
    old = _existing_manifest(out)
    written = not (old and _without_created(old) == _without_created(manifest))
    if written:
        _write_manifest(out, manifest)
    else:
        manifest = old  # keep its "created": nothing changed
    return BuildResult(
        manifest, built=len(todo), skipped=len(tasks) - len(todo), rejects=manifest["rejects"], manifest_written=written
    )


def build_one_shard(task: ShardTask, data_dir: Path, out: Path, opts: BuildOptions) -> dict[str, Any]:
    """Preprocess the task's files into one shard, then write its sidecar; returns the sidecar."""
    writer = ShardWriter(out / task.name)
    ids, labels, frames, lengths, rejects = [], [], [], [], []
    try:
        for row in task.rows:
            try:
                xyz = read_landmarks(data_dir / row.path, coords="xy")  # z is never used
                compact, missing = compact_features(xyz)
                meta = {
                    "sequence_id": row.sequence_id, "participant_id": row.participant_id, "sign": row.sign,
                    "label": row.label, "frames": len(xyz), "length": len(compact), "fold": task.fold,
                }  # fmt: skip
                members = encode_sample(row.sequence_id, compact, missing, meta, opts.layout, opts.dtype)
            except (LandmarkFileError, FeatureRangeError) as exc:
                rejects.append({"sequence_id": row.sequence_id, "path": row.path, "reason": exc.reason})
                continue
            writer.write(members)
            ids.append(row.sequence_id)
            labels.append(row.label)
            frames.append(len(xyz))
            lengths.append(len(compact))
        size, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    sidecar = {
        "name": task.name, "fold": task.fold, "inputs": task.inputs, "samples": len(ids), "bytes": size,
        "sha256": sha, "sequence_ids": ids, "labels": labels, "frames": frames, "lengths": lengths,
        "rejects": rejects,
    }  # fmt: skip
    write_json_atomic(_sidecar_path(out, task), sidecar)
    return sidecar


def _config(opts: BuildOptions, label_map: dict[str, int], data_dir: Path) -> dict[str, Any]:
    """Everything that determines the shards' content; its hash guards against mixing builds.

    Code is not hashed: a change to the preprocessing arithmetic must bump FEATURES_VERSION
    (pipeline/features.py), and a change to the sample format FORMAT_VERSION (pipeline/shards.py).
    """
    inputs = [data_dir / "train.csv", data_dir / LABEL_MAP]
    return {
        "format_version": FORMAT_VERSION,
        "features_version": FEATURES_VERSION,
        "max_len": MAX_LEN,
        "channels": ["x", "y", "dx", "dy", "dx2", "dy2"][:N_CHANNELS],
        "point_landmarks": list(POINT_LANDMARKS),
        "reference_landmark": REFERENCE_LANDMARK,
        "reference_fallback": REFERENCE_FALLBACK,
        "normalization": (
            f"(xy - origin) / scale; origin = nanmean of raw {REFERENCE_LANDMARK} over frames "
            f"({REFERENCE_FALLBACK} if all NaN); scale = nanstd per axis over frames and points "
            "(correction=1; 1 where 0 or undefined)"
        ),
        "dtype": opts.dtype,
        "layout": opts.layout,
        "shard_size": opts.shard_size,
        "folds": opts.folds,
        "limit": opts.limit,
        "label_map": label_map,
        "inputs_sha256": {p.name: _file_digest(p) for p in inputs if p.exists()},
    }


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inputs_hash(task: ShardTask, data_dir: Path, fingerprint: str) -> str:
    digest = hashlib.sha256(fingerprint.encode())
    for row in task.rows:
        try:
            st = os.stat(data_dir / row.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "absent"
        digest.update(f"{row.sequence_id}|{row.path}|{row.label}|{stamp}\n".encode())
    return digest.hexdigest()


def _sidecar_path(out: Path, task_or_name: ShardTask | str) -> Path:
    name = task_or_name.name if isinstance(task_or_name, ShardTask) else task_or_name
    return out / (name.removesuffix(".tar") + ".json")


def _complete(out: Path, task: ShardTask) -> bool:
    """A shard is done when its tar exists and its sidecar records the same inputs and size."""
    sidecar, tar = _sidecar_path(out, task), out / task.name
    if not (sidecar.exists() and tar.exists()):
        return False
    try:
        meta = json.loads(sidecar.read_text())
    except ValueError:
        return False
    return meta.get("inputs") == task.inputs and meta.get("bytes") == tar.stat().st_size


def _claim(out: Path, fingerprint: str, force: bool) -> None:
    """Refuse to mix with shards of another configuration; with `force`, clear them."""
    plan = out / PLAN
    old = json.loads(plan.read_text()).get("fingerprint") if plan.exists() else None
    stray = [p for p in out.iterdir() if p.suffix == ".tar" or p.name.endswith(".tar.tmp")]
    if old == fingerprint or (old is None and not stray and not (out / MANIFEST).exists()):
        write_json_atomic(plan, {"fingerprint": fingerprint})
        return
    if not force:
        what = "other options or inputs" if old else "an unknown build"
        raise BuildError(
            f"{out}: holds shards built with {what}; rerun with --force to rebuild, or choose another --out"
        )
    for p in out.iterdir():
        if p.is_file() and _OWNED.fullmatch(p.name):
            p.unlink()
    write_json_atomic(plan, {"fingerprint": fingerprint})


def _manifest(
    out: Path,
    tasks: list[ShardTask],
    config: dict[str, Any],
    fingerprint: str,
    fold_of: dict[str, int],
    plan_rejects: list[dict[str, str]],
) -> dict[str, Any]:
    """The manifest of the planned shards, assembled from their sidecars."""
    sidecars = [json.loads(_sidecar_path(out, t).read_text()) for t in tasks]
    rejects = plan_rejects + [r for s in sidecars for r in s["rejects"]]
    lengths = np.array([n for s in sidecars for n in s["lengths"]], dtype=np.int64)
    frames = np.array([n for s in sidecars for n in s["frames"]], dtype=np.int64)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint,
        "config": config,
        "label_map": config["label_map"],
        "folds": [
            {
                "fold": f,
                "participants": sorted(p for p, g in fold_of.items() if g == f),
                "samples": sum(s["samples"] for s in sidecars if s["fold"] == f),
                "shards": sum(1 for s in sidecars if s["fold"] == f),
            }
            for f in range(config["folds"])
        ],
        "shards": [
            {k: s[k] for k in ("name", "fold", "samples", "bytes", "sha256", "sequence_ids", "labels", "lengths")}
            for s in sidecars
        ],  # fmt: skip
        "totals": {
            "samples": int(len(lengths)),
            "shards": len(sidecars),
            "bytes": sum(s["bytes"] for s in sidecars),
            "rejected": len(rejects),
            "real_frames": int(lengths.sum()),
        },
        "lengths": length_stats(frames, lengths),
        "rejects": rejects,
    }
    return manifest


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest on disk, or None when there is none (or it is unreadable: it will be replaced)."""
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _without_created(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k != "created"}


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write rejects.jsonl, then the manifest (last: its presence means a complete build), both atomically."""
    write_atomic(out / REJECTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in manifest["rejects"]).encode())
    write_json_atomic(out / MANIFEST, manifest)


def length_stats(frames: np.ndarray, lengths: np.ndarray) -> dict[str, Any]:
    """Distribution of raw frame counts, and how many were truncated to MAX_LEN."""
    if len(frames) == 0:
        return {"count": 0}
    q = np.percentile(frames, [25, 50, 75, 95, 99])
    return {
        "count": int(len(frames)),
        "min": int(frames.min()),
        "p25": round(float(q[0]), 1),
        "median": round(float(q[1]), 1),
        "mean": round(float(frames.mean()), 1),
        "p75": round(float(q[2]), 1),
        "p95": round(float(q[3]), 1),
        "p99": round(float(q[4]), 1),
        "max": int(frames.max()),
        "truncated": int((frames > lengths).sum()),
    }
