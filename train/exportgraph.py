"""What the ONNX and the LiteRT writers share: the module they export, its source, its program and the parity check.

The exported module (`LandmarkClassifier`) holds the whole route after the reader, from the same code the
pipeline and the trainer run: `pipeline.features.compact_features` (landmark selection, normalization with
NaN-aware statistics over the whole sequence, truncation at 384, dx/dx2, NaN -> 0) applied to a torch tensor,
then the network. Both writers trace it with `torch.export` and a dynamic frame axis (`dynamic_program`), and
both check the written bytes against PyTorch on the built-in sequences and the `--check` files
(`parity_rows`) before anything is written. `train.onnxexport` and `train.tflite` import this module; neither
imports the other, and `train.export` chooses between them.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import AslError
from pipeline.features import FEATURES_VERSION, compact_features
from pipeline.landmarks import N_RAW, TYPE_OFFSETS, TYPE_SIZES
from pipeline.read import read_landmarks
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.ensemble import EnsembleModel, shared_label_map
from train.model import SignModel

INPUT_NAME = "inputs"
OUTPUT_NAME = "outputs"
FRAMES_AXIS = "frames"  # name of the dynamic first axis of `inputs` in the ONNX file
PROB_TOLERANCE = 1e-4  # largest difference of probabilities the parity check accepts
Checkpoints = str | Path | Sequence[str | Path]  # one checkpoint, or the members of an ensemble


class ExportError(AslError, RuntimeError):
    """The model could not be exported, or the exported file disagrees with the PyTorch model."""


class LandmarkClassifier(nn.Module):
    """Raw landmarks of one sequence (T, 543, 3), NaN where missing -> logits (n_signs,).

    The pipeline's `compact_features` on the tensor, then the network on the real frames (no padding).
    With `fast_convs`, the network's Conv1d layers run as the equivalent Conv2d (`Conv1dAs2d`).
    """

    def __init__(self, model: SignModel | EnsembleModel, fast_convs: bool = False) -> None:
        super().__init__()
        self.model = with_conv2d(model) if fast_convs else model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x, _ = compact_features(inputs, self.model.cfg.max_len)  # (L, 118, 6), L = min(T, 384)
        mask = torch.ones(x.shape[:1], dtype=torch.bool, device=x.device)  # (L,) every frame is real
        return self.model(x[None], mask[None])[0]  # (n_signs,)


class Conv1dAs2d(nn.Module):
    """A Conv1d computed as a Conv2d over a (B, C, 1, T) view, with the same weights.

    The same arithmetic; it exists because onnxruntime's CPU kernels for a 1-D depthwise convolution are
    several times slower than its 2-D ones (about 106 against 15 us for 384 channels, kernel 17, 20 frames).
    """

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"only zero padding given as a number is supported, not {conv}")
        self.weight = conv.weight  # (C_out, C_in / groups, K), shared: no copy
        self.bias = conv.bias
        self.stride, self.padding, self.dilation = (1, *conv.stride), (0, *conv.padding), (1, *conv.dilation)
        self.groups = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(
            x.unsqueeze(-2), self.weight.unsqueeze(-2), self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        return y.squeeze(-2)  # (B, C_out, T')


def with_conv2d(model: nn.Module) -> nn.Module:
    """A copy of `model` whose Conv1d layers are `Conv1dAs2d` sharing their weights."""
    model = copy.copy(model)  # shallow: parameters are shared, the module tree below is replaced
    model._modules = {
        name: Conv1dAs2d(m) if isinstance(m, nn.Conv1d) else with_conv2d(m) for name, m in model._modules.items()
    }
    return model


@dataclass
class ParityRow:
    """One sequence of the parity check: the exported file's runtime against PyTorch on the pipeline's features."""

    name: str
    frames: int
    top1_torch: str
    top1_export: str
    max_prob_diff: float

    @property
    def ok(self) -> bool:
        return self.top1_torch == self.top1_export and self.max_prob_diff <= PROB_TOLERANCE


@dataclass
class ExportResult:
    path: Path
    metadata_path: Path
    size: int  # bytes of the exported file
    opset: int | None  # ONNX only
    weights: str  # "ema" or "model" (an ensemble: each member's, e.g. "ema+model" when they differ)
    parity: list[ParityRow] = field(default_factory=list)
    members: int = 1


@dataclass
class ExportSource:
    """What an export turns into a file: one model or an ensemble, its label map and the metadata to store."""

    model: SignModel | EnsembleModel
    label_map: dict[str, int]
    metadata: dict[str, Any]
    weights: str
    members: int


def require(module: str, extra: str = "export") -> Any:
    """Import one of an extra's packages, or fail with the command that installs that extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        hint = f"pip install -e '.[{extra}]'"
        raise ExportError(f"{module} is not installed; it comes with the {extra} extra: {hint}") from None


def check_sequences(check_files: Sequence[str | Path]) -> list[tuple[str, np.ndarray]]:
    """The parity check's sequences: the `--check` files (read first, so that a bad one fails before any work),
    then the built-in ones."""
    return [(str(p), read_landmarks(p)) for p in check_files] + list(builtin_sequences())


def export_source(checkpoint: Checkpoints, use_ema: bool = True) -> ExportSource:
    """The model to export: one checkpoint's, or an `EnsembleModel` of several sharing one label map and max_len.

    Every checkpoint is loaded and checked before any model is built; a mismatch is one line naming two files.
    """
    paths = [checkpoint] if isinstance(checkpoint, str | Path) else list(checkpoint)
    if not paths:
        raise ExportError("nothing to export: give at least one checkpoint")
    ckpts = [load_checkpoint(p) for p in paths]
    label_map = shared_label_map([(str(p), c["label_map"]) for p, c in zip(paths, ckpts, strict=True)])
    models = [model_from_checkpoint(c, use_ema=use_ema) for c in ckpts]
    weights = ["ema" if use_ema and c.get("ema") else "model" for c in ckpts]
    if len(paths) == 1:
        return ExportSource(models[0], label_map, export_metadata(ckpts[0], models[0], weights[0]), weights[0], 1)
    for p, m in zip(paths[1:], models[1:], strict=True):
        if m.cfg.max_len != models[0].cfg.max_len:  # one graph truncates every member's input alike
            raise ExportError(
                f"{paths[0]} and {p} truncate sequences at different lengths ({models[0].cfg.max_len} "
                f"and {m.cfg.max_len} frames); ensemble members must share max_len"
            )
    ensemble = EnsembleModel(models).eval()
    metadata = export_metadata(ckpts[0], models[0], weights[0])
    metadata["output"] = (
        f"{OUTPUT_NAME}: float32 ({len(label_map)},) log of the mean probability of "
        f"{len(models)} members (softmax gives the mean), indexed by label_map"
    )
    for key in ("preset", "weights", "step", "epoch"):  # per member, below
        del metadata[key]
    metadata["members"] = [
        {
            "checkpoint": str(p),
            "preset": c["config"].get("preset"),
            "weights": w,
            "step": c.get("step"),
            "epoch": c.get("epoch"),
        }
        for p, c, w in zip(paths, ckpts, weights, strict=True)
    ]
    return ExportSource(ensemble, label_map, metadata, "+".join(dict.fromkeys(weights)), len(models))


def export_metadata(ckpt: dict[str, Any], model: SignModel, weights: str) -> dict[str, Any]:
    """What an exported file says about itself: its contract, label map and the checkpoint it was made from."""
    label_map: dict[str, int] = ckpt["label_map"]
    return {
        "label_map": label_map,
        "input": f"{INPUT_NAME}: float32 ({FRAMES_AXIS}, {N_RAW}, 3) raw landmarks, NaN where undetected, "
        f"{FRAMES_AXIS} >= 1",
        "output": f"{OUTPUT_NAME}: float32 ({len(label_map)},) logits, indexed by label_map",
        "features_version": FEATURES_VERSION,
        "max_len": model.cfg.max_len,
        "preset": ckpt["config"].get("preset"),
        "weights": weights,
        "step": ckpt.get("step"),
        "epoch": ckpt.get("epoch"),
    }


def parity_failure(parity: Sequence[ParityRow], runtime: str = "onnxruntime") -> str:
    """The one-line error for a failed parity check, naming the worst sequence."""
    bad = [r for r in parity if not r.ok]
    worst = max(bad, key=lambda r: r.max_prob_diff)
    return (
        f"parity check failed on {len(bad)} of {len(parity)} sequences, e.g. {worst.name} ({worst.frames} "
        f"frames): top-1 {worst.top1_export!r} ({runtime}) vs {worst.top1_torch!r} (PyTorch), largest probability "
        f"difference {worst.max_prob_diff:.2e} (tolerance {PROB_TOLERANCE:g}); nothing was written"
    )


def dynamic_program(module: nn.Module) -> torch.export.ExportedProgram:
    """`module` through `torch.export` with a dynamic frame axis, which fails instead of specializing the length.

    torch.export proves the graph for T >= 2 (it never treats a size of 1 as general); T = 1 is in every
    parity check instead.
    """
    example = torch.from_numpy(next(s for _, s in builtin_sequences()))
    with quiet_exporter():
        dims = {INPUT_NAME: {0: torch.export.Dim.DYNAMIC}}
        program = torch.export.export(module, (example,), dynamic_shapes=dims)
    frames = next(iter(program.range_constraints.values()))
    if frames.lower > 2 or frames.upper < sys.maxsize:  # unbounded above: int_oo
        raise ExportError(f"the exported graph accepts only {frames.lower}..{frames.upper} frames, not any T >= 1")
    return program


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporters' progress lines, their notes on absent torchvision operators and torch's
    internal deprecation warnings: none of them is about this model, and real errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]  # the optimizer logs each rewrite
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(None), warnings.catch_warnings():  # "[torch.onnx] ..." goes to stdout
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ---------------------------------------------------------------------------- parity


def builtin_sequences() -> Iterator[tuple[str, np.ndarray]]:
    """(name, (T, 543, 3) float32) demo signing of several lengths and the edge cases of the preprocessing."""
    from pipeline.demo import generate_sequence

    def demo(index: int, frames: int) -> np.ndarray:
        return generate_sequence(0, index, index % 5, index % 3, frames)[1]

    for i, frames in enumerate((23, 57, 140, 384)):
        yield f"demo {frames} frames", demo(i, frames)
    yield "T = 1", demo(10, 1)
    yield "T = 2", demo(11, 2)
    yield "T = 450 (truncated at 384)", demo(12, 450)
    for hand in ("left_hand", "right_hand"):
        xyz = demo(13, 40)
        xyz[:, TYPE_OFFSETS[hand] : TYPE_OFFSETS[hand] + TYPE_SIZES[hand]] = np.nan
        yield f"{hand} missing in every frame", xyz
    xyz = demo(14, 30)
    xyz[:, : TYPE_SIZES["face"]] = np.nan  # the reference landmark too: origin 0.5
    yield "face missing in every frame", xyz


def torch_logits(model: SignModel | EnsembleModel, xyz: np.ndarray) -> np.ndarray:
    """(n_signs,) logits of the PyTorch model on the pipeline's numpy preprocessing of one sequence (an ensemble:
    the log of its members' mean probability)."""
    x, _ = compact_features(xyz, model.cfg.max_len)  # (L, 118, 6)
    with torch.no_grad():
        return model(torch.from_numpy(x)[None], torch.ones(1, len(x), dtype=torch.bool))[0].numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def parity_rows(
    run: Callable[[np.ndarray], np.ndarray],
    model: SignModel | EnsembleModel,
    label_map: dict[str, int],
    sequences: Sequence[tuple[str, np.ndarray]],
    runtime: str = "onnxruntime",
) -> list[ParityRow]:
    """Compare the exported file's probabilities with the PyTorch model's on every sequence.

    `run`: (T, 543, 3) -> logits, the file run by its runtime (named `runtime` in errors)."""
    names = {v: s for s, v in label_map.items()}
    rows = []
    for name, xyz in sequences:
        p_torch = softmax(torch_logits(model, xyz))
        try:
            p_file = softmax(run(xyz))
        except Exception as exc:  # the runtimes' own error classes share no useful base
            reason = getattr(exc, "reason", None) or str(exc).splitlines()[0][:300]  # a model file's: the runtime's
            raise ExportError(
                f"{runtime} cannot run the exported model on '{name}' ({len(xyz)} frames): {reason}; "
                "nothing was written"
            ) from None
        top1_torch, top1_file = names[int(p_torch.argmax())], names[int(p_file.argmax())]
        rows.append(ParityRow(name, len(xyz), top1_torch, top1_file, float(np.abs(p_torch - p_file).max())))
    return rows
