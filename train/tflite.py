"""LiteRT (TFLite) export: the graph `asl-train export` puts in an ONNX file, as one `.tflite` file.

Converter. The exported module (`train.export.LandmarkClassifier`: the pipeline's preprocessing, then the
network) goes through `torch.export` with a dynamic frame axis and torch's core-ATen decompositions; each
ATen node of that program is then lowered to the TensorFlow op that computes the same thing (`AtenToTF`),
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
from train.exportgraph import (
    INPUT_NAME,
    OUTPUT_NAME,
    Checkpoints,
    ExportError,
    ExportResult,
    LandmarkClassifier,
    check_sequences,
    dynamic_program,
    export_source,
    parity_failure,
    parity_rows,
    quiet_exporter,
    require,
)
from train.modelfile import ModelFile
from train.modelpair import write_model_pair

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
    out = Path(out)
    checks = check_sequences(check_files)
    source = export_source(checkpoint, use_ema)
    data = tflite_bytes(LandmarkClassifier(source.model).eval(), source.metadata)
    written = ModelFile(data, name=str(out))  # as `predict --model` will open it: metadata and contract checked
    parity = parity_rows(written.logits, source.model, source.label_map, checks, runtime="ai-edge-litert")
    if any(not r.ok for r in parity):
        raise ExportError(parity_failure(parity, "ai-edge-litert"))
    meta_path = write_model_pair(out, data, {"format": "tflite", **source.metadata})
    return ExportResult(out, meta_path, len(data), None, source.weights, parity, source.members)


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


class AtenToTF:
    """Runs a core-ATen `ExportedProgram` with TensorFlow ops: called inside a `tf.function`, it builds its graph.

    Dtypes follow each node's recorded result, with float64 -> float32 and int64 -> int32 (LiteRT's builtins).
    Sizes that depend on the input stay symbolic: `sym_size` is `tf.shape`, and shape arithmetic runs on it.
    """

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        self.tf = require_tflite("tensorflow")
        self.graph = program.graph
        sig = program.graph_signature
        tensors = {**program.state_dict, **program.constants}
        named = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        self.constants = {name: tensors[target] for name, target in named.items()}  # placeholder -> tensor
        self.user_inputs = list(sig.user_inputs)
        self.ops = self._lowerings()

    def __call__(self, *inputs: Any) -> Any:
        env: dict[str, Any] = dict(zip(self.user_inputs, inputs, strict=True))
        for node in self.graph.nodes:
            if node.op == "placeholder":
                if node.name not in env:
                    env[node.name] = self.tf.constant(self._numpy(self.constants[node.name]))
            elif node.op == "call_function":
                env[node.name] = self._call(node, env)
            elif node.op == "output":
                return self._resolve(node.args[0], env)[0]
        raise ExportError("the exported program has no output")

    def _call(self, node: torch.fx.Node, env: dict[str, Any]) -> Any:
        target = node.target
        lower = self.ops.get(target)
        if lower is None:
            raise ExportError(f"no LiteRT lowering for {target} (node {node.name}); add one to train/tflite.py")
        args = self._resolve(node.args, env)
        kwargs = self._resolve(dict(node.kwargs), env)
        result = lower(node, *args, **kwargs)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(result, self.tf.Tensor):
            result = self.tf.cast(result, self._dtype(val.dtype))  # torch's type promotion, done once here
        return result

    def _resolve(self, a: Any, env: dict[str, Any]) -> Any:
        if isinstance(a, torch.fx.Node):
            return env[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(self._resolve(x, env) for x in a)
        if isinstance(a, dict):
            return {k: self._resolve(v, env) for k, v in a.items()}
        return a

    def _dtype(self, dtype: torch.dtype) -> Any:
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

    @staticmethod
    def _numpy(t: torch.Tensor) -> np.ndarray:
        a = t.detach().cpu().numpy()
        if a.dtype == np.float64:
            return a.astype(np.float32)
        return a.astype(np.int32) if a.dtype == np.int64 else a

    def _shape(self, sizes: Sequence[Any]) -> Any:
        """A shape of ints and symbolic (scalar tensor) sizes, as TensorFlow takes it."""
        if all(isinstance(s, int) for s in sizes):
            return list(sizes)
        return self.tf.stack([self.tf.cast(s, self.tf.int32) for s in sizes])

    def _out(self, node: torch.fx.Node) -> Any:
        return self._dtype(node.meta["val"].dtype)

    def _lowerings(self) -> dict[Any, Callable[..., Any]]:
        tf, aten = self.tf, torch.ops.aten

        def same(fn: Callable[..., Any]) -> Callable[..., Any]:
            """An elementwise op whose tensor operands are first cast to the node's result dtype."""

            def lower(node: torch.fx.Node, *args: Any, **kwargs: Any) -> Any:
                if kwargs.get("alpha", 1) != 1 or kwargs.get("rounding_mode") is not None:
                    raise ExportError(f"no LiteRT lowering for {node.target} with {kwargs}")
                dtype = self._out(node)
                return fn(*(tf.cast(a, dtype) if isinstance(a, tf.Tensor) else a for a in args))

            return lower

        def compare(fn: Callable[..., Any]) -> Callable[..., Any]:
            def lower(node: torch.fx.Node, a: Any, b: Any) -> Any:
                tensors = [x for x in (a, b) if isinstance(x, tf.Tensor)]
                dtype = tf.float32 if any(x.dtype.is_floating for x in tensors) or isinstance(b, float) else tf.int32
                return fn(tf.cast(a, dtype), tf.cast(b, dtype))

            return lower

        def logical(fn: Callable[..., Any]) -> Callable[..., Any]:
            return lambda node, *args: fn(*(tf.cast(a, tf.bool) for a in args))

        def slice_(node: torch.fx.Node, x: Any, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> Any:
            if isinstance(end, int) and end >= INT32_MAX:  # "to the end", as torch writes it
                end = None
            if isinstance(start, int) and start == 0:
                start = None
            return x[(slice(None),) * (dim % len(x.shape)) + (slice(start, end, step),)]

        def select(node: torch.fx.Node, x: Any, dim: int, index: Any) -> Any:
            return x[(slice(None),) * (dim % len(x.shape)) + (index,)]

        def index(node: torch.fx.Node, x: Any, indices: Sequence[Any]) -> Any:
            used = [(axis, i) for axis, i in enumerate(indices) if i is not None]
            if len(used) != 1 or used[0][1].dtype == tf.bool:
                raise ExportError(f"no LiteRT lowering for {node.target} with {len(used)} index tensors or a mask")
            axis, i = used[0]
            return tf.gather(x, i, axis=axis)

        def view(node: torch.fx.Node, x: Any, sizes: Sequence[Any]) -> Any:
            return tf.reshape(x, self._shape(sizes))

        def expand(node: torch.fx.Node, x: Any, sizes: Sequence[Any], implicit: bool = False) -> Any:
            lead = len(sizes) - len(x.shape)
            sizes = [tf.shape(x)[i - lead] if isinstance(s, int) and s == -1 else s for i, s in enumerate(sizes)]
            return tf.broadcast_to(x, self._shape(sizes))

        def squeeze(node: torch.fx.Node, x: Any, dims: Sequence[int]) -> Any:
            shape = node.args[0].meta["val"].shape
            ones = [d % len(shape) for d in dims if isinstance(shape[d], int) and shape[d] == 1]  # torch skips others
            return tf.squeeze(x, axis=ones) if ones else x

        def conv(
            node: torch.fx.Node,
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
            if len(x.shape) != 3 or transposed:
                raise ExportError(f"no LiteRT lowering for {node.target} other than a 1-D forward convolution")
            out_ch, in_per_group, k = node.args[1].meta["val"].shape
            h = tf.pad(tf.transpose(x, [0, 2, 1]), [[0, 0], [padding[0], padding[0]], [0, 0]])[:, None]  # (B,1,T,C)
            if groups == 1:
                y = tf.nn.conv2d(
                    h,
                    tf.transpose(w, [2, 1, 0])[None],
                    strides=[1, 1, stride[0], 1],
                    padding="VALID",
                    dilations=[1, 1, dilation[0], 1],
                )
            elif in_per_group == 1 and out_ch == groups and stride[0] == 1:
                kernel = tf.reshape(tf.transpose(w[:, 0, :]), [1, k, groups, 1])  # (1, K, C, 1)
                y = tf.nn.depthwise_conv2d(h, kernel, strides=[1, 1, 1, 1], padding="VALID", dilations=[1, dilation[0]])
            else:
                raise ExportError(f"no LiteRT lowering for a convolution of {groups} groups with stride {stride}")
            if b is not None:
                y = y + b
            return tf.transpose(y[:, 0], [0, 2, 1])  # (B, C_out, T')

        def layer_norm(node: torch.fx.Node, x: Any, shape: Sequence[int], w: Any, b: Any, eps: float) -> Any:
            axes = list(range(-len(shape), 0))
            mean = tf.reduce_mean(x, axis=axes, keepdims=True)
            var = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
            rstd = tf.math.rsqrt(var + eps)
            y = (x - mean) * rstd
            return (y * w if w is not None else y) + (b if b is not None else 0.0), mean, rstd

        def reduce(fn: Callable[..., Any], bool_as: Any) -> Callable[..., Any]:
            def lower(node: torch.fx.Node, x: Any, dims: Any = None, keepdim: bool = False, **kwargs: Any) -> Any:
                if x.dtype == tf.bool and bool_as is not None:
                    x = tf.cast(x, bool_as)
                axis = None if dims is None or dims == [] else dims
                return fn(x, axis=axis, keepdims=keepdim)

            return lower

        def full(node: torch.fx.Node, sizes: Sequence[Any], value: Any, **kwargs: Any) -> Any:
            return tf.fill(self._shape(sizes), tf.cast(value, self._out(node)))

        def arange(node: torch.fx.Node, start: Any, end: Any = None, step: Any = 1, **kwargs: Any) -> Any:
            return tf.range(start, end, step, dtype=self._out(node))

        def clamp(node: torch.fx.Node, x: Any, lo: Any = None, hi: Any = None) -> Any:
            x = x if lo is None else tf.maximum(x, tf.cast(lo, x.dtype))
            return x if hi is None else tf.minimum(x, tf.cast(hi, x.dtype))

        def where(node: torch.fx.Node, cond: Any, a: Any, b: Any) -> Any:
            dtype = self._out(node)
            return tf.where(cond, tf.cast(a, dtype), tf.cast(b, dtype))

        def to_copy(node: torch.fx.Node, x: Any, **kwargs: Any) -> Any:
            return tf.identity(x)  # the cast to the node's dtype follows in `_call`

        def plain(fn: Callable[..., Any]) -> Callable[..., Any]:
            """Python's operators on sizes (scalar tensors here) and on the tuple a node returns."""
            return lambda node, *args: fn(*args)

        return {
            **{op: plain(op) for op in (operator.add, operator.sub, operator.mul, operator.floordiv, operator.getitem)},
            torch.sym_min: lambda node, a, b: tf.minimum(a, b),
            torch.sym_max: lambda node, a, b: tf.maximum(a, b),
            aten.sym_size.int: lambda node, x, dim: tf.shape(x)[dim],
            aten._assert_tensor_metadata.default: lambda node, *a, **k: None,
            aten._to_copy.default: to_copy,
            aten.clone.default: lambda node, x, **k: tf.identity(x),
            aten.alias.default: lambda node, x: tf.identity(x),
            aten.permute.default: lambda node, x, dims: tf.transpose(x, list(dims)),
            aten.view.default: view,
            aten.reshape.default: view,
            aten._unsafe_view.default: view,
            aten.unsqueeze.default: lambda node, x, dim: tf.expand_dims(x, dim),
            aten.squeeze.dims: squeeze,
            aten.squeeze.dim: lambda node, x, dim: squeeze(node, x, [dim]),
            aten.expand.default: expand,
            aten.slice.Tensor: slice_,
            aten.select.int: select,
            aten.index.Tensor: index,
            aten.cat.default: lambda node, xs, dim=0: tf.concat(list(xs), axis=dim),
            aten.scalar_tensor.default: lambda node, v, **k: tf.constant(v, self._out(node)),
            aten.full.default: full,
            aten.full_like.default: lambda node, x, v, **k: tf.fill(tf.shape(x), tf.cast(v, self._out(node))),
            aten.arange.start_step: arange,
            aten.arange.start: arange,
            aten.arange.default: lambda node, end, **k: arange(node, 0, end),
            aten.add.Tensor: same(operator.add),
            aten.add.Scalar: same(operator.add),
            aten.sub.Tensor: same(operator.sub),
            aten.sub.Scalar: same(operator.sub),
            aten.mul.Tensor: same(operator.mul),
            aten.mul.Scalar: same(operator.mul),
            aten.div.Tensor: same(operator.truediv),
            aten.div.Scalar: same(operator.truediv),
            aten.neg.default: same(operator.neg),
            aten.abs.default: same(tf.abs),
            aten.sqrt.default: same(tf.sqrt),
            aten.rsqrt.default: same(tf.math.rsqrt),
            aten.exp.default: same(tf.exp),
            aten.sigmoid.default: same(tf.sigmoid),
            aten.minimum.default: same(tf.minimum),
            aten.maximum.default: same(tf.maximum),
            aten.clamp.default: clamp,
            aten.where.self: where,
            aten.isnan.default: lambda node, x: tf.not_equal(x, x),  # LiteRT has no IS_NAN; NaN is unequal to itself
            aten.eq.Scalar: compare(tf.equal),
            aten.eq.Tensor: compare(tf.equal),
            aten.ne.Scalar: compare(tf.not_equal),
            aten.ne.Tensor: compare(tf.not_equal),
            aten.lt.Scalar: compare(tf.less),
            aten.lt.Tensor: compare(tf.less),
            aten.le.Scalar: compare(tf.less_equal),
            aten.gt.Scalar: compare(tf.greater),
            aten.gt.Tensor: compare(tf.greater),
            aten.ge.Scalar: compare(tf.greater_equal),
            aten.logical_not.default: logical(tf.logical_not),
            aten.bitwise_not.default: logical(tf.logical_not),
            aten.logical_and.default: logical(tf.logical_and),
            aten.bitwise_and.Tensor: logical(tf.logical_and),
            aten.logical_or.default: logical(tf.logical_or),
            aten.bitwise_or.Tensor: logical(tf.logical_or),
            aten.sum.dim_IntList: reduce(tf.reduce_sum, tf.int32),
            aten.mean.dim: reduce(tf.reduce_mean, None),
            aten.amax.default: reduce(tf.reduce_max, None),
            aten.any.dim: reduce(tf.reduce_any, None),
            aten._softmax.default: lambda node, x, dim, half: tf.nn.softmax(x, axis=dim),
            aten._log_softmax.default: lambda node, x, dim, half: tf.nn.log_softmax(x, axis=dim),
            aten.logsumexp.default: lambda node, x, dims, keepdim=False: tf.reduce_logsumexp(x, dims, keepdim),
            aten.log.default: same(tf.math.log),
            aten.addmm.default: lambda node, bias, a, b: tf.matmul(a, b) + bias,
            aten.mm.default: lambda node, a, b: tf.matmul(a, b),
            aten.bmm.default: lambda node, a, b: tf.matmul(a, b),
            aten.convolution.default: conv,
            aten.native_layer_norm.default: layer_norm,
        }


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
