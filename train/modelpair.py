"""An exported model and its metadata JSON on disk, written as one pair: a kill leaves the old pair or the new one.

The metadata is named after the model file (`model.onnx` -> `model.onnx.json`), so that a `.onnx` and a
`.tflite` exported into one folder keep one each; `model.json`, the name before, is still read (`sidecar_of`).
Two files cannot be renamed at once, so the metadata's rename is the commit point. Both files are first
written in full with the atomic writer under pending names beside their own (`model.onnx.pending`,
`model.onnx.json.pending`); then the metadata, which holds the model's sha256, is renamed into place; then
the model. A kill before the metadata's rename leaves the old pair, and the next write removes the pending
files. A kill between the renames leaves the new metadata, the old model and the new model still pending,
whose sha256 the metadata names: the next write (`settle_pair`, under the pair's lock) completes the rename.
In that window a reader that checks the metadata's sha256 against the model sees a mismatch, never a pair
that looks valid and is not, and the model file itself is always a whole one that carries its own label map.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.errors import AslError
from pipeline.files import locked, write_atomic
from pipeline.read import InputFileError, read_file

MAX_SIDECAR_BYTES = 16 << 20  # the metadata of a 5-member ensemble is about 30 KB

PENDING = ".pending"  # suffix of a file written in full but not yet renamed into place


class ModelWriteError(AslError, OSError):
    """The model or its metadata could not be written; the message names the file and the reason."""


def metadata_path(model: str | Path) -> Path:
    """Where a model's metadata JSON goes: beside it, named after it (`model.onnx` -> `model.onnx.json`)."""
    model = Path(model)
    return model.with_name(model.name + ".json")


def legacy_metadata_path(model: str | Path) -> Path:
    """Where the metadata of a file exported before went: .json for its suffix (`model.onnx` -> `model.json`)."""
    return Path(model).with_suffix(".json")


def sidecar_of(model: str | Path, data: bytes) -> dict[str, Any] | None:
    """The metadata JSON beside a model whose contents are `data` (`model.onnx.json`, else the `model.json` of a
    file exported before), or None: none there, not JSON, or written for another file (name or sha256)."""
    model = Path(model)
    for path in (metadata_path(model), legacy_metadata_path(model)):
        try:
            sidecar = json.loads(read_file(path, MAX_SIDECAR_BYTES))
        except (InputFileError, ValueError, RecursionError):
            continue
        if (
            isinstance(sidecar, dict)
            and sidecar.get("model") == model.name
            and sidecar.get("sha256") == sha256_of(data)
        ):
            return sidecar
    return None


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_model_pair(model: str | Path, data: bytes, metadata: dict[str, Any]) -> Path:
    """Write `data` at `model` and `metadata` (plus the file's name and sha256) beside it, as one pair.

    Returns the metadata's path. Holds `<model>.lock` while writing, so two exports to one path take turns.
    """
    model = Path(model)
    meta = metadata_path(model)
    sidecar = {"model": model.name, "sha256": sha256_of(data), **metadata}
    try:
        model.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelWriteError(f"{model.parent}: cannot make the directory ({exc.strerror or exc})") from None
    with locked(model.with_name(model.name + ".lock")):
        settle_pair(model)
        pending_model, pending_meta = _pending(model), _pending(meta)
        try:
            _write_whole(pending_model, data, model)
            _write_whole(pending_meta, (json.dumps(sidecar, indent=2) + "\n").encode(), meta)
        except BaseException:
            pending_model.unlink(missing_ok=True)
            pending_meta.unlink(missing_ok=True)
            raise
        os.replace(pending_meta, meta)  # the commit point: from here on, the new pair is the one
        _sync_directory(model.parent)
        os.replace(pending_model, model)
        _sync_directory(model.parent)
    return meta


def settle_pair(model: str | Path) -> str:
    """Finish or undo an interrupted `write_model_pair`: "completed", "discarded" or "clean" (nothing pending).

    A pending model whose sha256 the metadata in place names was committed and is renamed into place;
    any other pending file is left from before the commit point and is removed. Callers hold the pair's lock.
    """
    model = Path(model)
    meta = metadata_path(model)
    pending_model = _pending(model)
    # The pending files and the atomic writer's temporary files of a killed write, none committed but one:
    leftovers = [
        p for name in (pending_model.name, _pending(meta).name) for p in model.parent.glob(glob.escape(name) + "*")
    ]
    if not leftovers:
        return "clean"
    committed = pending_model.is_file() and _committed_sha(meta) == sha256_of(pending_model.read_bytes())
    for path in leftovers:
        if not (committed and path == pending_model):
            path.unlink(missing_ok=True)
    if committed:
        os.replace(pending_model, model)
        _sync_directory(model.parent)
        return "completed"
    return "discarded"


def _committed_sha(meta: Path) -> str | None:
    """The sha256 the metadata in place names, or None when there is none to read."""
    try:
        value = json.loads(meta.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _pending(path: Path) -> Path:
    return path.with_name(path.name + PENDING)


def _write_whole(path: Path, data: bytes, final: Path) -> None:
    """Write `path` with the atomic writer; an OSError (a full disk, a quota) becomes one line naming `final`."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise ModelWriteError(
            f"{final}: cannot write ({exc.strerror or exc}); the previous {final.name}, if any, is unchanged"
        ) from None


def _sync_directory(path: Path) -> None:
    """Make the renames in `path` durable (best effort: not every filesystem lets a directory be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
