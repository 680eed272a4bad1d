"""`asl-train export`: the format that `--out` names, checked before any work, then its writer.

`train.onnxexport` writes ONNX, `train.tflite` LiteRT; what they share is `train.exportgraph`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from train.exportgraph import Checkpoints, ExportError, ExportResult

FORMATS = {".onnx": "onnx", ".tflite": "tflite"}  # suffix -> format of `asl-train export --out`


def export_model(
    checkpoint: Checkpoints,
    out: str | Path,
    fmt: str | None = None,
    opset: int | None = None,
    use_ema: bool = True,
    check_files: Sequence[str | Path] = (),
) -> ExportResult:
    """Export in the format `out`'s suffix names (.onnx, .tflite; `train.tflite` for LiteRT); several checkpoints
    make one ensemble file. The format and the output directory are checked before any work."""
    fmt = export_format(out, fmt)
    if fmt == "tflite" and opset is not None:
        raise ExportError("--opset applies to ONNX only, not to a .tflite export")
    check_writable(out)
    if fmt == "tflite":
        from train.tflite import export_tflite  # TensorFlow's writer: imported only for a .tflite

        return export_tflite(checkpoint, out, use_ema=use_ema, check_files=check_files)
    from train.onnxexport import export_onnx

    return export_onnx(checkpoint, out, opset=opset, use_ema=use_ema, check_files=check_files)


def export_format(out: str | Path, fmt: str | None = None) -> str:
    """The format that `out`'s suffix names; `fmt`, when given, must be the same one.

    The suffix is required even with `fmt`: any other name (`m.json`, `best.pt`) could be a file that is not a
    model, and `m.json` would be the model's own metadata.
    """
    if fmt is not None and fmt not in FORMATS.values():
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS.values())}")
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise ExportError(
            f"{out}: not a model file name ({suffix or 'no suffix'}); name it {' or '.join('*' + s for s in FORMATS)}"
        )
    if fmt is not None and FORMATS[suffix] != fmt:
        raise ExportError(f"{out}: the suffix {suffix} names the {FORMATS[suffix]} format, not --format {fmt}")
    return FORMATS[suffix]


def check_writable(out: str | Path) -> None:
    """Fail now, in one line, when `out` cannot be written: a file is tried in its nearest existing directory."""
    out = Path(out)
    base = out.absolute().parent
    while not base.exists():  # the missing directories are made only when the file is written
        base = base.parent
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:  # NotADirectoryError when a file stands where a directory should be
        raise ExportError(f"{out}: cannot write the output ({exc.strerror or exc})") from None
