"""Read one Kaggle `asl-signs` landmark parquet file into a (T, 543, 3) float32 array.

The file is validated against the Kaggle layout; any deviation raises
`LandmarkFileError` naming the file and the problem. Every input file is read through
`read_file`, the one gate that refuses what is not a regular file or is too large.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import AslError
from pipeline.landmarks import N_RAW, ROW_INDEX, ROW_TYPES, TYPES

_KINDS = {
    "frame": ("integer", pa.types.is_integer),
    "landmark_index": ("integer", pa.types.is_integer),
    "row_id": ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    "type": ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)),
    "x": ("floating-point", pa.types.is_floating),
    "y": ("floating-point", pa.types.is_floating),
    "z": ("floating-point", pa.types.is_floating),
}


# Real landmark files are under 10 MB; the limit keeps a huge or endless input from exhausting memory.
MAX_FILE_MB = 64
MB = 1 << 20  # the unit of --max-file-mb
# The limit also bounds what a file decodes to, since a small file can declare a huge table: its rows
# at the 24 bytes of the Kaggle files' float64 x, y, z, and its needed columns uncompressed, each at most
# DECODED_FACTOR x the limit (real files: 0.9x and 1.0x their own size).
BYTES_PER_ROW = 24
DECODED_FACTOR = 2
_NEEDED = ("frame", "type", "landmark_index", "x", "y", "z")


class InputFileError(AslError, ValueError):
    """An input file that cannot be read, or is not a regular file of a bounded size; `reason` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class LandmarkFileError(InputFileError):
    """A landmark file that cannot be read or is not in the Kaggle layout."""


def file_problem(st: os.stat_result, max_bytes: int) -> str | None:
    """Why a file with this stat is refused as an input (not a regular file, or over `max_bytes`), or None."""
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({_file_kind(st.st_mode)})"
    if st.st_size > max_bytes:
        return f"file of {st.st_size / MB:.1f} MB is over the {max_bytes / MB:g} MB limit (--max-file-mb)"
    return None


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "a special file")


def read_file(path: str | Path, max_bytes: int = MAX_FILE_MB * MB) -> bytes:
    """The contents of a regular file of at most `max_bytes`; InputFileError naming the file otherwise.

    Opened without blocking (a FIFO would otherwise wait forever for a writer) and checked on the
    open descriptor, so what is read is what was checked; never reads more than `max_bytes`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputFileError(path, "file not found") from None
    except OSError as exc:
        raise InputFileError(path, f"cannot open ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        problem = file_problem(st, max_bytes)
        if problem:
            raise InputFileError(path, problem)
        data = _read_upto(fd, st.st_size + 1)  # one byte more than stat said tells a file still growing
    except OSError as exc:
        raise InputFileError(path, f"cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > st.st_size:
        raise InputFileError(path, "file grew while being read")
    return data


def _read_upto(fd: int, limit: int) -> bytes:
    """At most `limit` bytes, up to end of file (a single read may return less on some file systems)."""
    chunks, n = [], 0
    while n < limit and (chunk := os.read(fd, limit - n)):
        chunks.append(chunk)
        n += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_landmarks(path: str | Path, coords: str = "xyz", max_bytes: int = MAX_FILE_MB * MB) -> np.ndarray:
    """Landmarks of one sequence as (T, 543, len(coords)) float32, frames in file order, NaN kept.

    `coords="xy"` skips decoding z (the features never use it); inf in z is still rejected,
    from the column statistics when the file has them. float16 and float32 coordinates are
    read exactly (both widen to float32 without loss).
    """
    if not coords or not set(coords) <= set("xyz"):
        raise ValueError(f"coords must be letters of 'xyz', got {coords!r}")
    try:
        return _landmarks(path, coords, max_bytes)
    except pa.ArrowException as exc:  # pyarrow's answer to data the checks above did not foresee
        raise LandmarkFileError(path, f"not a readable landmark file ({clip(str(exc), 200)})") from None


def _landmarks(path: str | Path, coords: str, max_bytes: int) -> np.ndarray:
    pf, table = _read_table(path, coords, max_bytes)
    n = table.num_rows
    if n == 0:
        raise LandmarkFileError(path, "no rows (zero frames)")
    if n % N_RAW:
        raise LandmarkFileError(path, f"{n} rows is not a multiple of {N_RAW} (rows per frame)")
    frames = n // N_RAW
    _check_types(path, table.column("type"), frames)
    index = table.column("landmark_index").to_numpy().reshape(frames, N_RAW)
    if not (index == ROW_INDEX).all():
        bad = np.flatnonzero((index != ROW_INDEX).any(axis=1))[0]
        raise LandmarkFileError(path, f"frame block {bad}: landmark_index not 0..n-1 within each type")
    _check_frames(path, table.column("frame").to_numpy(), frames)
    out = np.empty((n, len(coords)), dtype=np.float32)
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, rejected below
        for i, c in enumerate(coords):
            out[:, i] = table.column(c).to_numpy()
    if np.isinf(out).any() or _unread_overflow(pf, sorted(set("xyz") - set(coords))):
        raise LandmarkFileError(path, "infinite coordinate values")
    return out.reshape(frames, N_RAW, len(coords))


def _unread_overflow(pf: pq.ParquetFile, columns: list[str]) -> bool:
    """Whether the columns not decoded hold a value that is inf as float32 (inf, or finite beyond float32's range).

    Decided from the min/max statistics when present, else by reading the column: a file is
    rejected for the same values whichever coordinates are decoded.
    """
    names = pf.schema_arrow.names
    for name in columns:
        for g in range(pf.metadata.num_row_groups):
            stats = pf.metadata.row_group(g).column(names.index(name)).statistics
            # float16 statistics come back as raw bytes: read the column then, as without statistics
            if stats is None or not stats.has_min_max or not isinstance(stats.min, (int, float)):
                return _inf_as_float32(pf.read(columns=[name], use_threads=False).column(0).to_numpy())
            if _inf_as_float32(np.array([stats.min, stats.max], dtype=np.float64)):
                return True
    return False


def _inf_as_float32(values: np.ndarray) -> bool:
    """Whether any value is inf after the cast to float32, as in the decoded array (NaN is not)."""
    with np.errstate(over="ignore"):
        return bool(np.isinf(values.astype(np.float32)).any())


def _read_table(path: str | Path, coords: str, max_bytes: int) -> tuple[pq.ParquetFile, pa.Table]:
    """The needed columns, after checking the schema; unreadable files become LandmarkFileError."""
    # One read of the whole file, then decoding in this thread: cheaper than pyarrow's own
    # file access and thread pool when many reader processes share the cores.
    try:
        buffer = pa.BufferReader(read_file(path, max_bytes))
    except InputFileError as exc:
        raise LandmarkFileError(path, exc.reason) from None
    try:
        try:
            pf = pq.ParquetFile(buffer, read_dictionary=["type"])
        except KeyError:  # raised when the dictionary column is absent; the schema check below names it
            pf = pq.ParquetFile(buffer)
        schema = pf.schema_arrow
        for name, (kind, ok) in _KINDS.items():
            if name not in schema.names:
                raise LandmarkFileError(path, f"missing column '{name}' (columns: {clip(', '.join(schema.names))})")
            if schema.names.count(name) > 1:
                raise LandmarkFileError(path, f"column '{name}' appears more than once")
            kind_found = schema.field(name).type
            if not ok(kind_found):
                raise LandmarkFileError(path, f"column '{name}' is {clip(str(kind_found))}, expected {kind}")
        problem = _decoded_size_problem(pf.metadata, max_bytes)
        if problem:
            raise LandmarkFileError(path, problem)
        table = pf.read(columns=["frame", "type", "landmark_index", *coords], use_threads=False)
        for name in ("frame", "type", "landmark_index"):
            if table.column(name).null_count:
                raise LandmarkFileError(path, f"null values in column '{name}'")
        return pf, table
    except LandmarkFileError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:  # ValueError: e.g. undecodable names in the metadata
        raise LandmarkFileError(path, f"not a readable parquet file ({clip(str(exc), 200)})") from None


def _decoded_size_problem(metadata: pq.FileMetaData, max_bytes: int) -> str | None:
    """Why the file, small as it is, would decode to more than `max_bytes` allows (from its metadata), or None."""
    rows, bound = metadata.num_rows, DECODED_FACTOR * max_bytes
    if rows * BYTES_PER_ROW > bound:
        return (
            f"{rows} rows ({rows // N_RAW} frames) decode to more than the {max_bytes / MB:g} MB limit allows "
            f"(--max-file-mb; at most {bound // BYTES_PER_ROW // N_RAW} frames)"
        )
    chunks = (
        group.column(i)
        for group in map(metadata.row_group, range(metadata.num_row_groups))
        for i in range(group.num_columns)
    )
    unpacked = sum(c.total_uncompressed_size for c in chunks if c.path_in_schema in _NEEDED)
    if unpacked > bound:
        return (
            f"columns decompress to {unpacked / MB:.1f} MB, more than the {max_bytes / MB:g} MB limit allows "
            f"(--max-file-mb; at most {DECODED_FACTOR}x)"
        )
    return None


def _check_types(path: str | Path, column: pa.ChunkedArray, frames: int) -> None:
    """Every frame's rows must be face, left_hand, pose, right_hand in that order."""
    column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    names = column.dictionary.to_pylist()
    unknown = sorted(set(names) - set(TYPES), key=str)
    if unknown:
        raise LandmarkFileError(path, f"unknown landmark type {quote(unknown[0])} (expected {', '.join(TYPES)})")
    codes = column.indices.to_numpy(zero_copy_only=False).reshape(frames, N_RAW)
    if names != list(TYPES):  # dictionary in another order: translate to our codes
        codes = np.array([TYPES.index(name) for name in names])[codes]
    if not (codes == ROW_TYPES).all():
        bad = np.flatnonzero((codes != ROW_TYPES).any(axis=1))[0]
        raise LandmarkFileError(
            path, f"frame block {bad}: rows not in the order face 0..467, left_hand, pose, right_hand"
        )


def _check_frames(path: str | Path, frame: np.ndarray, frames: int) -> None:
    """One frame number per 543-row block, strictly increasing (gaps allowed)."""
    blocks = frame.reshape(frames, N_RAW)
    mixed = np.flatnonzero((blocks != blocks[:, :1]).any(axis=1))
    if mixed.size:
        raise LandmarkFileError(path, f"frame block {mixed[0]}: mixed frame numbers inside one {N_RAW}-row block")
    first = blocks[:, 0].astype(np.int64)
    if frames > 1 and (np.diff(first) <= 0).any():
        raise LandmarkFileError(path, "frame numbers are not strictly increasing")


def clip(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters: a reason quoting an input's content stays one short line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quote(value: object, limit: int = 80) -> str:
    """`repr(value)`, clipped."""
    return clip(repr(value), limit)
