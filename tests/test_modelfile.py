"""`predict --model` on any model file: metadata checked whole, the competition's contract, `--label-map`, signals.

The graphs are built here with `onnx.helper`, small and exact: `outputs[i]` is the sum of the landmarks' x, y and z
of landmark i over every frame, NaN counted as 0, so the expected probabilities are computed again with numpy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_ROOT

from pipeline.read import read_landmarks
from train.cli import main as train_cli

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install -e '.[export]'")
pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")

from onnx import TensorProto, helper  # noqa: E402

from train.modelfile import ModelFile, ModelFileError, label_map_from  # noqa: E402

SIGNS = 5
LABELS = {f"sign_{i}": i for i in range(SIGNS)}
SAMPLE = SAMPLE_ROOT / "16069" / "100015657.parquet"


def graph_file(
    path: Path,
    signs: int = SIGNS,
    metadata: dict[str, str] | None = None,
    input_shape: list = ("frames", 543, 3),  # type: ignore[assignment]
    input_name: str = "inputs",
    output_name: str = "outputs",
    extra_output: bool = False,
    input_type: int = TensorProto.FLOAT,
) -> Path:
    """An ONNX file: (T, 543, 3) -> (signs,), the NaN-free sum over frames and coordinates of the first landmarks."""
    rank = len(input_shape)
    nodes = [
        helper.make_node("IsNaN", [input_name], ["nan"]),
        helper.make_node("Where", ["nan", "zero", input_name], ["clean"]),
        helper.make_node("ReduceSum", ["clean", "axes"], ["summed"], keepdims=0),
        helper.make_node("Slice", ["summed", "start", "stop"], [output_name]),
    ]
    outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [signs])]
    if extra_output:
        nodes.append(helper.make_node("Identity", [output_name], ["second"]))
        outputs.append(helper.make_tensor_value_info("second", TensorProto.FLOAT, [signs]))
    reduced = [a for a in range(rank) if a != 1] if rank > 1 else [0]
    initializers = [
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("axes", TensorProto.INT64, [len(reduced)], reduced),
        helper.make_tensor("start", TensorProto.INT64, [1], [0]),
        helper.make_tensor("stop", TensorProto.INT64, [1], [signs]),
    ]
    if input_type != TensorProto.FLOAT:
        nodes[0:0] = [helper.make_node("Cast", [input_name], ["as_float"], to=TensorProto.FLOAT)]
        nodes[1] = helper.make_node("IsNaN", ["as_float"], ["nan"])
        nodes[2] = helper.make_node("Where", ["nan", "zero", "as_float"], ["clean"])
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(input_name, input_type, list(input_shape))], outputs, initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())
    return path


def expected_probabilities(xyz: np.ndarray, signs: int = SIGNS) -> np.ndarray:
    z = np.nan_to_num(xyz.astype(np.float64)).sum(axis=(0, 2))[:signs]
    e = np.exp(z - z.max())
    return e / e.sum()


def predict(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(train_cli, ["predict", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def label_map_file(tmp_path: Path) -> Path:
    path = tmp_path / "sign_to_prediction_index_map.json"
    path.write_text(json.dumps(LABELS))
    return path


@pytest.fixture
def sample(shared_dir: Path) -> Path:
    return SAMPLE


# ---------------------------------------------------------------------------- the label map in a file's metadata


@pytest.mark.parametrize(
    ("stored", "reason"),
    [
        ("{not json", "label_map in its metadata: not JSON (Expecting property name enclosed in double quotes"),
        ('["a", "b"]', "label_map in its metadata: an array, not an object {sign: index}"),
        ("[" * 100_000, "label_map in its metadata: nested too deeply to be a label map {sign: index}"),
        ('"signs"', "label_map in its metadata: a string, not an object {sign: index}"),
        ("null", "label_map in its metadata: null, not an object {sign: index}"),
        ("{}", "label_map in its metadata: no signs"),
        ('{"a": 0, "b": 2}', "label_map in its metadata: the index 2 of 'b' is outside 0..1 (one index per sign)"),
        ('{"a": 0, "b": 0}', "label_map in its metadata: the index 0 is given to 'a' and 'b'"),
        ('{"a": 0, "b": "1"}', "label_map in its metadata: the index of 'b' is a string, not an integer"),
        ('{"a": 0, "b": true}', "label_map in its metadata: the index of 'b' is a boolean, not an integer"),
        ('{"a": 0, "b": {"c": 1}}', "label_map in its metadata: the index of 'b' is an object, not an integer"),
        ('{"a": 0, "": 1}', "label_map in its metadata: a sign name of 0 characters (1 to 200)"),
        (
            json.dumps({"a": 0, "b": 1, "c": 2}),  # fewer signs than the 5 outputs
            "not the contract of a sign model: output 'outputs': shape (5,), not (3,) for the 3 signs of "
            "label_map in its metadata",
        ),
    ],
)
def test_bad_label_map_in_metadata_is_one_line(tmp_path: Path, sample: Path, stored: str, reason: str) -> None:
    model = graph_file(tmp_path / "m.onnx", metadata={"label_map": stored})
    with pytest.raises(ModelFileError) as info:
        ModelFile(model)
    assert str(info.value).startswith(f"{model}: {reason}")
    code, out, err = predict("--model", str(model), str(sample))
    assert (code, out) == (1, "") and err.startswith(f"Error: {model}: {reason}") and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        ({"output_name": "logits"}, "output: named 'logits', not 'outputs' as the files of `asl-train export` name it"),
        ({"input_name": "x"}, "input: named 'x', not 'inputs' as the files of `asl-train export` name it"),
        (
            {"output_name": "out\x1b[2J"},  # printed escaped: the file chose the name
            "output: named 'out\\x1b[2J', not 'outputs' as the files of `asl-train export` name it",
        ),
    ],
)
def test_our_metadata_with_other_port_names_is_refused(tmp_path: Path, names: dict, reason: str) -> None:
    model = graph_file(tmp_path / "m.onnx", metadata={"label_map": json.dumps(LABELS)}, **names)
    with pytest.raises(ModelFileError, match="^" + str(model) + ": not the contract of a sign model: ") as info:
        ModelFile(model)
    assert str(info.value).endswith(reason)


def test_sign_names_are_printed_escaped(tmp_path: Path, sample: Path) -> None:
    hostile = {"\x1b]0;pwned\x07title": 0, "clear\x1b[2J": 1, "line\nbreak": 2, "plain": 3, "\u202eevil": 4}
    model = graph_file(tmp_path / "m.onnx", metadata={"label_map": json.dumps(hostile)})
    code, out, _ = predict("--model", str(model), str(sample), "--top", "5")
    assert code == 0 and out.endswith("\n")
    line = out[:-1]
    assert "\n" not in line and line.isprintable()
    for shown in ("\\x1b]0;pwned\\x07title", "clear\\x1b[2J", "line\\nbreak", "plain", "\\u202eevil"):
        assert shown in line
    assert label_map_from(json.dumps(hostile), "m") == {
        "\\x1b]0;pwned\\x07title": 0,
        "clear\\x1b[2J": 1,
        "line\\nbreak": 2,
        "plain": 3,
        "\\u202eevil": 4,
    }


def test_names_that_print_alike_are_refused() -> None:
    with pytest.raises(ModelFileError, match=r"^m: two sign names are the same once their control characters"):
        label_map_from(json.dumps({"a\x1b": 0, "a\\x1b": 1}), "m")


# ---------------------------------------------------------------------------- the model file itself


def test_a_fifo_as_model_is_refused_at_once(tmp_path: Path, sample: Path) -> None:
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    signal.alarm(30)  # a read that waits for a writer fails the test instead of hanging it
    try:
        code, out, err = predict("--model", str(fifo), str(sample))
    finally:
        signal.alarm(0)
    assert (code, out) == (1, "")
    assert err == f"Error: {fifo}: cannot read the model (not a regular file (a FIFO))\n"


def test_a_model_without_metadata_needs_a_label_map(tmp_path: Path, sample: Path) -> None:
    model = graph_file(tmp_path / "m.onnx")
    code, _, err = predict("--model", str(model), str(sample))
    assert code == 1 and err == (
        f"Error: {model}: no label_map in its metadata (not written by `asl-train export`); "
        "give the competition's label map with --label-map FILE\n"
    )


def test_label_map_runs_a_model_without_metadata(tmp_path: Path, sample: Path, label_map_file: Path) -> None:
    model = graph_file(tmp_path / "m.onnx")
    code, out, _ = predict("--model", str(model), "--label-map", str(label_map_file), str(sample), "--format", "json")
    assert code == 0
    (row,) = [json.loads(line) for line in out.splitlines()]
    p = expected_probabilities(read_landmarks(sample))
    order = np.argsort(-p, kind="stable")
    assert [s for s, _ in row["top"]] == [f"sign_{i}" for i in order]
    np.testing.assert_allclose([q for _, q in row["top"]], p[order], atol=1e-6, rtol=0)  # float32 sums


def test_label_map_must_agree_with_the_metadata(tmp_path: Path, sample: Path, label_map_file: Path) -> None:
    other = {f"other_{i}": i for i in range(SIGNS)}
    model = graph_file(tmp_path / "m.onnx", metadata={"label_map": json.dumps(other)})
    code, _, err = predict("--model", str(model), "--label-map", str(label_map_file), str(sample))
    assert code == 1 and err == f"Error: {model}: label_map in its metadata is not the one in {label_map_file}\n"
    same = graph_file(tmp_path / "same.onnx", metadata={"label_map": json.dumps(LABELS)})
    assert predict("--model", str(same), "--label-map", str(label_map_file), str(sample))[0] == 0


def test_bad_label_map_files(tmp_path: Path, sample: Path) -> None:
    model = graph_file(tmp_path / "m.onnx")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    listed = tmp_path / "list.json"
    listed.write_text('["TV", "after"]')
    gaps = tmp_path / "gaps.json"
    gaps.write_text(json.dumps({"a": 0, "b": 1, "c": 2, "d": 3, "e": 7}))
    cases = {
        tmp_path / "absent.json": "cannot read the label map (file not found)",
        fifo: "cannot read the label map (not a regular file (a FIFO))",
        listed: "an array, not an object {sign: index}",
        gaps: "the index 7 of 'e' is outside 0..4 (one index per sign)",
    }
    for path, reason in cases.items():
        code, out, err = predict("--model", str(model), "--label-map", str(path), str(sample))
        assert (code, out, err) == (1, "", f"Error: {path}: {reason}\n")


def test_label_map_is_for_model_files_only(tmp_path: Path, label_map_file: Path) -> None:
    code, _, err = predict("--checkpoint", str(label_map_file), "--label-map", str(label_map_file), "x.parquet")
    assert code == 2 and "--label-map applies to --model (a checkpoint holds its own label map)" in err


@pytest.mark.parametrize(
    ("kwargs", "part"),
    [
        ({"extra_output": True}, "outputs: 2 (outputs, second), not one of 5 values"),
        ({"input_shape": ["frames", 543]}, "input 'inputs': shape (T, 543), not (T, 543, 3)"),
        ({"input_shape": ["frames", 543, 2]}, "input 'inputs': shape (T, 543, 2), not (T, 543, 3)"),
        ({"input_shape": [1, "frames", 543, 3]}, "input 'inputs': shape (1, T, 543, 3), not (T, 543, 3)"),
        ({"input_shape": [20, 543, 3]}, "input 'inputs': a fixed length of 20 frames, not a dynamic T"),
        ({"input_type": TensorProto.DOUBLE}, "input 'inputs': float64, not float32"),
        ({"signs": 4}, "output 'outputs': shape (4,), not (5,) for the 5 signs of LABELS"),
    ],
)
def test_wrong_contract_names_the_part(
    tmp_path: Path, sample: Path, label_map_file: Path, kwargs: dict, part: str
) -> None:
    model = graph_file(tmp_path / "m.onnx", **kwargs)
    code, out, err = predict("--model", str(model), "--label-map", str(label_map_file), str(sample))
    part = part.replace("LABELS", str(label_map_file))
    assert (code, out, err) == (1, "", f"Error: {model}: not the contract of a sign model: {part}\n")


def test_an_ensemble_of_model_files_shares_the_label_map(tmp_path: Path, sample: Path, label_map_file: Path) -> None:
    a, b = graph_file(tmp_path / "a.onnx"), graph_file(tmp_path / "b.onnx")
    code, out, _ = predict(
        "--model", str(a), "--model", str(b), "--label-map", str(label_map_file), str(sample), "--format", "json"
    )
    assert code == 0
    top = json.loads(out)["top"]
    p = expected_probabilities(read_landmarks(sample))  # the mean of two equal members
    np.testing.assert_allclose(sorted((q for _, q in top), reverse=True), np.sort(p)[::-1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- stopping a long run

SLOW_GRAPH_NODES = 1000  # chained 1024 x 1024 products: about a minute of CPU, longer than the test waits

RUNNER = """
import sys
import numpy as np
from pipeline.location import stop_commands_on_signals
from train.modelfile import ModelFile
stop_commands_on_signals()  # as `asl-train` does: its SIGTERM handler must get to run
model = ModelFile(sys.argv[1], label_map=sys.argv[2])
print("running", flush=True)
model.logits(np.zeros((4, 543, 3), np.float32))
print("finished", flush=True)
"""


def slow_graph_file(path: Path, signs: int) -> Path:
    """(T, 543, 3) -> (signs,) through thousands of matrix products that depend on the input (nothing folds)."""
    nodes = [
        helper.make_node("ReduceSum", ["inputs"], ["total"], keepdims=0),
        helper.make_node("Mul", ["w", "total"], ["h0"]),
    ]
    for i in range(SLOW_GRAPH_NODES):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceSum", [f"h{SLOW_GRAPH_NODES}", "axes"], ["row"], keepdims=0))
    nodes.append(helper.make_node("Slice", ["row", "start", "stop"], ["outputs"]))
    w = np.eye(1024, dtype=np.float32) * 0.5
    initializers = [
        helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.tobytes(), raw=True),
        helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
        helper.make_tensor("start", TensorProto.INT64, [1], [0]),
        helper.make_tensor("stop", TensorProto.INT64, [1], [signs]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("inputs", TensorProto.FLOAT, ["frames", 543, 3])],
        [helper.make_tensor_value_info("outputs", TensorProto.FLOAT, [signs])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_long_onnxruntime_run(tmp_path: Path, label_map_file: Path, signum: int) -> None:
    model = slow_graph_file(tmp_path / "slow.onnx", SIGNS)
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(model), str(label_map_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert proc.stdout.readline() == "running\n"
        time.sleep(1)  # into the graph's run
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)  # without the worker thread: the whole graph first (minutes)
    finally:
        proc.kill()
        proc.wait()
    assert "finished" not in out and proc.returncode == -signum  # Python ends a KeyboardInterrupt as SIGINT does
    assert ("KeyboardInterrupt" in err) == (signum == signal.SIGINT)
