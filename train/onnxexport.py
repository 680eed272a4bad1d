"""The ONNX writer: a checkpoint (several: an ensemble) as one `.onnx` file taking the raw landmarks of one sequence.

Contract of the file:

- input `inputs`: float32 `(T, 543, 3)`, NaN for undetected points, any `T >= 1`;
- output `outputs`: float32 `(n_signs,)` logits; for an ensemble of several checkpoints (one file holding
  every member), the log of the members' mean probability, so that a softmax gives the mean;
- `metadata_props` hold the label map (`label_map`, JSON `{sign: index}`) and how the file was made (for an
  ensemble, `members`); the same, with the file's sha256, is written beside it as JSON (`model.onnx` ->
  `model.onnx.json`), the two as one pair (`train.modelpair`).

onnx, onnxscript and onnxruntime come with the `export` extra and are imported only when needed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train import exportgraph
from train.checkedexport import checked_export


def export_onnx(
    checkpoint: exportgraph.Checkpoints,
    out: str | Path,
    opset: int | None = None,
    use_ema: bool = True,
    check_files: Sequence[str | Path] = (),
) -> exportgraph.ExportResult:
    """Write `out` (.onnx) and its metadata JSON from a checkpoint (several: an ensemble), after a parity check.

    The check runs the serialized model with onnxruntime on built-in sequences (demo signing of several
    lengths and the edge cases: T = 1, 2, past 384, a hand or the face missing throughout) and on
    `check_files`; nothing is written when it fails.
    """
    for module in ("onnxscript", "onnx", "onnxruntime"):  # fail before any work when the extra is missing
        exportgraph.require(module)

    def serialize(source: exportgraph.ExportSource) -> tuple[bytes, dict[str, Any]]:
        module = exportgraph.LandmarkClassifier(source.model, fast_convs=True).eval()
        data, opset_used = onnx_bytes(module, source.metadata, opset)
        return data, {"opset": opset_used}

    return checked_export(serialize, "onnxruntime", checkpoint, out, use_ema, check_files)


def onnx_bytes(module: nn.Module, metadata: dict[str, Any], opset: int | None = None) -> tuple[bytes, int]:
    """The serialized ONNX model of `module` with `metadata` in metadata_props, and its opset.

    `torch.export` with a dynamic frame axis first, so that any specialization on the length fails
    here instead of freezing the graph to the example's length; then the torch.export-based ONNX exporter.
    """
    program = exportgraph.dynamic_program(module)
    with exportgraph.quiet_exporter():
        onnx_program = torch.onnx.export(
            program,
            (),
            input_names=[exportgraph.INPUT_NAME],
            output_names=[exportgraph.OUTPUT_NAME],
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    proto = onnx_program.model_proto
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = exportgraph.FRAMES_AXIS
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    opset_used = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return proto.SerializeToString(), opset_used
