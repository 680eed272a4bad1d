"""Plan and run `build-shards`: folds by participant, one shard per joblib task, resume, rejects.

Work units are shards, never files: each task reads its files, preprocesses them and
streams them into one tar under a temporary name, renames it, then writes a sidecar
`<shard>.json` (its completion marker). A rerun skips every shard whose sidecar
matches the current plan, so a crash or kill loses at most the shards in flight.
The manifest is assembled from the sidecars on every run and written last, unless the one
on disk already says the same (so an interrupted run never leaves a stale manifest behind).

Inputs pass one gate each: `read_index` (train.csv and the label map: a file-level problem
stops the build, a row-level one rejects the row), `resolve_sources` (the file system: inside
the data directory after symlinks, a regular file, bounded size, not named twice) and, per
file in the workers, `read_landmarks` and the preprocessing and encoding after it: what they raise
for a bad input (our error classes, OSError, pyarrow's errors) rejects that file alone, anything
else is a bug and stops the build with its traceback. Output faults stop the build with one line.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import heapq
import io
import json
import logging
import os
import re
import signal
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from joblib import Parallel, delayed

from pipeline.errors import AslError
from pipeline.features import FEATURES_VERSION, MAX_LEN, N_CHANNELS, REFERENCE_FALLBACK, compact_features
from pipeline.files import LockHeldError, locked, write_atomic, write_json_atomic
from pipeline.landmarks import POINT_LANDMARKS, REFERENCE_LANDMARK
from pipeline.procs import die_with_parent
from pipeline.read import MAX_FILE_MB, MB, InputFileError, clip, file_problem, quote, read_file, read_landmarks
from pipeline.shards import (
    DTYPES,
    FORMAT_VERSION,
    LAYOUTS,
    MANIFEST,
    MANIFEST_MAX_BYTES,
    MEMBER_TYPES,
    REJECTS,
    SHARD_STEM,
    ShardWriter,
    encode_sample,
    shard_name,
)
from pipeline.tario import USTAR_NAME_BYTES, ustar_header

log = logging.getLogger(__name__)

CSV_COLUMNS = ("path", "participant_id", "sequence_id", "sign")
LABEL_MAP = "sign_to_prediction_index_map.json"
PLAN = "plan.json"
LOCK = "build.lock"  # held (flock) by the running build, with its pid inside
EXIT_REJECTS = 3  # build finished, but some inputs were rejected
# Files a build writes into --out; --force deletes these and nothing else.
_OWNED = re.compile(rf"({SHARD_STEM}\.(tar|json)|manifest\.json|plan\.json|rejects\.jsonl)(\.tmp)?")
# A sample's tar members are "<sequence_id>.<type>", in the writer's ustar name field.
MAX_ID_DIGITS = USTAR_NAME_BYTES - 1 - max(len(t) for t in MEMBER_TYPES)
INDEX_MAX_BYTES = 1 << 30  # train.csv and the label map (the real ones: 5.6 MB and 3 kB)
_ASCII_DIGITS = re.compile(r"[0-9]+")
# What one input's bad content or file raises; anything else from its reading or preprocessing is a bug.
INPUT_ERRORS = (AslError, OSError, pa.ArrowException)


def _fold_entry_bytes() -> int:
    """The fewest bytes one more fold adds to the manifest as the build writes it (an empty fold, one digit)."""
    entry = {"fold": 0, "participants": [], "samples": 0, "shards": 0}
    one, two = ({"folds": [entry] * n} for n in (1, 2))
    return len(json.dumps(two, indent=1, sort_keys=True)) - len(json.dumps(one, indent=1, sort_keys=True))


# Every reader refuses a manifest over MANIFEST_MAX_BYTES, and each fold adds an entry to it: more folds than
# this can only give a manifest nobody reads (fewer can still, with many shards: checked again before writing).
MAX_FOLDS = MANIFEST_MAX_BYTES // _fold_entry_bytes()


class BuildError(AslError, RuntimeError):
    """A problem that stops the build before any work (bad train.csv, options that clash with old shards)."""


@dataclass(frozen=True)
class BuildOptions:
    shard_size: int = 500
    folds: int = 5
    dtype: str = "float16"
    layout: str = "compact"
    limit: int | None = None
    max_file_mb: int = MAX_FILE_MB  # larger landmark files are rejected; not part of the fingerprint


@dataclass
class Row:
    sequence_id: str
    participant_id: str
    sign: str
    label: int
    path: str  # relative to the data directory, as train.csv says
    line: int = 0  # of train.csv, where the row starts
    source: str = ""  # the file's real path, set by resolve_sources
    problem: str = ""  # why the file cannot be used, set by resolve_sources
    stamp: str = ""  # what a rerun compares: the file's size and mtime, or the problem


@dataclass
class Index:
    """train.csv as rows to build, the label map, rows rejected from the text alone, and both files' sha256."""

    rows: list[Row]
    label_map: dict[str, int]
    rejects: list[dict[str, str]]
    digests: dict[str, str]


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


def read_index(data_dir: Path, limit: int | None = None) -> Index:
    """train.csv and the label map, checked; BuildError naming the file when either is unusable as a whole.

    A row that alone is bad (wrong field count, an empty field, a sequence_id not in canonical
    ASCII digits or too long for a tar member name, a repeated sequence_id, an unknown sign, a
    path leaving the data directory) is rejected with `train.csv line N: reason`.
    """
    csv_path = data_dir / "train.csv"
    if not os.path.lexists(csv_path):
        raise BuildError(f"{csv_path}: not found (expected the Kaggle layout: train.csv, train_landmark_files/)")
    raw = _index_bytes(csv_path)
    header, records = _csv_records(csv_path, raw, limit)
    column = {name: header.index(name) for name in CSV_COLUMNS}
    width = len(header)
    signs = {f[column["sign"]] for _, f in records if len(f) == width and f[column["sign"]]}
    label_map, digests = _label_map(data_dir, sorted(signs))
    digests["train.csv"] = hashlib.sha256(raw).hexdigest()
    rows, rejects, seen = [], [], {}
    for line, fields in records:
        values = {c: fields[column[c]] if column[c] < len(fields) else "" for c in CSV_COLUMNS}
        path, participant, sequence, sign = values.values()
        reason = _row_problem(values, fields, width, label_map, seen)
        if reason:
            rejects.append({"sequence_id": sequence, "path": path, "reason": f"train.csv line {line}: {reason}"})
            continue
        seen[sequence] = line
        rows.append(Row(sequence, participant, sign, label_map[sign], path, line))
    return Index(rows, label_map, rejects, digests)


def _row_problem(
    values: dict[str, str], fields: list[str], width: int, label_map: dict[str, int], seen: dict[str, int]
) -> str | None:
    """What is wrong with one row of train.csv (`values` of CSV_COLUMNS, all its `fields`), or None."""
    if len(fields) != width:
        return f"{len(fields)} fields, expected {width} (as in the header)"
    path, sequence, sign = values["path"], values["sequence_id"], values["sign"]
    empty = [name for name, value in values.items() if not value]
    if empty:
        return f"empty {', '.join(empty)}"
    if sign not in label_map:
        return f"unknown sign {quote(sign)} (not in {LABEL_MAP})"
    if not _ASCII_DIGITS.fullmatch(sequence):
        return f"sequence_id {quote(sequence)} is not a non-negative integer in ASCII digits"
    if len(sequence) > 1 and sequence[0] == "0":
        return f"sequence_id {quote(sequence)} has leading zeros (a second name for {sequence.lstrip('0') or '0'})"
    if len(sequence) > MAX_ID_DIGITS:
        return f"sequence_id of {len(sequence)} digits is longer than {MAX_ID_DIGITS} (a tar member name's limit)"
    if sequence in seen:
        return f"duplicate sequence_id (first at train.csv line {seen[sequence]})"
    if _escapes(path):
        return f"path {quote(path)} escapes the data directory"
    return None


def _index_bytes(path: Path) -> bytes:
    """The bytes of train.csv or the label map through the input gate (a regular file, bounded); BuildError else."""
    try:
        return read_file(path, INDEX_MAX_BYTES)
    except InputFileError as exc:
        raise BuildError(str(exc)) from None


def _text(path: Path, raw: bytes) -> str:
    """`raw` as UTF-8 text (a leading byte order mark dropped); BuildError naming the first bad byte's line."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise BuildError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line})") from None
    if "\0" in text:  # never in a text file; no file name or id can hold one either
        line = raw.count(b"\n", 0, raw.index(0)) + 1
        raise BuildError(f"{path}: not a text file (a NUL byte on line {line})")
    return text


def _csv_records(path: Path, raw: bytes, limit: int | None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and up to `limit` data records `(first line, fields)` of a CSV file; blank lines skipped.

    A quoting error stops the build: after one, the reader cannot tell where the next row starts.
    """
    reader = csv.reader(io.StringIO(_text(path, raw), newline=""), strict=True)
    records: list[tuple[int, list[str]]] = []
    line = 1
    # csv's default 128 kB field limit would stop the build over one row's overlong field: judge that row instead
    field_limit = csv.field_size_limit(INDEX_MAX_BYTES)
    try:
        for fields in reader:
            if fields:
                records.append((line, fields))
            line = reader.line_num + 1
            if limit is not None and len(records) > limit:
                break
    except csv.Error as exc:
        hint = " (an unterminated quote?)" if "end of data" in str(exc) else ""
        raise BuildError(f"{path}: malformed CSV in the row starting at line {line}: {exc}{hint}") from None
    finally:
        csv.field_size_limit(field_limit)
    if not records:
        raise BuildError(f"{path}: empty (expected the header {','.join(CSV_COLUMNS)} and one row per sequence)")
    (_, header), records = records[0], records[1:]
    absent = [c for c in CSV_COLUMNS if c not in header]
    if absent:
        raise BuildError(f"{path}: missing column(s) {', '.join(absent)} (has: {clip(', '.join(header))})")
    repeated = sorted({c for c in CSV_COLUMNS if header.count(c) > 1})
    if repeated:
        raise BuildError(f"{path}: column {repeated[0]!r} appears more than once in the header")
    if not records:
        raise BuildError(f"{path}: no rows after the header")
    return header, records


def _escapes(path: str) -> bool:
    """True for an absolute path or one that climbs out with `..` (checked lexically; resolve_sources follows links)."""
    norm = os.path.normpath(path)
    return os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep)


def _label_map(data_dir: Path, signs: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """The Kaggle map when present, else sorted unique signs (recorded in the manifest either way); its sha256."""
    path = data_dir / LABEL_MAP
    if not os.path.lexists(path):
        log.warning("%s not found: labels are the sorted unique signs of train.csv", path)
        return {sign: i for i, sign in enumerate(signs)}, {}
    raw = _index_bytes(path)
    return _parse_label_map(path, raw), {LABEL_MAP: hashlib.sha256(raw).hexdigest()}


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; a key given twice would silently keep only its last index."""
    out = dict(pairs)
    if len(out) < len(pairs):
        raise _RepeatedKey(next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])))
    return out


def _parse_label_map(path: Path, raw: bytes) -> dict[str, int]:
    """A sign -> index JSON object whose indices are exactly 0..N-1; BuildError naming the file otherwise.

    The model's output has one unit per index, so a gap or a repeat would silently train on
    a wrong number of classes or merge two signs.
    """
    if not raw.strip():
        raise BuildError(f"{path}: empty (expected a JSON object of sign -> index)")
    try:
        label_map = json.loads(_text(path, raw), object_pairs_hook=_unique_keys)
    except _RepeatedKey as exc:
        raise BuildError(f"{path}: sign {exc.args[0]!r} appears more than once") from None
    except RecursionError:
        raise BuildError(f"{path}: not valid JSON (nested too deeply)") from None
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


def resolve_sources(rows: list[Row], data_dir: Path, max_bytes: int) -> None:
    """Set each row's `source` (its file's real path) or `problem`, and its `stamp`: the file system gate.

    A file is used only if, after resolving symlinks, it is a regular file inside the data
    directory (itself possibly a symlink), at most `max_bytes`, and no earlier row (in train.csv
    order) names the same file. Only stat calls: nothing is opened here. The workers turn a
    problem into that row's reject, so the plan (which rows go to which shard) depends on
    train.csv alone and a file that appears, moves or changes rebuilds only its shard.
    """
    root = os.path.realpath(data_dir)
    inside = root.rstrip(os.sep) + os.sep
    parents: dict[str, str] = {}  # few directories hold all the files: resolve each once
    first: dict[str, Row] = {}
    for row in rows:
        parent, name = os.path.split(row.path)
        if name in ("", ".", ".."):
            path = os.path.realpath(os.path.join(root, row.path))
        else:
            if parent not in parents:
                parents[parent] = os.path.realpath(os.path.join(root, parent))
            path = os.path.join(parents[parent], name)
        real, st, problem = _source(path, inside, max_bytes)
        if not problem and real in first:
            problem = f"same file as train.csv line {first[real].line} (sequence_id {first[real].sequence_id})"
        if problem:
            row.source, row.problem, row.stamp = "", problem, problem
        else:
            first[real] = row
            row.source, row.problem, row.stamp = real, "", f"{st.st_size}:{st.st_mtime_ns}"


def _source(path: str, inside: str, max_bytes: int) -> tuple[str, os.stat_result | None, str]:
    """(real path, stat, "") of the file at `path` (real up to its last component), or ("", None, problem)."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            path = os.path.realpath(path)
            st = os.stat(path)
    except FileNotFoundError:
        return "", None, "file not found" if path.startswith(inside) else _outside(path, inside)
    except (OSError, ValueError) as exc:
        return "", None, f"cannot stat ({getattr(exc, 'strerror', None) or exc})"
    if not path.startswith(inside):
        return "", None, _outside(path, inside)
    problem = file_problem(st, max_bytes)
    return ("", None, problem) if problem else (path, st, "")


def _outside(path: str, inside: str) -> str:
    return f"resolves to {path}, outside the data directory {inside.rstrip(os.sep) or os.sep}"


def assign_folds(counts: dict[str, int], folds: int) -> dict[str, int]:
    """Participant -> fold, greedy largest-first into the lightest fold (the lowest number on a tie); deterministic."""
    lightest = [(0, f) for f in range(folds)]  # (samples, fold): a heap, already in order
    out = {}
    for participant in sorted(counts, key=lambda p: (-counts[p], p)):
        total, fold = lightest[0]
        out[participant] = fold
        heapq.heapreplace(lightest, (total + counts[participant], fold))
    return out


def plan_shards(rows: list[Row], fold_of: dict[str, int], opts: BuildOptions) -> list[ShardTask]:
    """Shards of `shard_size` rows per fold, rows in a fixed pseudo-random order so participants mix."""
    by_fold: dict[int, list[Row]] = {}
    for r in rows:
        by_fold.setdefault(fold_of[r.participant_id], []).append(r)
    tasks = []
    for fold in sorted(by_fold):
        members = sorted(by_fold[fold], key=lambda r: hashlib.sha1(r.sequence_id.encode()).digest())
        for i in range(0, len(members), opts.shard_size):
            tasks.append(ShardTask(shard_name(fold, i // opts.shard_size), fold, members[i : i + opts.shard_size]))
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
    BuildError (one line) for what stops the whole build: options, train.csv, the label map, the output.
    """
    _check_options(opts)
    data_dir, out = Path(data_dir), Path(out)
    index = read_index(data_dir, opts.limit)
    counts: dict[str, int] = {}
    for r in index.rows:
        counts[r.participant_id] = counts.get(r.participant_id, 0) + 1
    fold_of = assign_folds(counts, opts.folds)
    tasks = plan_shards(index.rows, fold_of, opts)
    config = _config(opts, index)
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with output_lock(out):
            _claim(out, fingerprint, force)
            _remove_temporaries(out)
            resolve_sources(index.rows, data_dir, opts.max_file_mb * MB)
            for task in tasks:
                task.inputs = _inputs_hash(task, fingerprint)
            try:
                return _run(tasks, out, opts, jobs, progress, _Plan(config, fingerprint, fold_of, index.rejects))
            except BaseException:
                # joblib stops the other workers when one fails: their partial shards stay behind
                with contextlib.suppress(OSError):
                    _remove_temporaries(out)
                raise
    except OSError as exc:  # input problems were all turned into rejects: this one is the output's
        where = f"{exc.filename}: " if exc.filename else ""
        raise BuildError(f"{out}: cannot write the output ({where}{exc.strerror or exc})") from None


@contextlib.contextmanager
def _terminate_stops_workers() -> Iterator[None]:
    """While workers run, SIGTERM raises SystemExit like Ctrl-C raises KeyboardInterrupt: joblib then kills its
    workers and the build removes its temporaries (SIGTERM's default action would leave both behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def worker_count(jobs: int) -> int:
    """Worker processes for `jobs` (-1 or 0: every CPU), never more than the CPUs: more only add memory."""
    cpus = os.cpu_count() or 1
    if jobs > cpus:
        log.warning("--jobs %d is more than the %d CPUs; building with %d worker processes", jobs, cpus, cpus)
    return cpus if jobs < 1 or jobs > cpus else jobs


def folds_problem(folds: int) -> str | None:
    """Why `folds` cannot be built, with what to do instead; None for 2 to MAX_FOLDS."""
    if folds > MAX_FOLDS:
        return (
            f"--folds {folds} is more than {MAX_FOLDS:,}: the manifest would be over the "
            f"{MANIFEST_MAX_BYTES >> 20} MiB every reader accepts (folds group participants; the Kaggle set has 21)"
        )
    if folds >= 2:
        return None
    what = "puts every participant in one fold and leaves" if folds == 1 else "leaves"
    return (
        f"--folds {folds} {what} none for validation: build with --folds 2 or more (default 5) and choose "
        "at training time which folds validate (asl-train --val-folds; --val-folds none trains on every fold)"
    )


def _check_options(opts: BuildOptions) -> None:
    problem = folds_problem(opts.folds)
    if problem:
        raise BuildError(problem)
    if opts.dtype not in DTYPES or opts.layout not in LAYOUTS or min(opts.shard_size, opts.folds, opts.max_file_mb) < 1:
        raise BuildError(f"invalid options {opts}")


@dataclass
class _Plan:
    config: dict[str, Any]
    fingerprint: str
    fold_of: dict[str, int]
    rejects: list[dict[str, str]]  # from train.csv alone


def _run(
    tasks: list[ShardTask],
    out: Path,
    opts: BuildOptions,
    jobs: int,
    progress: Callable[[int, int, int], None] | None,
    plan: _Plan,
) -> BuildResult:
    """Build the shards not yet complete, then the manifest (under the output lock)."""
    todo = [t for t in tasks if not _complete(out, t)]
    total = sum(len(t.rows) for t in tasks)
    if progress:
        progress(sum(len(t.rows) for t in tasks if t not in todo), 0, total)
    parallel = Parallel(n_jobs=worker_count(jobs), return_as="generator_unordered")
    with _terminate_stops_workers():
        done = parallel(delayed(_build_in_worker)(t, out, opts, os.getpid()) for t in todo)
        for sidecar in done:
            if progress:
                progress(len(sidecar["sequence_ids"]) + len(sidecar["rejects"]), len(sidecar["rejects"]), total)

    # Always from the sidecars: a run that died after its shards but before the manifest left
    # complete shards that the old manifest does not describe.
    manifest = _manifest(out, tasks, plan.config, plan.fingerprint, plan.fold_of, plan.rejects)
    old = _existing_manifest(out)
    written = not (old and _without_created(old) == _without_created(manifest))
    if written:
        _write_manifest(out, manifest)
    else:
        manifest = old  # keep its "created": nothing changed
    return BuildResult(
        manifest, built=len(todo), skipped=len(tasks) - len(todo), rejects=manifest["rejects"], manifest_written=written
    )


_dies_with_parent = False  # set once in each worker process


def _build_in_worker(task: ShardTask, out: Path, opts: BuildOptions, builder_pid: int) -> dict[str, Any]:
    """`build_one_shard` in a worker process that ends with the build (a killed build leaves no worker behind)."""
    global _dies_with_parent
    if os.getpid() != builder_pid and not _dies_with_parent:  # never in the build's own process (--jobs 1)
        _dies_with_parent = die_with_parent()
    return build_one_shard(task, out, opts)


def build_one_shard(task: ShardTask, out: Path, opts: BuildOptions) -> dict[str, Any]:
    """Preprocess the task's files into one shard, then write its sidecar; returns the sidecar.

    A bad input file (what reading, preprocessing or encoding it raises among INPUT_ERRORS) rejects
    that file with the reason; anything else is a bug and stops the build, as does a failure to write the shard.
    """
    writer = ShardWriter(out / task.name)
    ids, labels, frames, lengths, rejects = [], [], [], [], []
    try:
        for row in task.rows:
            try:
                members, n_frames, length = _sample_members(row, task.fold, opts)
            except INPUT_ERRORS as exc:  # one bad file must never stop the others
                rejects.append({"sequence_id": row.sequence_id, "path": row.path, "reason": _reason(exc)})
                continue
            writer.write(members)
            ids.append(row.sequence_id)
            labels.append(row.label)
            frames.append(n_frames)
            lengths.append(length)
        size, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    sidecar = {
        "name": task.name,
        "fold": task.fold,
        "inputs": task.inputs,
        "samples": len(ids),
        "bytes": size,
        "sha256": sha,
        "sequence_ids": ids,
        "labels": labels,
        "frames": frames,
        "lengths": lengths,
        "rejects": rejects,
    }
    write_json_atomic(_sidecar_path(out, task), sidecar)
    return sidecar


def _sample_members(row: Row, fold: int, opts: BuildOptions) -> tuple[list[tuple[str, bytes]], int, int]:
    """The tar members of one row's sample, its raw frame count and stored length; one of INPUT_ERRORS for a bad
    input."""
    if row.problem:
        raise InputFileError(row.path, row.problem)
    xyz = read_landmarks(row.source, coords="xy", max_bytes=opts.max_file_mb * MB)  # z is never used
    compact, missing = compact_features(xyz)
    meta = {
        "sequence_id": row.sequence_id,
        "participant_id": row.participant_id,
        "sign": row.sign,
        "label": row.label,
        "frames": len(xyz),
        "length": len(compact),
        "fold": fold,
    }
    members = encode_sample(row.sequence_id, compact, missing, meta, opts.layout, opts.dtype)
    ustar_header(max((name for name, _ in members), key=len), 0)  # the writer's name check, before any byte
    return members, len(xyz), len(compact)


def _reason(exc: Exception) -> str:
    """The reject reason for an INPUT_ERRORS exception raised by one input: its own reason, or its type and message."""
    reason = getattr(exc, "reason", None)
    return (
        reason if isinstance(reason, str) else f"could not be processed ({type(exc).__name__}: {clip(str(exc), 300)})"
    )


def _config(opts: BuildOptions, index: Index) -> dict[str, Any]:
    """Everything that determines the shards' content; its hash guards against mixing builds.

    Code is not hashed: a change to the preprocessing arithmetic must bump FEATURES_VERSION
    (pipeline/features.py), and a change to the sample format FORMAT_VERSION (pipeline/shards.py).
    """
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
        "label_map": index.label_map,
        "inputs_sha256": dict(sorted(index.digests.items())),
    }


def _inputs_hash(task: ShardTask, fingerprint: str) -> str:
    """What a rerun compares to decide whether a shard is still valid: its rows and their files' stamps."""
    digest = hashlib.sha256(fingerprint.encode())
    for row in task.rows:
        digest.update(f"{row.sequence_id}|{row.path}|{row.label}|{row.stamp}\n".encode())
    return digest.hexdigest()


def _sidecar_path(out: Path, task_or_name: ShardTask | str) -> Path:
    name = task_or_name.name if isinstance(task_or_name, ShardTask) else task_or_name
    return out / (name.removesuffix(".tar") + ".json")


_SIDECAR_KEYS = (
    "name",
    "fold",
    "inputs",
    "samples",
    "bytes",
    "sha256",
    "sequence_ids",
    "labels",
    "frames",
    "lengths",
    "rejects",
)


def _complete(out: Path, task: ShardTask) -> bool:
    """A shard is done when its tar exists and its sidecar is whole and records the same inputs and size."""
    sidecar, tar = _sidecar_path(out, task), out / task.name
    if not (sidecar.is_file() and tar.is_file()):
        return False
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or any(k not in meta for k in _SIDECAR_KEYS):
        return False
    return meta["inputs"] == task.inputs and meta["bytes"] == tar.stat().st_size


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `out/build.lock` for a build: BuildError naming the holder's pid when another build holds it."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(out / LOCK))
        except LockHeldError as exc:
            raise BuildError(
                f"{out}: another build-shards (pid {exc.pid}) is writing here; "
                "wait for it to end or choose another --out"
            ) from None
        yield


def _remove_temporaries(out: Path) -> None:
    """Delete the temporary files an interrupted build left (only names a build writes; we hold the lock)."""
    stale = [p for p in out.iterdir() if p.name.endswith(".tmp") and _OWNED.fullmatch(p.name) and p.is_file()]
    for p in stale:
        p.unlink()
    if stale:
        log.info("%s: removed %d temporary file(s) left by an interrupted build", out, len(stale))


def _claim(out: Path, fingerprint: str, force: bool) -> None:
    """Refuse to mix with shards of another configuration; with `force`, clear them."""
    plan = out / PLAN
    old = _plan_fingerprint(plan)
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


def _plan_fingerprint(plan: Path) -> str | None:
    """The fingerprint recorded in plan.json; None without one, "unreadable" for a damaged one (never ours)."""
    try:
        recorded = json.loads(plan.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "unreadable"
    return recorded.get("fingerprint", "unreadable") if isinstance(recorded, dict) else "unreadable"


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
    participants: dict[int, list[str]] = {}
    for p in sorted(fold_of):
        participants.setdefault(fold_of[p], []).append(p)
    samples, shards = Counter(), Counter()
    for s in sidecars:
        samples[s["fold"]] += s["samples"]
        shards[s["fold"]] += 1
    lengths = np.array([n for s in sidecars for n in s["lengths"]], dtype=np.int64)
    frames = np.array([n for s in sidecars for n in s["frames"]], dtype=np.int64)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint,
        "config": config,
        "label_map": config["label_map"],
        "folds": [
            {"fold": f, "participants": participants.get(f, []), "samples": samples[f], "shards": shards[f]}
            for f in range(config["folds"])
        ],
        "shards": [
            {k: s[k] for k in ("name", "fold", "samples", "bytes", "sha256", "sequence_ids", "labels", "lengths")}
            for s in sidecars
        ],
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
    """Write rejects.jsonl, then the manifest (last: its presence means a complete build), both atomically.

    BuildError, and no manifest, when it would be larger than the readers accept (MANIFEST_MAX_BYTES).
    """
    size = len(json.dumps(manifest, indent=1, sort_keys=True).encode()) + 1  # as write_json_atomic writes it
    if size > MANIFEST_MAX_BYTES:
        raise BuildError(
            f"{out / MANIFEST}: would be {size:,} bytes, over the {MANIFEST_MAX_BYTES:,} every reader accepts "
            "(fewer --folds, or fewer rows with --limit)"
        )
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
