"""Which off-the-shelf PyTorch -> LiteRT converters handle the exported model: T kept dynamic, parity with PyTorch.

`train/tflite.py` lowers the model's ATen program by hand because no converter tried could keep the frame
axis dynamic. This bench tries each one again on the module `asl-train export` converts (the default preset,
untrained, its weights scaled up so that its probabilities are far from uniform): litert-torch (and its
nightly), onnx2tf on the exported ONNX file, nobuco. Each trial runs in a child process; a converter that is
not installed, does not install, does not import, fails to convert, freezes T or disagrees with PyTorch is a
row saying where it stopped, never a crash. The day one row says `dynamic T: yes, parity: yes`, the hand
lowering can go.

    .venv-tflite/bin/python bench/converters.py                      # the converters this Python has
    .venv-tflite/bin/python bench/converters.py --install /tmp/conv  # each one pip-installed first

`--install DIR` installs each converter (and the few packages it imports that the LiteRT venv lacks, listed in
`CONVERTERS`) with `pip install --no-deps --target DIR/NAME` and runs its trial with that directory on
PYTHONPATH, over this environment's torch and TensorFlow: nothing in the environment changes, and a converter
that needs other versions of them says so in its row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LITERT_TORCH_NEEDS = [
    "litert-converter==0.5.*",
    "ai-edge-quantizer==0.10.*",
    "multipledispatch",
    "jaxtyping",
    "tabulate",
    "jax",
    "jaxlib",
    "scipy",
    "opt-einsum",
    "torchao",
    "immutabledict",
    "xdsl",
    "safetensors",
    "wadler-lindig",
]
# name -> (pip requirement, module to import, the other packages it imports that this venv lacks). Those are
# installed with it, also without their own dependencies: torch, TensorFlow and numpy stay the venv's.
CONVERTERS = {
    "litert-torch": (
        "litert-torch",
        "litert_torch",
        LITERT_TORCH_NEEDS,
    ),
    "litert-torch-nightly": (
        "litert-torch-nightly",
        "litert_torch",
        LITERT_TORCH_NEEDS,
    ),
    "onnx2tf": ("onnx2tf", "onnx2tf", ["tf-keras==2.21.0", "onnx-graphsurgeon", "sng4onnx", "psutil"]),
    "nobuco": ("nobuco", "nobuco", ["sty", "rich"]),
}
SIGNS = 250
TRIAL_TIMEOUT_S = 1800


def exported_module() -> tuple[Any, Any]:
    """(the module `asl-train export` converts, the PyTorch model it wraps) for the default preset."""
    import torch

    from train.checkpoint import build_model
    from train.config import TrainConfig
    from train.exportgraph import LandmarkClassifier

    torch.manual_seed(0)
    model = build_model(TrainConfig(preset="default"), SIGNS)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0 if p.ndim >= 2 else 1.0)
    model.eval()
    return LandmarkClassifier(model).eval(), model


def litert_run(data: bytes) -> tuple[Any, bool]:
    """(a function (T, 543, 3) -> logits running the flatbuffer, whether its frame axis is dynamic)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    signatures = interpreter.get_signature_list()
    if signatures:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        (key, detail), (out_key, _) = (
            next(iter(runner.get_input_details().items())),
            next(iter(runner.get_output_details().items())),
        )
        dynamic = int(detail["shape_signature"][0]) == -1
        return (lambda xyz: np.asarray(runner(**{key: xyz})[out_key]).reshape(-1)), dynamic
    (inp,), out = interpreter.get_input_details(), interpreter.get_output_details()[0]
    dynamic = int(inp["shape_signature"][0]) == -1

    def run(xyz: np.ndarray) -> np.ndarray:
        interpreter.resize_tensor_input(inp["index"], list(xyz.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], xyz)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"]).reshape(-1)

    return run, dynamic


def convert_litert_torch(module: Any, example: Any, work: Path) -> bytes:
    import litert_torch
    import torch

    dims = {"inputs": {0: torch.export.Dim.DYNAMIC}}
    edge = litert_torch.convert(module, (example,), dynamic_shapes=dims)
    edge.export(str(work / "model.tflite"))
    return (work / "model.tflite").read_bytes()


def convert_onnx2tf(module: Any, example: Any, work: Path) -> bytes:
    import onnx2tf

    from train.onnxexport import onnx_bytes

    data, _ = onnx_bytes(module, {})
    (work / "model.onnx").write_bytes(data)
    onnx2tf.convert(
        input_onnx_file_path=str(work / "model.onnx"),
        output_folder_path=str(work / "out"),
        keep_shape_absolutely_input_names=["inputs"],
        non_verbose=True,
    )
    return next((work / "out").glob("*float32.tflite")).read_bytes()


def convert_nobuco(module: Any, example: Any, work: Path) -> bytes:
    import nobuco
    import tensorflow as tf

    keras_model = nobuco.pytorch_to_keras(
        module,
        args=[example],
        input_shapes={example: (None, 543, 3)},
        inputs_channel_order=nobuco.ChannelOrder.PYTORCH,
        outputs_channel_order=nobuco.ChannelOrder.PYTORCH,
    )
    return tf.lite.TFLiteConverter.from_keras_model(keras_model).convert()


CONVERT = {
    "litert-torch": convert_litert_torch,
    "litert-torch-nightly": convert_litert_torch,
    "onnx2tf": convert_onnx2tf,
    "nobuco": convert_nobuco,
}


def trial(name: str) -> dict[str, Any]:
    """One converter on the exported module: where it stopped, whether T stays dynamic, whether parity holds."""
    import importlib
    import importlib.metadata

    import torch

    from train.exportgraph import builtin_sequences, parity_rows

    row: dict[str, Any] = {"converter": name, "version": None, "dynamic_T": None, "parity": None}
    step = "import"
    try:
        row["version"] = importlib.metadata.version(CONVERTERS[name][0])
        importlib.import_module(CONVERTERS[name][1])
        step = "convert"
        module, model = exported_module()
        example = torch.from_numpy(next(s for _, s in builtin_sequences()))
        with tempfile.TemporaryDirectory() as work:
            data = CONVERT[name](module, example, Path(work))
        step = "load"
        run, row["dynamic_T"] = litert_run(data)
        step = "parity"
        label_map = {f"s{i}": i for i in range(SIGNS)}
        sequences = list(builtin_sequences()) if row["dynamic_T"] else [next(iter(builtin_sequences()))]
        rows = parity_rows(run, model, label_map, sequences, runtime=name)
        row["parity"] = all(r.ok for r in rows)
        row["largest_difference"] = max(r.max_prob_diff for r in rows)
        row["stopped_at"] = None
    except BaseException as exc:  # any failure of a third-party converter is a row
        lines = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
        row["stopped_at"] = step
        row["error"] = (lines[-1] if lines else type(exc).__name__)[:300]
    return row


def run_trial(name: str, install: Path | None) -> dict[str, Any]:
    """The trial of one converter in a child process (after installing it when `install` is given)."""
    env = dict(os.environ)
    if install is not None:
        target = install / name
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
        done = subprocess.run([*pip, CONVERTERS[name][0], *CONVERTERS[name][2]], capture_output=True, text=True)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["pip failed"])[-1][:300]
            return {"converter": name, "stopped_at": "install", "error": reason}
        env["PYTHONPATH"] = os.pathsep.join([str(target), str(ROOT)])
    else:
        env["PYTHONPATH"] = str(ROOT)
    try:
        child = subprocess.run(
            [sys.executable, __file__, "--trial", name],
            capture_output=True,
            text=True,
            env=env,
            timeout=TRIAL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"converter": name, "stopped_at": "convert", "error": f"no result in {TRIAL_TIMEOUT_S} s"}
    rows = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if not rows:
        reason = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1][:300]
        return {"converter": name, "stopped_at": "process", "error": reason}
    return json.loads(rows[-1])


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| converter | version | stopped at | dynamic T | parity | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        yes = {True: "yes", False: "no", None: "-"}
        note = r.get("error") or f"largest probability difference {r.get('largest_difference', 0):.1e}"
        lines.append(
            f"| {r['converter']} | {r.get('version') or '-'} | {r.get('stopped_at') or 'done'} | "
            f"{yes[r.get('dynamic_T')]} | {yes[r.get('parity')]} | {note.replace('|', '/')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", type=Path, help="pip-install each converter under this directory first")
    parser.add_argument("--only", choices=sorted(CONVERTERS), action="append", help="try only these converters")
    parser.add_argument("--trial", choices=sorted(CONVERTERS), help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.trial:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        print(json.dumps(trial(args.trial)), flush=True)
        return
    rows = [run_trial(name, args.install) for name in args.only or CONVERTERS]
    print(table(rows))


if __name__ == "__main__":
    main()
