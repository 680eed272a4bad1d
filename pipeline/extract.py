"""`extract`: videos -> landmark files in the Kaggle layout (MediaPipe Holistic), one joblib task per video.

Layout written into OUT: `train_landmark_files/<participant_id>/<sequence_id>.parquet` (the competition's
schema exactly), `train.csv` (Kaggle's columns plus `source`, the video as given),
`sign_to_prediction_index_map.json` when signs are known, `rejects.jsonl` (one line per video that
could not be used) and `extract.json` (the options the files were made with).

Workers return each file's bytes; this process writes them, atomically and as they arrive, so a crash
loses only the videos in flight and a rerun skips every video whose file is there. A video's
`sequence_id` is given (CSV) or derived from its contents, so the same video gets the same file
wherever it lies. `extract_landmarks` is the one code path from a video to landmarks (also used by
`asl-train predict` and `asl-train live` through the same Holistic wrapper).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from joblib import Parallel, delayed, parallel_config

from pipeline.build import EXIT_REJECTS, LABEL_MAP, MAX_ID_DIGITS, worker_count
from pipeline.errors import AslError
from pipeline.files import locked, write_atomic, write_json_atomic
from pipeline.holistic import HolisticOptions, check_options, holistic_graph, landmarks_of, mediapipe_version
from pipeline.landmarks import N_RAW, ROW_INDEX, ROW_TYPES, TYPE_OFFSETS, TYPE_SIZES, TYPES
from pipeline.read import InputFileError, clip, quote, read_file
from pipeline.shards import REJECTS
from pipeline.video import VideoError, VideoOptions, check_file, frames, is_video

log = logging.getLogger(__name__)

LANDMARK_DIR = "train_landmark_files"
TRAIN_CSV = "train.csv"
CONFIG = "extract.json"
LOCK = "extract.lock"  # held (flock) by the running extraction, with its pid inside
CSV_COLUMNS = ("path", "participant_id", "sequence_id", "sign", "source")
LIST_PREFIX = "@"
MAX_INDEX_BYTES = 256 << 20
DEFAULT_PARTICIPANT = "0"
_ID = re.compile(r"0|[1-9][0-9]*")
_PARTICIPANT = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HASH_BYTES = 6  # content-derived sequence ids below 2**48: 15 digits at most, collisions improbable


class ExtractError(AslError, RuntimeError):
    """A problem that stops the extraction before any work (an unreadable CSV or list, clashing options)."""


@dataclass(frozen=True)
class ExtractOptions:
    video: VideoOptions = field(default_factory=VideoOptions)
    holistic: HolisticOptions = field(default_factory=HolisticOptions)

    def as_dict(self) -> dict[str, Any]:
        return {"video": self.video.as_dict(), "holistic": self.holistic.as_dict()}


@dataclass
class Extracted:
    """One video's landmarks (T, 543, 3) float64 and what a person checking it wants to know."""

    landmarks: np.ndarray
    preview: bytes | None = None

    @property
    def frames(self) -> int:
        return len(self.landmarks)

    @property
    def hand_share(self) -> float:
        """The share of frames with at least one hand found."""
        hands = np.r_[TYPE_OFFSETS["left_hand"], TYPE_OFFSETS["right_hand"]]
        return float(np.isfinite(self.landmarks[:, hands, 0]).any(axis=1).mean())


def extract_landmarks(path: str | Path, opts: ExtractOptions = ExtractOptions(), preview: bool = False) -> Extracted:
    """Holistic landmarks of every selected frame of a video; VideoError naming the file when it is unusable
    (no frame, no person in any frame, too long, not a video)."""
    from pipeline.preview import PreviewWriter

    graph = holistic_graph(opts.holistic)
    drawn = PreviewWriter() if preview else None
    rows = []
    for rgb in frames(path, opts.video):
        rows.append(landmarks_of(graph, rgb))
        if drawn is not None:
            drawn.add(rgb, rows[-1])
    xyz = np.stack(rows)
    pose = slice(TYPE_OFFSETS["pose"], TYPE_OFFSETS["pose"] + TYPE_SIZES["pose"])
    if not np.isfinite(xyz[:, pose, 0]).any():
        raise VideoError(path, f"no person found in any of its {len(xyz)} frames")
    return Extracted(xyz, drawn.gif_bytes() if drawn is not None else None)


def landmark_table(xyz: np.ndarray) -> pa.Table:
    """The Kaggle table of a (T, 543, 3) sequence: frames numbered from 0, 543 rows each in the competition's order."""
    t = len(xyz)
    frame = np.repeat(np.arange(t, dtype=np.int16), N_RAW)
    types = np.array(TYPES, dtype=object)[ROW_TYPES]
    row_id = [f"{f}-{kind}-{i}" for f in range(t) for kind, i in zip(types, ROW_INDEX.tolist(), strict=True)]
    flat = np.ascontiguousarray(xyz, dtype=np.float64).reshape(t * N_RAW, 3)
    return pa.table(
        {
            "frame": pa.array(frame, pa.int16()),
            "row_id": pa.array(row_id, pa.string()),
            "type": pa.array(np.tile(types, t), pa.string()),
            "landmark_index": pa.array(np.tile(ROW_INDEX, t), pa.int16()),
            "x": pa.array(flat[:, 0], pa.float64()),
            "y": pa.array(flat[:, 1], pa.float64()),
            "z": pa.array(flat[:, 2], pa.float64()),
        }
    )


def parquet_bytes(xyz: np.ndarray) -> bytes:
    """The landmark file of a sequence, as bytes (the same for the same landmarks)."""
    sink = pa.BufferOutputStream()
    pq.write_table(landmark_table(xyz), sink, compression="snappy")
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------------------- inputs


@dataclass
class VideoTask:
    """One video to extract: as given on the command line or in a CSV, where to open it, and its ids."""

    source: str
    path: str
    sign: str = ""
    participant_id: str = DEFAULT_PARTICIPANT
    sequence_id: str = ""

    @property
    def relpath(self) -> str:
        return f"{LANDMARK_DIR}/{self.participant_id}/{self.sequence_id}.parquet"


def video_files(args: Iterable[str | Path]) -> list[tuple[str, str, dict[str, str]]]:
    """(source as given, path to open, CSV fields) of each video named: files, directories (every video under
    them, recursively, sorted), `@LIST` files (one path a line) and CSV files (`video,sign[,participant_id]
    [,sequence_id]`, paths relative to the CSV)."""
    found: list[tuple[str, str, dict[str, str]]] = []
    for arg in map(str, args):
        if arg.startswith(LIST_PREFIX):
            found += video_files(_list_lines(Path(arg[len(LIST_PREFIX) :])))
        elif Path(arg).is_dir():
            videos = sorted(p for p in Path(arg).rglob("*") if is_video(p) and not p.is_dir())
            if not videos:
                raise ExtractError(f"{arg}: no video files under this directory (looked for {_suffixes()})")
            found += [(str(p), str(p), {}) for p in videos]
        elif arg.lower().endswith(".csv"):
            found += _csv_videos(Path(arg))
        else:
            found.append((arg, arg, {}))
    return found


def _suffixes() -> str:
    from pipeline.video import VIDEO_SUFFIXES

    return ", ".join(VIDEO_SUFFIXES)


def _text(path: Path, what: str) -> str:
    try:
        return read_file(path, MAX_INDEX_BYTES).decode("utf-8-sig")
    except InputFileError as exc:
        raise ExtractError(f"{path}: cannot read the {what} ({exc.reason})") from None
    except UnicodeDecodeError:
        raise ExtractError(f"{path}: the {what} is not UTF-8 text") from None


def _list_lines(path: Path) -> list[str]:
    lines = _text(path, "list of videos").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _csv_videos(path: Path) -> list[tuple[str, str, dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(_text(path, "CSV of videos"), newline=""))
    header = reader.fieldnames or []
    absent = [c for c in ("video", "sign") if c not in header]
    if absent:
        raise ExtractError(
            f"{path}: missing column(s) {', '.join(absent)} (expected video,sign[,participant_id]"
            f"[,sequence_id]; has: {clip(', '.join(header))})"
        )
    out = []
    try:
        for row in reader:
            video = (row.get("video") or "").strip()
            if video:
                fields = {k: (row.get(k) or "").strip() for k in ("sign", "participant_id", "sequence_id")}
                out.append((video, str(path.parent / video), fields))
    except csv.Error as exc:
        raise ExtractError(f"{path}: malformed CSV at line {reader.line_num}: {exc}") from None
    return out


def plan_tasks(
    args: Iterable[str | Path], participant: str = DEFAULT_PARTICIPANT
) -> tuple[list[VideoTask], list[dict]]:
    """The videos to extract, each with its ids, and the rejects found before decoding (missing, empty, not a
    regular file, a bad id, the same video twice)."""
    tasks, rejects, seen = [], [], {}
    for source, path, fields in video_files(args):
        task = VideoTask(source, path, fields.get("sign", ""), fields.get("participant_id") or participant)
        try:
            check_file(path)
            task.sequence_id = fields.get("sequence_id") or _content_id(path)
            _check_ids(task)
        except (VideoError, ValueError) as exc:
            rejects.append(_reject(task, getattr(exc, "reason", str(exc))))
            continue
        if task.sequence_id in seen:
            rejects.append(
                _reject(
                    task,
                    f"sequence_id {task.sequence_id} again (first: {clip(seen[task.sequence_id])})"
                    + ("" if fields.get("sequence_id") else ": the same video"),
                )
            )
            continue
        seen[task.sequence_id] = source
        tasks.append(task)
    return tasks, rejects


def _content_id(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return str(int.from_bytes(digest.digest()[:_HASH_BYTES], "big"))


def _check_ids(task: VideoTask) -> None:
    if not _ID.fullmatch(task.sequence_id) or len(task.sequence_id) > MAX_ID_DIGITS:
        raise ValueError(
            f"sequence_id {quote(task.sequence_id)} is not a non-negative integer of at most "
            f"{MAX_ID_DIGITS} ASCII digits without leading zeros"
        )
    if not _PARTICIPANT.fullmatch(task.participant_id):
        raise ValueError(f"participant_id {quote(task.participant_id)} is not 1-64 letters, digits, _ or -")


def _reject(task: VideoTask, reason: str) -> dict[str, str]:
    return {"source": task.source, "sequence_id": task.sequence_id, "reason": reason}


# ---------------------------------------------------------------------------- the stage


@dataclass
class ExtractResult:
    rows: list[VideoTask]  # in train.csv, in input order
    extracted: int
    skipped: int
    frames: int
    rejects: list[dict[str, str]]

    @property
    def exit_code(self) -> int:
        return EXIT_REJECTS if self.rejects else 0


def extract_one(task: VideoTask, opts: ExtractOptions, preview: bool = False) -> dict[str, Any]:
    """A worker's answer for one video: its file's bytes and counts, or the reason it was rejected."""
    try:
        found = extract_landmarks(task.path, opts, preview)
    except VideoError as exc:
        return {"reason": exc.reason}
    return {
        "parquet": parquet_bytes(found.landmarks),
        "preview": found.preview,
        "frames": found.frames,
        "hand_share": found.hand_share,
    }


def extract_videos(
    inputs: Iterable[str | Path],
    out: str | Path,
    opts: ExtractOptions = ExtractOptions(),
    jobs: int = 1,
    scheduler: str | None = None,
    preview_dir: str | Path | None = None,
    label_map: str | Path | None = None,
    participant: str = DEFAULT_PARTICIPANT,
    force: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
) -> ExtractResult:
    """Extract every video named in `inputs` into `out` (see the module docstring); `progress(frames, videos,
    rejected)` after each video. `scheduler`: None (local processes), "local" (a Dask cluster of `jobs`
    processes on this machine) or a Dask scheduler's address."""
    out = Path(out)
    check_options(opts.holistic)  # here, not in every worker
    tasks, rejects = plan_tasks(inputs, participant)
    signs = _label_map(tasks, label_map)
    for task in [t for t in tasks if t.sign and signs is not None and t.sign not in signs]:
        rejects.append(_reject(task, f"sign {quote(task.sign)} is not in {label_map}"))
        tasks.remove(task)
    out.mkdir(parents=True, exist_ok=True)
    preview = Path(preview_dir) if preview_dir is not None else None
    if preview is not None:
        preview.mkdir(parents=True, exist_ok=True)
    failed: set[str] = set()
    frames_done = 0
    with locked(out / LOCK):  # one extraction at a time writes into OUT
        _claim(out, opts, force)
        todo = [t for t in tasks if force or not _finished(out, t, preview)]
        for task, answer in zip(todo, _answers(todo, opts, preview is not None, jobs, scheduler), strict=True):
            if "reason" in answer:
                rejects.append(_reject(task, answer["reason"]))
                failed.add(task.sequence_id)
            else:
                (out / task.relpath).parent.mkdir(parents=True, exist_ok=True)
                write_atomic(out / task.relpath, answer["parquet"])
                if preview is not None:
                    write_atomic(preview / f"{task.sequence_id}.gif", answer["preview"])
                frames_done += answer["frames"]
            if progress:
                progress(answer.get("frames", 0), 1, int("reason" in answer))
        rows = [t for t in tasks if t.sequence_id not in failed]
        _write_index(out, rows, rejects, signs)
    return ExtractResult(rows, len(todo) - len(failed), len(tasks) - len(todo), frames_done, rejects)


def _finished(out: Path, task: VideoTask, preview: Path | None) -> bool:
    """Whether the video's file (and its preview, when asked for) is already there."""
    return (out / task.relpath).is_file() and (preview is None or (preview / f"{task.sequence_id}.gif").is_file())


def _answers(
    todo: list[VideoTask], opts: ExtractOptions, preview: bool, jobs: int, scheduler: str | None
) -> Iterator[dict[str, Any]]:
    """Each task's answer, in order, from local worker processes or a Dask cluster."""
    calls = (delayed(extract_one)(t, opts, preview) for t in todo)
    if scheduler is None:
        yield from Parallel(n_jobs=worker_count(jobs), batch_size=1, return_as="generator")(calls)
        return
    with _dask_client(scheduler, jobs), parallel_config(backend="dask"):
        yield from Parallel(n_jobs=-1, batch_size=1, return_as="generator")(calls)


@contextlib.contextmanager
def _dask_client(scheduler: str, jobs: int) -> Iterator[Any]:
    """A Dask client of the scheduler at `scheduler`, or of a cluster of `jobs` processes started here ("local")."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise ExtractError(f"--scheduler needs dask.distributed ({exc}); install the video extra") from None
    if scheduler == "local":
        with (
            LocalCluster(
                n_workers=worker_count(jobs), threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(scheduler, timeout=30)
    except OSError as exc:
        raise ExtractError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({exc})") from None
    with client:
        yield client


def _label_map(tasks: list[VideoTask], path: str | Path | None) -> dict[str, int] | None:
    """The label map to write: the file given, else the sorted signs of the videos; None when no sign is known."""
    if path is not None:
        try:
            signs = json.loads(_text(Path(path), "label map"))
        except json.JSONDecodeError as exc:
            raise ExtractError(f"{path}: not JSON ({exc})") from None
        if not isinstance(signs, dict) or not all(isinstance(v, int) for v in signs.values()):
            raise ExtractError(f"{path}: not a label map (a JSON object of sign -> index)")
        return signs
    known = sorted({t.sign for t in tasks if t.sign})
    return {s: i for i, s in enumerate(known)} if known else None


def _claim(out: Path, opts: ExtractOptions, force: bool) -> None:
    """Record the options in OUT/extract.json; ExtractError when OUT holds files made with other options."""
    config = {"options": opts.as_dict(), "mediapipe": mediapipe_version()}
    path = out / CONFIG
    if path.is_file() and not force:
        old = json.loads(path.read_text())
        if old != config:
            raise ExtractError(
                f"{out}: extracted with other options or another mediapipe ({clip(json.dumps(old), 200)}); "
                "use another --out, or --force to extract every video again"
            )
        return
    write_json_atomic(path, config)


def _write_index(out: Path, rows: list[VideoTask], rejects: list[dict], signs: dict[str, int] | None) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for t in rows:
        writer.writerow([t.relpath, t.participant_id, t.sequence_id, t.sign, t.source])
    write_atomic(out / TRAIN_CSV, buf.getvalue().encode())
    if signs is not None:
        write_json_atomic(out / LABEL_MAP, signs)
    write_atomic(out / REJECTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects).encode())


def rejects_summary(rejects: list[dict[str, str]], limit: int = 10) -> list[str]:
    """One line per reject (the first `limit`), for a command line."""
    lines = [f"rejected {clip(r['source'], 200)}: {r['reason']}" for r in rejects[:limit]]
    if len(rejects) > limit:
        lines.append(f"... {len(rejects) - limit} more in {REJECTS}")
    return lines


def extract_options(
    fps: float | None = None,
    start: float = 0.0,
    end: float | None = None,
    max_frames: int | None = None,
    max_seconds: float | None = None,
    mirror: bool = False,
    model_complexity: int = 1,
    min_detection_confidence: float = 0.5,
    min_tracking_confidence: float = 0.5,
) -> ExtractOptions:
    """ExtractOptions from the command line's flat options."""
    return ExtractOptions(
        VideoOptions(fps, start, end, max_frames, max_seconds, mirror),
        HolisticOptions(model_complexity, min_detection_confidence, min_tracking_confidence),
    )
