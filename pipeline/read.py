"""Read one Kaggle `asl-signs` landmark parquet file into a (T, 543, 3) float32 array.

The file is validated against the Kaggle layout; any deviation raises
`LandmarkFileError` naming the file and the problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.landmarks import N_RAW, TYPE_SIZES, TYPES

# Columns read from disk; `row_id` is required in the schema but never decoded.
READ_COLUMNS = ["frame", "type", "landmark_index", "x", "y", "z"]
_KINDS = {
    "frame": ("integer", pa.types.is_integer),
    "landmark_index": ("integer", pa.types.is_integer),
    "row_id": ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    "type": ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)),
    "x": ("floating-point", pa.types.is_floating),
    "y": ("floating-point", pa.types.is_floating),
    "z": ("floating-point", pa.types.is_floating),
}
_TYPE_CODES = np.repeat(np.arange(len(TYPES)), [TYPE_SIZES[t] for t in TYPES])  # (543,)
_INDEX_PATTERN = np.concatenate([np.arange(TYPE_SIZES[t]) for t in TYPES])  # (543,)


class LandmarkFileError(ValueError):
    """A landmark file that cannot be read or is not in the Kaggle layout."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def read_landmarks(path: str | Path) -> np.ndarray:
    """Landmarks of one sequence as (T, 543, 3) float32, frames in file order, NaN kept."""
    table = _read_table(path)
    n = table.num_rows
    if n == 0:
        raise LandmarkFileError(path, "no rows (zero frames)")
    if n % N_RAW:
        raise LandmarkFileError(path, f"{n} rows is not a multiple of {N_RAW} (rows per frame)")
    frames = n // N_RAW
    _check_types(path, table.column("type"), frames)
    index = table.column("landmark_index").to_numpy().reshape(frames, N_RAW)
    bad = np.flatnonzero((index != _INDEX_PATTERN).any(axis=1))
    if bad.size:
        raise LandmarkFileError(path, f"frame block {bad[0]}: landmark_index not 0..n-1 within each type")
    _check_frames(path, table.column("frame").to_numpy(), frames)
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, rejected below
        xyz = np.stack([table.column(c).to_numpy() for c in "xyz"], axis=-1).astype(np.float32)
    if np.isinf(xyz).any():
        raise LandmarkFileError(path, "infinite coordinate values")
    return xyz.reshape(frames, N_RAW, 3)


def _read_table(path: str | Path) -> pa.Table:
    """The needed columns, after checking the schema; unreadable files become LandmarkFileError."""
    try:
        try:
            pf = pq.ParquetFile(path, read_dictionary=["type"])
        except KeyError:  # raised when the dictionary column is absent; the schema check below names it
            pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        for name, (kind, ok) in _KINDS.items():
            if name not in schema.names:
                raise LandmarkFileError(path, f"missing column '{name}' (columns: {', '.join(schema.names)})")
            if not ok(schema.field(name).type):
                raise LandmarkFileError(path, f"column '{name}' is {schema.field(name).type}, expected {kind}")
        table = pf.read(columns=READ_COLUMNS)
        for name in ("frame", "type", "landmark_index"):
            if table.column(name).null_count:
                raise LandmarkFileError(path, f"null values in column '{name}'")
        return table
    except LandmarkFileError:
        raise
    except FileNotFoundError:
        raise LandmarkFileError(path, "file not found") from None
    except (OSError, pa.ArrowException) as exc:
        raise LandmarkFileError(path, f"not a readable parquet file ({exc})") from None


def _check_types(path: str | Path, column: pa.ChunkedArray, frames: int) -> None:
    """Every frame's rows must be face, left_hand, pose, right_hand in that order."""
    column = column.combine_chunks()
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    names = column.dictionary.to_pylist()
    unknown = sorted(set(names) - set(TYPES), key=str)
    if unknown:
        raise LandmarkFileError(path, f"unknown landmark type {unknown[0]!r} (expected {', '.join(TYPES)})")
    code_of = np.array([TYPES.index(name) for name in names], dtype=np.int64)
    codes = code_of[column.indices.to_numpy(zero_copy_only=False)].reshape(frames, N_RAW)
    bad = np.flatnonzero((codes != _TYPE_CODES).any(axis=1))
    if bad.size:
        raise LandmarkFileError(
            path, f"frame block {bad[0]}: rows not in the order face 0..467, left_hand, pose, right_hand"
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
