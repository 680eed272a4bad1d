"""The checked export both writers share: serialize, open the bytes as `predict --model` will, compare with
PyTorch, then write the model and its metadata as one pair. A writer brings only its serializer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from train.exportgraph import (
    Checkpoints,
    ExportError,
    ExportResult,
    ExportSource,
    check_sequences,
    export_source,
    parity_failure,
    parity_rows,
)
from train.modelfile import ModelFile
from train.modelpair import write_model_pair

# source -> (file bytes, metadata of this format to put first in the JSON: {"opset": 18} or {"format": "tflite"})
Serializer = Callable[[ExportSource], tuple[bytes, dict[str, Any]]]


def checked_export(
    serialize: Serializer,
    runtime: str,
    checkpoint: Checkpoints,
    out: str | Path,
    use_ema: bool = True,
    check_files: Sequence[str | Path] = (),
) -> ExportResult:
    """Write `out` and its metadata JSON from a checkpoint (several: an ensemble) when `runtime`, running the
    serialized file on the built-in sequences and on `check_files`, agrees with PyTorch; nothing otherwise."""
    out = Path(out)
    checks = check_sequences(check_files)
    source = export_source(checkpoint, use_ema)
    data, format_metadata = serialize(source)
    written = ModelFile(data, name=str(out))  # as `predict --model` will open it: metadata and contract checked
    parity = parity_rows(written.logits, source.model, source.label_map, checks, runtime=runtime)
    if any(not r.ok for r in parity):
        raise ExportError(parity_failure(parity, runtime))
    meta_path = write_model_pair(out, data, {**format_metadata, **source.metadata})
    opset = format_metadata.get("opset")
    return ExportResult(out, meta_path, len(data), opset, source.weights, parity, source.members)
