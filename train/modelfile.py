"""A model file (ONNX or LiteRT) opened by its runtime, its contract and label map checked whole before use.

The contract is the competition's: one input `(T, 543, 3)` float32 with T dynamic (raw landmarks, NaN where
undetected), one output with one value per sign. The label map comes from the file's metadata (`label_map`,
JSON `{sign: index}`, written by `asl-train export`, whose files also name their input `inputs` and their
output `outputs`) or, for a model made elsewhere, from a label map file (the competition's
`sign_to_prediction_index_map.json`). Anything else is one line naming the file and the field.

Runtimes are a table keyed by the file identifier a flatbuffer carries at byte 4 (`TFL3`: LiteRT), with a
default (ONNX, which has none), as webdataset's `gopen` keys its openers by URL scheme: a new runtime is one
opening function and one entry in `RUNTIMES`. A file is read through the pipeline's input gate (a FIFO or a
device is refused, never waited on), and each graph runs in a worker thread so that SIGTERM and Ctrl-C are
handled while the runtime computes (onnxruntime's run is then told to stop).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import AslError
from pipeline.landmarks import N_RAW
from pipeline.read import InputFileError, read_file
from pipeline.text import printable
from train.exportgraph import INPUT_NAME, OUTPUT_NAME, require, softmax
from train.modelpair import sidecar_of

MAX_MODEL_BYTES = 2**31 - 1  # protobuf's and flatbuffers' own limit: no single-file model is larger
MAX_LABEL_MAP_BYTES = 16 << 20  # the competition's map of 250 signs is 3 KB
MAX_SIGNS = 100_000
MAX_SIGN_CHARS = 200
STOP_WAIT_S = 30.0  # how long an interrupted run gets to end (onnxruntime stops at its next node)
SIGNATURE = "serving_default"  # the LiteRT signature the competition's contract names
DEFAULT = "default"  # the RUNTIMES entry for a file without a known identifier
_ONNX_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16"}
_JSON_KINDS = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


class ModelFileError(AslError, ValueError):
    """A model file or label map that cannot be used; the message names the file and the field."""


class ModelRunError(ModelFileError):
    """The runtime failed on one sequence; `reason` is its own first line."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Port:
    """One input or output of a graph: its name, shape (None: a dynamic size) and numpy dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    @property
    def shown(self) -> str:
        """The name as it may be printed (the file chose it)."""
        return printable(self.name, 80)

    def shape_text(self) -> str:
        return (
            "("
            + ", ".join("T" if d is None else str(d) for d in self.shape)
            + ("," if len(self.shape) == 1 else "")
            + ")"
        )


@dataclass
class Graph:
    """What a runtime makes of a file: its ports, its text metadata, and how to run and stop it."""

    runtime: str
    inputs: list[Port]
    outputs: list[Port]
    metadata: dict[str, str]
    run: Callable[[np.ndarray], np.ndarray]  # the one input -> the one output
    cancel: Callable[[], None]  # called from another thread: stop a `run` in progress, if the runtime can


# ---------------------------------------------------------------------------- runtimes


def open_onnx(data: bytes, name: str, threads: int | None) -> Graph:
    """An ONNX file run by onnxruntime (the export extra)."""
    ort = require("onnxruntime")
    try:
        session = onnx_session(data, threads or 0)
    except Exception as exc:  # onnxruntime's own classes (InvalidProtobuf, Fail, ...) share no base
        raise ModelFileError(f"{name}: not a model onnxruntime can load ({_first_line(exc)})") from None
    ports = [[_onnx_port(a) for a in args] for args in (session.get_inputs(), session.get_outputs())]
    live: list[Any] = []  # the RunOptions of the run in progress

    def run(x: np.ndarray) -> np.ndarray:
        options = ort.RunOptions()
        live[:] = [options]
        return session.run([ports[1][0].name], {ports[0][0].name: x}, options)[0]

    def cancel() -> None:
        for options in live:
            options.terminate = True  # the run stops at its next node, with an error

    metadata = dict(session.get_modelmeta().custom_metadata_map)
    return Graph("onnxruntime", ports[0], ports[1], metadata, run, cancel)


def onnx_session(model: bytes | str | Path, threads: int = 0) -> Any:
    """An onnxruntime CPU session (`threads` intra-op threads; 0: onnxruntime's default)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # fatal only: errors reach the caller as exceptions, said once
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _onnx_port(arg: Any) -> Port:
    """An onnxruntime NodeArg as a Port: a named or unknown dimension is dynamic."""
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape or ())
    return Port(arg.name, shape, _ONNX_TYPES.get(arg.type, arg.type))


def open_litert(data: bytes, name: str, threads: int | None) -> Graph:
    """A `.tflite` flatbuffer run by ai-edge-litert (the tflite extra), through its `serving_default` signature."""
    litert = require("ai_edge_litert.interpreter", "tflite")
    try:
        interpreter = litert.Interpreter(model_content=data, num_threads=threads)
        signatures = interpreter.get_signature_list()
        metadata = metadata_of(data)
    except Exception as exc:  # the interpreter's errors are plain ValueError/RuntimeError with long texts
        raise ModelFileError(f"{name}: not a model ai-edge-litert can load ({_first_line(exc)})") from None
    if SIGNATURE not in signatures:
        found = ", ".join(signatures) or "none"
        raise ModelFileError(f"{name}: signature: no '{SIGNATURE}' (it has: {printable(found)})")
    runner = interpreter.get_signature_runner(SIGNATURE)
    details = (runner.get_input_details(), runner.get_output_details())
    ports = [[_litert_port(k, v) for k, v in d.items()] for d in details]

    def run(x: np.ndarray) -> np.ndarray:
        return runner(**{ports[0][0].name: x})[ports[1][0].name]

    return Graph("ai-edge-litert", ports[0], ports[1], metadata, run, lambda: None)


def _litert_port(key: str, details: dict[str, Any]) -> Port:
    """A signature runner's input or output as a Port: -1 in its shape signature is dynamic."""
    shape = tuple(int(d) if d >= 0 else None for d in details.get("shape_signature", details["shape"]))
    return Port(key, shape, np.dtype(details["dtype"]).name)


def metadata_of(data: bytes) -> dict[str, str]:
    """The `metadata` entries of a `.tflite` flatbuffer whose buffers hold text (name -> text)."""
    schema = require("ai_edge_litert.schema_py_generated", "tflite")
    model = schema.Model.GetRootAs(data, 0)
    found = {}
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        raw = model.Buffers(entry.Buffer()).DataAsNumpy()
        if isinstance(raw, np.ndarray):  # an empty buffer reads as 0
            try:
                found[entry.Name().decode()] = raw.tobytes().decode()
            except UnicodeDecodeError:
                continue  # the converter's own binary entries (min_runtime_version is text, others may not be)
    return found


RUNTIMES: dict[bytes | str, Callable[[bytes, str, int | None], Graph]] = {b"TFL3": open_litert, DEFAULT: open_onnx}


def open_graph(data: bytes, name: str, threads: int | None = None) -> Graph:
    """The graph of a model file's bytes, opened by the runtime its identifier names (ONNX when none)."""
    return RUNTIMES.get(data[4:8], RUNTIMES[DEFAULT])(data, name, threads)


def _first_line(exc: BaseException) -> str:
    return printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 300)


# ---------------------------------------------------------------------------- label maps and the contract


def label_map_from(text: str | bytes, where: str) -> dict[str, int]:
    """A label map `{sign: index}` (indices 0..n-1, one per sign) from JSON text, its sign names made printable.

    `where` names the file and field in the one-line error (`m.onnx: label_map in its metadata`).
    """
    try:
        value = json.loads(text)
    except RecursionError:
        raise ModelFileError(f"{where}: nested too deeply to be a label map {{sign: index}}") from None
    except ValueError as exc:  # UnicodeDecodeError too
        raise ModelFileError(f"{where}: not JSON ({_first_line(exc)})") from None
    problem = label_map_problem(value)
    if problem:
        raise ModelFileError(f"{where}: {problem}")
    shown = {printable(sign, 10 * MAX_SIGN_CHARS): index for sign, index in value.items()}
    if len(shown) != len(value):
        raise ModelFileError(f"{where}: two sign names are the same once their control characters are escaped")
    return shown


def label_map_problem(value: Any) -> str | None:
    """What is wrong with a parsed label map, or None: an object of n signs with the indices 0..n-1."""
    if not isinstance(value, dict):
        return f"{_JSON_KINDS.get(type(value), 'null')}, not an object {{sign: index}}"
    if not value:
        return "no signs"
    if len(value) > MAX_SIGNS:
        return f"{len(value)} signs, over the limit of {MAX_SIGNS}"
    owner: dict[int, str] = {}
    for sign, index in value.items():
        if not sign or len(sign) > MAX_SIGN_CHARS:
            return f"a sign name of {len(sign)} characters (1 to {MAX_SIGN_CHARS})"
        if type(index) is not int:
            kind = "an object" if isinstance(index, dict) else _JSON_KINDS.get(type(index), "null")
            return f"the index of {printable(sign)!r} is {kind}, not an integer"
        if not 0 <= index < len(value):
            return f"the index {index} of {printable(sign)!r} is outside 0..{len(value) - 1} (one index per sign)"
        if index in owner:
            return f"the index {index} is given to {printable(owner[index])!r} and {printable(sign)!r}"
        owner[index] = sign
    return None


def read_label_map(path: str | Path) -> dict[str, int]:
    """A label map file (the competition's `sign_to_prediction_index_map.json`), through the input gate."""
    try:
        data = read_file(path, MAX_LABEL_MAP_BYTES)
    except InputFileError as exc:
        raise ModelFileError(f"{path}: cannot read the label map ({exc.reason})") from None
    return label_map_from(data, str(path))


def contract_problem(graph: Graph, signs: int, labels: str, ours: bool) -> str | None:
    """Which part of the contract `graph` breaks, or None; `labels` names where the label map of `signs` came
    from; `ours`: the file's metadata says `asl-train export` wrote it, so its ports carry our names too."""
    if len(graph.inputs) != 1:
        return f"inputs: {len(graph.inputs)} ({', '.join(p.shown for p in graph.inputs)}), not one (T, {N_RAW}, 3)"
    if len(graph.outputs) != 1:
        return f"outputs: {len(graph.outputs)} ({', '.join(p.shown for p in graph.outputs)}), not one of {signs} values"
    (inp,), (out,) = graph.inputs, graph.outputs
    if len(inp.shape) != 3 or inp.shape[1:] != (N_RAW, 3):
        return f"input '{inp.shown}': shape {inp.shape_text()}, not (T, {N_RAW}, 3)"
    if inp.shape[0] is not None:
        return f"input '{inp.shown}': a fixed length of {inp.shape[0]} frames, not a dynamic T"
    if inp.dtype != "float32":
        return f"input '{inp.shown}': {inp.dtype}, not float32"
    if [d for d in out.shape if d != 1] not in ([signs], [None]):
        return f"output '{out.shown}': shape {out.shape_text()}, not ({signs},) for the {signs} signs of {labels}"
    if ours and inp.name != INPUT_NAME:
        return f"input: named '{inp.shown}', not '{INPUT_NAME}' as the files of `asl-train export` name it"
    if ours and out.name != OUTPUT_NAME:
        return f"output: named '{out.shown}', not '{OUTPUT_NAME}' as the files of `asl-train export` name it"
    return None


# ---------------------------------------------------------------------------- the scorer


class ModelFile:
    """A model file ready to score: `logits(xyz)` for one (T, 543, 3) sequence, `probabilities` for several.

    `source`: a path (read through the input gate) or the file's bytes (`name` then names it in errors).
    `label_map`: a label map file, for a model without our metadata (with it, the two must agree).
    """

    def __init__(
        self,
        source: str | Path | bytes,
        label_map: str | Path | None = None,
        threads: int | None = None,
        name: str = "model",
    ) -> None:
        self.name = name if isinstance(source, bytes) else str(source)
        data = source if isinstance(source, bytes) else model_bytes(source)
        self.graph = open_graph(data, self.name, threads)
        self.runtime = self.graph.runtime
        self.metadata = self.graph.metadata
        if "label_map" not in self.metadata and not isinstance(source, bytes):
            sidecar = sidecar_of(source, data)  # metadata stripped from the file, still in the JSON beside it
            if sidecar is not None and "label_map" in sidecar:
                self.metadata = {**self.metadata, "label_map": json.dumps(sidecar["label_map"])}
        self.label_map, labels = self._label_map(label_map)
        problem = contract_problem(self.graph, len(self.label_map), labels, "label_map" in self.metadata)
        if problem:
            raise ModelFileError(f"{self.name}: not the contract of a sign model: {problem}")

    def _label_map(self, given: str | Path | None) -> tuple[dict[str, int], str]:
        """The label map and where it came from."""
        stored = self.metadata.get("label_map")
        own = label_map_from(stored, f"{self.name}: label_map in its metadata") if stored is not None else None
        if given is None:
            if own is None:
                raise ModelFileError(
                    f"{self.name}: no label_map in its metadata (not written by `asl-train export`); "
                    "give the competition's label map with --label-map FILE"
                )
            return own, "label_map in its metadata"
        from_file = read_label_map(given)
        if own is not None and own != from_file:
            raise ModelFileError(f"{self.name}: label_map in its metadata is not the one in {given}")
        return from_file, str(given)

    def logits(self, xyz: np.ndarray) -> np.ndarray:
        """(n_signs,) float32 outputs for one (T, 543, 3) sequence."""
        x = np.asarray(xyz, dtype=np.float32)
        try:
            out = np.asarray(run_stoppable(self.graph, x))
        except Exception as exc:  # the runtimes' own error classes share no useful base
            reason = _first_line(exc)
            raise ModelRunError(
                f"{self.name}: {self.runtime} cannot run it on a sequence of {len(x)} frames ({reason})", reason
            ) from None
        if out.size != len(self.label_map):
            raise ModelFileError(
                f"{self.name}: output '{self.graph.outputs[0].shown}': {out.size} values, "
                f"not one per sign of the label map ({len(self.label_map)})"
            )
        return out.reshape(-1)

    def probabilities(self, sequences: list[np.ndarray]) -> np.ndarray:
        """(T_i, 543, 3) raw landmarks of each sequence -> (N, n_signs) probabilities, one sequence at a time."""
        return np.stack([softmax(self.logits(xyz).astype(np.float64)) for xyz in sequences])


def model_bytes(path: str | Path) -> bytes:
    """A model file's contents, read through the input gate: a FIFO, a device or a directory is refused."""
    try:
        return read_file(path, MAX_MODEL_BYTES)
    except InputFileError as exc:
        raise ModelFileError(f"{path}: cannot read the model ({exc.reason})") from None


def run_stoppable(graph: Graph, x: np.ndarray) -> np.ndarray:
    """`graph.run(x)` in a worker thread, the main thread waiting: a signal's handler runs at once (SIGTERM ends
    the process; Ctrl-C raises here, after the run is told to stop and has stopped) instead of after the
    runtime's C call. The wait is on an event, not `Thread.join`, which an interrupt leaves unreliable."""
    result: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            result["out"] = graph.run(x)
        except BaseException as exc:  # handed to the waiting thread
            result["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name=f"{graph.runtime} run", daemon=True).start()
    try:
        while not done.wait(0.5):
            pass
    except BaseException:
        graph.cancel()
        done.wait(STOP_WAIT_S)  # a run still going at exit aborts the process in onnxruntime's destructors
        raise
    if "error" in result:
        raise result["error"]
    return result["out"]
