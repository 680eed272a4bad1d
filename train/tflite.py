"""LiteRT (TFLite) export: the graph `asl-train export` puts in an ONNX file, as one `.tflite` file.

Converter. The exported module (`train.exportgraph.LandmarkClassifier`: the pipeline's preprocessing, then the
network) goes through `torch.export` with a dynamic frame axis and torch's core-ATen decompositions; each
ATen node of that program is then lowered to the TensorFlow op that computes the same thing (`AtenToTF`, a
`torch.fx.Interpreter` over the registry `LOWERINGS`: one decorated function per ATen op),
inside a `tf.function` whose input is `TensorSpec([None, 543, 3])`, and TensorFlow's own
`TFLiteConverter` writes the file with builtin ops only. Nothing about the model is written twice: a
change to the model or the preprocessing reaches the file through `torch.export`, and an ATen op without a
lowering fails the export by name. The converters tried first could not keep the length dynamic:

- `onnx2tf` 1.28 on the exported ONNX file: `Cannot reshape a tensor with 2 elements to shape [1]` at the
  truncation's `Min` of the frame count (it reads the `(T, 543, 3)` input as channels-first); with the
  input kept as it is (`-kat inputs`), `tf.ones` on a dynamic length cannot be called on a Keras
  symbolic tensor, and past that, an `UnboundLocalError` inside its `Div` lowering;
- `litert-torch` 0.10 (alias `ai-edge-torch`): the errors docs/deploy.md records (How the LiteRT file is made).

Rewrites, both forced by LiteRT's builtin op set and both covered by the parity check:

- float64 does not exist in builtin LiteRT kernels, so the sequence statistics (origin, scale) are computed
  in float32 here (float64 in the pipeline and the ONNX file); the probabilities still agree to 1e-4;
- int64 index arithmetic runs in int32 (frame counts are far below 2**31).

Contract of the file: signature `serving_default`, input `inputs` float32 `(T, 543, 3)` with T dynamic (any
T >= 1; past `max_len` truncated inside, statistics over the whole sequence), NaN where undetected; output
`outputs` float32 `(n_signs,)` logits. The same metadata as the ONNX file (`label_map`, how it was made) is
in the flatbuffer's `metadata` entries and in the JSON beside it. tensorflow-cpu converts and ai-edge-litert
runs the file; both come with the `tflite` extra and are imported only when needed.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.landmarks import N_RAW
from train.checkedexport import checked_export
from train.exportgraph import (
    INPUT_NAME,
    OUTPUT_NAME,
    Checkpoints,
    ExportError,
    ExportResult,
    ExportSource,
    LandmarkClassifier,
    dynamic_program,
    quiet_exporter,
    require,
)

INT32_MAX = 2**31 - 1


def require_tflite(module: str) -> Any:
    """Import tensorflow or ai_edge_litert, or fail with the command that installs the `tflite` extra."""
    if module == "tensorflow":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # its C++ start-up notes say nothing about this model
    return require(module, "tflite")


# ---------------------------------------------------------------------------- export


def export_tflite(
    checkpoint: Checkpoints, out: str | Path, use_ema: bool = True, check_files: Sequence[str | Path] = ()
) -> ExportResult:
    """Write `out` (.tflite) and its metadata JSON from a checkpoint (several: an ensemble), after the parity check.

    The same check as for ONNX: ai-edge-litert runs the serialized model on the built-in sequences and on
    `check_files`, and must agree with PyTorch on the pipeline's preprocessing; nothing is written otherwise.
    """
    require_tflite("ai_edge_litert.interpreter")
    require_tflite("tensorflow")

    def serialize(source: ExportSource) -> tuple[bytes, dict[str, Any]]:
        return tflite_bytes(LandmarkClassifier(source.model).eval(), source.metadata), {"format": "tflite"}

    return checked_export(serialize, "ai-edge-litert", checkpoint, out, use_ema, check_files)


def tflite_bytes(module: torch.nn.Module, metadata: dict[str, Any]) -> bytes:
    """The `.tflite` flatbuffer of `module` (one (T, 543, 3) sequence -> logits) with `metadata` in it."""
    tf = require_tflite("tensorflow")
    program = aten_program(module)
    lowering = AtenToTF(program)
    spec = tf.TensorSpec([None, N_RAW, 3], tf.float32, name=INPUT_NAME)
    holder = tf.Module()
    serve = lambda inputs: {OUTPUT_NAME: lowering(inputs)}  # noqa: E731
    holder.serve = tf.function(serve, input_signature=[spec], autograph=False)  # plain Python: nothing to rewrite
    with quiet_exporter():
        converter = tf.lite.TFLiteConverter.from_concrete_functions([holder.serve.get_concrete_function()], holder)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex: ai-edge-litert alone runs it
        try:
            data = converter.convert()
        except Exception as exc:  # the converter raises its own ConverterError and plain ones alike
            raise ExportError(f"TensorFlow's LiteRT converter failed: {str(exc).splitlines()[0][:300]}") from None
    return with_metadata(data, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})


def aten_program(module: torch.nn.Module) -> torch.export.ExportedProgram:
    """`module` through `torch.export` with a dynamic frame axis, decomposed to core ATen ops."""
    program = dynamic_program(module)
    with quiet_exporter():
        return program.run_decompositions()


# ---------------------------------------------------------------------------- ATen -> TensorFlow

Lowering = Callable[..., Any]  # (the interpreter, the node's args...) -> TensorFlow value
LOWERINGS: dict[Any, Lowering] = {}  # ATen overload (or Python operator on sizes) -> its TensorFlow lowering


def lowers(*targets: Any) -> Callable[[Lowering], Lowering]:
    """Register the decorated function as the lowering of each ATen overload in `targets`."""

    def register(fn: Lowering) -> Lowering:
        for target in targets:
            LOWERINGS[target] = fn
        return fn

    return register


class AtenToTF(torch.fx.Interpreter):
    """Runs a core-ATen `ExportedProgram` with TensorFlow ops: called inside a `tf.function`, it builds its graph.

    Each node's target is looked up in `LOWERINGS`. Dtypes follow each node's recorded result, with float64 ->
    float32 and int64 -> int32 (LiteRT's builtins). Sizes that depend on the input stay symbolic: `sym_size` is
    `tf.shape`, and shape arithmetic runs on it.
    """

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__(program.graph_module, garbage_collect_values=True)
        self.extra_traceback = False  # an ExportError stays one line
        self.tf = require_tflite("tensorflow")
        sig = program.graph_signature
        tensors = {**program.state_dict, **program.constants}
        named = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        self.constants = {name: tensors[target] for name, target in named.items()}  # placeholder -> tensor
        self.node: torch.fx.Node | None = None  # the node being lowered

    def __call__(self, *inputs: Any) -> Any:
        return self.run(*inputs)[0]

    def run_node(self, n: torch.fx.Node) -> Any:
        self.node = n
        result = super().run_node(n)
        val = n.meta.get("val")
        if n.op == "call_function" and isinstance(val, torch.Tensor) and isinstance(result, self.tf.Tensor):
            result = self.tf.cast(result, self.dtype(val.dtype))  # torch's type promotion, done once here
        return result

    def placeholder(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.node is not None and self.node.name in self.constants:  # a weight, buffer or constant
            return self.tf.constant(_numpy(self.constants[self.node.name]))
        return super().placeholder(target, args, kwargs)  # the next user input

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        lower = LOWERINGS.get(target)
        if lower is None:
            name = self.node.name if self.node is not None else "?"
            raise ExportError(f"no LiteRT lowering for {target} (node {name}); add one to train/tflite.py")
        return lower(self, *args, **kwargs)

    def dtype(self, dtype: torch.dtype) -> Any:
        """The LiteRT dtype computing a torch dtype."""
        tf = self.tf
        table = {
            torch.float32: tf.float32,
            torch.float64: tf.float32,
            torch.int64: tf.int32,
            torch.int32: tf.int32,
            torch.bool: tf.bool,
        }
        if dtype not in table:
            raise ExportError(f"no LiteRT dtype for {dtype}")
        return table[dtype]

    def out(self) -> Any:
        """The LiteRT dtype of the current node's result."""
        return self.dtype(self.node.meta["val"].dtype)

    def arg_shape(self, i: int) -> Any:
        """The recorded torch shape of the current node's `i`-th argument."""
        return self.node.args[i].meta["val"].shape

    def shape(self, sizes: Sequence[Any]) -> Any:
        """A shape of ints and symbolic (scalar tensor) sizes, as TensorFlow takes it."""
        if all(isinstance(s, int) for s in sizes):
            return list(sizes)
        return self.tf.stack([self.tf.cast(s, self.tf.int32) for s in sizes])


def _numpy(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    if a.dtype == np.float64:
        return a.astype(np.float32)
    return a.astype(np.int32) if a.dtype == np.int64 else a


aten = torch.ops.aten


# Python's operators on sizes (scalar tensors here) and on the tuple a node returns.
@lowers(operator.add, operator.sub, operator.mul, operator.floordiv, operator.getitem)
def _python_operator(lo: AtenToTF, *args: Any) -> Any:
    return lo.node.target(*args)


@lowers(torch.sym_min)
def _sym_min(lo: AtenToTF, a: Any, b: Any) -> Any:
    return lo.tf.minimum(a, b)


@lowers(torch.sym_max)
def _sym_max(lo: AtenToTF, a: Any, b: Any) -> Any:
    return lo.tf.maximum(a, b)


@lowers(aten.sym_size.int)
def _sym_size(lo: AtenToTF, x: Any, dim: int) -> Any:
    return lo.tf.shape(x)[dim]


@lowers(aten._assert_tensor_metadata.default)
def _assert_metadata(lo: AtenToTF, *args: Any, **kwargs: Any) -> None:
    return None  # a check torch.export leaves in the graph; the dtypes are followed anyway


@lowers(aten._to_copy.default, aten.clone.default, aten.alias.default)
def _copy(lo: AtenToTF, x: Any, **kwargs: Any) -> Any:
    return lo.tf.identity(x)  # a cast to the node's dtype follows in `run_node`


@lowers(aten.permute.default)
def _permute(lo: AtenToTF, x: Any, dims: Sequence[int]) -> Any:
    return lo.tf.transpose(x, list(dims))


@lowers(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _view(lo: AtenToTF, x: Any, sizes: Sequence[Any]) -> Any:
    return lo.tf.reshape(x, lo.shape(sizes))


@lowers(aten.unsqueeze.default)
def _unsqueeze(lo: AtenToTF, x: Any, dim: int) -> Any:
    return lo.tf.expand_dims(x, dim)


@lowers(aten.squeeze.dims)
def _squeeze(lo: AtenToTF, x: Any, dims: Sequence[int]) -> Any:
    shape = lo.arg_shape(0)
    ones = [d % len(shape) for d in dims if isinstance(shape[d], int) and shape[d] == 1]  # torch skips others
    return lo.tf.squeeze(x, axis=ones) if ones else x


@lowers(aten.squeeze.dim)
def _squeeze_dim(lo: AtenToTF, x: Any, dim: int) -> Any:
    return _squeeze(lo, x, [dim])


@lowers(aten.expand.default)
def _expand(lo: AtenToTF, x: Any, sizes: Sequence[Any], implicit: bool = False) -> Any:
    lead = len(sizes) - len(x.shape)
    sizes = [lo.tf.shape(x)[i - lead] if isinstance(s, int) and s == -1 else s for i, s in enumerate(sizes)]
    return lo.tf.broadcast_to(x, lo.shape(sizes))


@lowers(aten.slice.Tensor)
def _slice(lo: AtenToTF, x: Any, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> Any:
    if isinstance(end, int) and end >= INT32_MAX:  # "to the end", as torch writes it
        end = None
    if isinstance(start, int) and start == 0:
        start = None
    return x[(slice(None),) * (dim % len(x.shape)) + (slice(start, end, step),)]


@lowers(aten.select.int)
def _select(lo: AtenToTF, x: Any, dim: int, index: Any) -> Any:
    return x[(slice(None),) * (dim % len(x.shape)) + (index,)]


@lowers(aten.index.Tensor)
def _index(lo: AtenToTF, x: Any, indices: Sequence[Any]) -> Any:
    used = [(axis, i) for axis, i in enumerate(indices) if i is not None]
    if len(used) != 1 or used[0][1].dtype == lo.tf.bool:
        raise ExportError(f"no LiteRT lowering for {lo.node.target} with {len(used)} index tensors or a mask")
    axis, i = used[0]
    return lo.tf.gather(x, i, axis=axis)


@lowers(aten.cat.default)
def _cat(lo: AtenToTF, xs: Sequence[Any], dim: int = 0) -> Any:
    return lo.tf.concat(list(xs), axis=dim)


@lowers(aten.scalar_tensor.default)
def _scalar_tensor(lo: AtenToTF, value: Any, **kwargs: Any) -> Any:
    return lo.tf.constant(value, lo.out())


@lowers(aten.full.default)
def _full(lo: AtenToTF, sizes: Sequence[Any], value: Any, **kwargs: Any) -> Any:
    return lo.tf.fill(lo.shape(sizes), lo.tf.cast(value, lo.out()))


@lowers(aten.full_like.default)
def _full_like(lo: AtenToTF, x: Any, value: Any, **kwargs: Any) -> Any:
    return lo.tf.fill(lo.tf.shape(x), lo.tf.cast(value, lo.out()))


@lowers(aten.arange.start_step, aten.arange.start)
def _arange(lo: AtenToTF, start: Any, end: Any = None, step: Any = 1, **kwargs: Any) -> Any:
    return lo.tf.range(start, end, step, dtype=lo.out())


@lowers(aten.arange.default)
def _arange_to(lo: AtenToTF, end: Any, **kwargs: Any) -> Any:
    return _arange(lo, 0, end)


def _elementwise(fn: Callable[..., Any]) -> Lowering:
    """An elementwise op whose tensor operands are first cast to the node's result dtype."""

    def lower(lo: AtenToTF, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("alpha", 1) != 1 or kwargs.get("rounding_mode") is not None:
            raise ExportError(f"no LiteRT lowering for {lo.node.target} with {kwargs}")
        dtype = lo.out()
        return fn(*(lo.tf.cast(a, dtype) if isinstance(a, lo.tf.Tensor) else a for a in args))

    return lower


lowers(aten.add.Tensor, aten.add.Scalar)(_elementwise(operator.add))
lowers(aten.sub.Tensor, aten.sub.Scalar)(_elementwise(operator.sub))
lowers(aten.mul.Tensor, aten.mul.Scalar)(_elementwise(operator.mul))
lowers(aten.div.Tensor, aten.div.Scalar)(_elementwise(operator.truediv))
lowers(aten.neg.default)(_elementwise(operator.neg))


def _math(name: str) -> Lowering:
    """An elementwise `tf.math` function by name (TensorFlow is imported only when a lowering runs)."""
    return lambda lo, *args, **kwargs: _elementwise(getattr(lo.tf.math, name))(lo, *args, **kwargs)


for _op, _name in [
    (aten.abs.default, "abs"),
    (aten.sqrt.default, "sqrt"),
    (aten.rsqrt.default, "rsqrt"),
    (aten.exp.default, "exp"),
    (aten.log.default, "log"),
    (aten.sigmoid.default, "sigmoid"),
    (aten.minimum.default, "minimum"),
    (aten.maximum.default, "maximum"),
]:
    lowers(_op)(_math(_name))


@lowers(aten.clamp.default)
def _clamp(lo: AtenToTF, x: Any, low: Any = None, high: Any = None) -> Any:
    x = x if low is None else lo.tf.maximum(x, lo.tf.cast(low, x.dtype))
    return x if high is None else lo.tf.minimum(x, lo.tf.cast(high, x.dtype))


@lowers(aten.where.self)
def _where(lo: AtenToTF, cond: Any, a: Any, b: Any) -> Any:
    dtype = lo.out()
    return lo.tf.where(cond, lo.tf.cast(a, dtype), lo.tf.cast(b, dtype))


@lowers(aten.isnan.default)
def _isnan(lo: AtenToTF, x: Any) -> Any:
    return lo.tf.not_equal(x, x)  # LiteRT has no IS_NAN; NaN is unequal to itself


COMPARISONS = {
    "eq": "equal",
    "ne": "not_equal",
    "lt": "less",
    "le": "less_equal",
    "gt": "greater",
    "ge": "greater_equal",
}


def _compare(name: str) -> Lowering:
    """A comparison: both operands cast to float32 when either is floating, else to int32."""

    def lower(lo: AtenToTF, a: Any, b: Any) -> Any:
        tf = lo.tf
        tensors = [x for x in (a, b) if isinstance(x, tf.Tensor)]
        floating = any(x.dtype.is_floating for x in tensors) or any(isinstance(x, float) for x in (a, b))
        dtype = tf.float32 if floating else tf.int32
        return getattr(tf.math, name)(tf.cast(a, dtype), tf.cast(b, dtype))

    return lower


for _aten_name, _tf_name in COMPARISONS.items():
    _packet = getattr(aten, _aten_name)
    lowers(_packet.Scalar, _packet.Tensor)(_compare(_tf_name))


def _logical(name: str) -> Lowering:
    return lambda lo, *args: getattr(lo.tf.math, name)(*(lo.tf.cast(a, lo.tf.bool) for a in args))


lowers(aten.logical_not.default, aten.bitwise_not.default)(_logical("logical_not"))
lowers(aten.logical_and.default, aten.bitwise_and.Tensor)(_logical("logical_and"))
lowers(aten.logical_or.default, aten.bitwise_or.Tensor)(_logical("logical_or"))


def _reduce(name: str, bool_as_int: bool = False) -> Lowering:
    """A reduction over `dims` (all when empty); booleans counted as int32 when `bool_as_int` (sum)."""

    def lower(lo: AtenToTF, x: Any, dims: Any = None, keepdim: bool = False, **kwargs: Any) -> Any:
        if x.dtype == lo.tf.bool and bool_as_int:
            x = lo.tf.cast(x, lo.tf.int32)
        axis = None if dims is None or dims == [] else dims
        return getattr(lo.tf.math, name)(x, axis=axis, keepdims=keepdim)

    return lower


lowers(aten.sum.dim_IntList)(_reduce("reduce_sum", bool_as_int=True))
lowers(aten.mean.dim)(_reduce("reduce_mean"))
lowers(aten.amax.default)(_reduce("reduce_max"))
lowers(aten.any.dim)(_reduce("reduce_any"))


@lowers(aten.logsumexp.default)
def _logsumexp(lo: AtenToTF, x: Any, dims: Any, keepdim: bool = False) -> Any:
    return lo.tf.reduce_logsumexp(x, dims, keepdim)


@lowers(aten._softmax.default)
def _softmax(lo: AtenToTF, x: Any, dim: int, half_to_float: bool) -> Any:
    return lo.tf.nn.softmax(x, axis=dim)


@lowers(aten._log_softmax.default)
def _log_softmax(lo: AtenToTF, x: Any, dim: int, half_to_float: bool) -> Any:
    return lo.tf.nn.log_softmax(x, axis=dim)


@lowers(aten.addmm.default)
def _addmm(lo: AtenToTF, bias: Any, a: Any, b: Any) -> Any:
    return lo.tf.matmul(a, b) + bias


@lowers(aten.mm.default, aten.bmm.default)
def _matmul(lo: AtenToTF, a: Any, b: Any) -> Any:
    return lo.tf.matmul(a, b)


@lowers(aten.convolution.default)
def _convolution(
    lo: AtenToTF,
    x: Any,
    w: Any,
    b: Any,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Any,
    groups: int,
) -> Any:
    """A 1-D convolution (B, C, T) in LiteRT's channels-last layout: CONV_2D or DEPTHWISE_CONV_2D."""
    tf = lo.tf
    if len(x.shape) != 3 or transposed:
        raise ExportError(f"no LiteRT lowering for {lo.node.target} other than a 1-D forward convolution")
    out_ch, in_per_group, k = lo.arg_shape(1)
    h = tf.pad(tf.transpose(x, [0, 2, 1]), [[0, 0], [padding[0], padding[0]], [0, 0]])[:, None]  # (B, 1, T, C)
    if groups == 1:
        kernel = tf.transpose(w, [2, 1, 0])[None]
        y = tf.nn.conv2d(h, kernel, strides=[1, 1, stride[0], 1], padding="VALID", dilations=[1, 1, dilation[0], 1])
    elif in_per_group == 1 and out_ch == groups and stride[0] == 1:
        kernel = tf.reshape(tf.transpose(w[:, 0, :]), [1, k, groups, 1])  # (1, K, C, 1)
        y = tf.nn.depthwise_conv2d(h, kernel, strides=[1, 1, 1, 1], padding="VALID", dilations=[1, dilation[0]])
    else:
        raise ExportError(f"no LiteRT lowering for a convolution of {groups} groups with stride {stride}")
    if b is not None:
        y = y + b
    return tf.transpose(y[:, 0], [0, 2, 1])  # (B, C_out, T')


@lowers(aten.native_layer_norm.default)
def _layer_norm(lo: AtenToTF, x: Any, shape: Sequence[int], w: Any, b: Any, eps: float) -> Any:
    tf = lo.tf
    axes = list(range(-len(shape), 0))
    mean = tf.reduce_mean(x, axis=axes, keepdims=True)
    var = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
    rstd = tf.math.rsqrt(var + eps)
    y = (x - mean) * rstd
    return (y * w if w is not None else y) + (b if b is not None else 0.0), mean, rstd


# ---------------------------------------------------------------------------- metadata


def with_metadata(data: bytes, entries: dict[str, str]) -> bytes:
    """The flatbuffer `data` with each entry added to the model's `metadata` (a name and a buffer of UTF-8)."""
    flatbuffers = require_tflite("flatbuffers")
    schema = require_tflite("ai_edge_litert.schema_py_generated")
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    model.metadata = list(model.metadata or [])
    model.buffers = list(model.buffers or [])
    for name, value in entries.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(value.encode(), dtype=np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = name, len(model.buffers) - 1
        model.metadata.append(entry)
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
