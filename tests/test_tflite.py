"""`asl-train export --out model.tflite` and `predict --model model.tflite`: the LiteRT file against ONNX and PyTorch.

The checkpoint is the default preset (the deployed size) with 250 signs, untrained but with its weight matrices
scaled up so that its probabilities are far from uniform: a small difference in the logits then shows in the
probabilities. One ONNX and one LiteRT export of it are shared by the module (the LiteRT one through the CLI).
The references are the ONNX file run by onnxruntime and the PyTorch model on the pipeline's numpy preprocessing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLE_FRAMES, SAMPLE_ROOT, SHARED

from pipeline.demo import generate_sequence
from pipeline.landmarks import TYPE_OFFSETS, TYPE_SIZES
from pipeline.read import read_landmarks
from train.checkpoint import build_model, save_checkpoint
from train.cli import main as train_cli
from train.config import TrainConfig
from train.model import PRESETS

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")
pytest.importorskip("onnxscript", reason="the export extra is not installed: pip install -e '.[export]'")
NO_TFLITE = "the tflite extra is not installed: pip install -e '.[tflite]' (make test-tflite does)"
pytest.importorskip("ai_edge_litert.interpreter", reason=NO_TFLITE)
pytest.importorskip("tensorflow", reason=NO_TFLITE)

from train.exportgraph import PROB_TOLERANCE, ExportError, softmax, torch_logits  # noqa: E402
from train.modelfile import ModelFile, metadata_of  # noqa: E402
from train.modelpair import metadata_path  # noqa: E402
from train.onnxexport import export_onnx  # noqa: E402
from train.tflite import LOWERINGS, AtenToTF, aten_program, tflite_bytes  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.tflite]
REAL_FILES = [SAMPLE_ROOT / rel for rel in sorted(SAMPLE_FRAMES)]
SIGNS = 250
MAX_MB = 40.0  # the competition's limit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = TrainConfig(preset="default")
    torch.manual_seed(0)
    model = build_model(cfg, SIGNS)
    state = {k: v * 3.0 if v.ndim >= 2 else v for k, v in model.state_dict().items()}  # sharper probabilities
    path = tmp_path_factory.mktemp("tflite-ckpt") / "sharp.pt"
    save_checkpoint(
        path,
        {
            "model": state,
            "ema": None,
            "config": cfg.__dict__,
            "step": 0,
            "epoch": 0,
            "label_map": {f"sign_{i:03d}": i for i in range(SIGNS)},
        },
    )
    return path


@pytest.fixture(scope="module")
def onnx_file(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tflite-onnx") / "model.onnx"
    export_onnx(checkpoint, out)
    return out


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(model.tflite, the CLI's output), parity also checked on the real files."""
    out = tmp_path_factory.mktemp("tflite") / "model.tflite"
    checks = [a for p in REAL_FILES if p.exists() for a in ("--check", str(p))]
    result = CliRunner().invoke(train_cli, ["export", "--checkpoint", str(checkpoint), "--out", str(out), *checks])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def runners(exported: tuple[Path, str], onnx_file: Path) -> tuple[ModelFile, ModelFile]:
    return ModelFile(exported[0], threads=1), ModelFile(onnx_file, threads=1)


def demo(frames: int, seed: int = 3) -> np.ndarray:
    return generate_sequence(seed, frames, frames % 5, frames % 3, frames)[1]


def assert_same_as_onnx(runners: tuple[ModelFile, ModelFile], xyz: np.ndarray) -> None:
    litert, onnx = runners
    p_lite, p_onnx = softmax(litert.logits(xyz)), softmax(onnx.logits(xyz))
    assert p_lite.shape == (SIGNS,) and np.isfinite(p_lite).all()
    assert p_lite.argmax() == p_onnx.argmax()
    assert np.abs(p_lite - p_onnx).max() <= PROB_TOLERANCE
    assert p_onnx.max() > 0.3  # far from uniform (1/250): the comparison can see a difference


# ---------------------------------------------------------------------------- the file


def test_export_writes_the_contract(exported: tuple[Path, str], checkpoint: Path) -> None:
    path, output = exported
    data = path.read_bytes()
    assert data[4:8] == b"TFL3" and len(data) / 1e6 <= MAX_MB
    params = sum(v.numel() for v in torch.load(checkpoint, weights_only=True)["model"].values())
    assert len(data) >= 4 * params  # float32 weights: nothing was quantized away
    assert output.startswith("parity: 13 sequences (1..450 frames), top-1 equal, largest probability difference ")
    assert f"wrote {path} ({len(data) / 1e6:.2f} MB, model weights) and {metadata_path(path)}" in output
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["inputs"], "outputs": ["outputs"]}}
    (inp,) = interpreter.get_input_details()
    assert list(inp["shape_signature"]) == [-1, 543, 3] and inp["dtype"] == np.float32  # T dynamic
    sidecar = json.loads(metadata_path(path).read_text())
    import hashlib

    assert sidecar["sha256"] == hashlib.sha256(data).hexdigest() and sidecar["format"] == "tflite"
    assert sidecar["model"] == "model.tflite" and sidecar["weights"] == "model" and sidecar["max_len"] == 384
    label_map = {f"sign_{i:03d}": i for i in range(SIGNS)}
    assert sidecar["label_map"] == label_map
    meta = metadata_of(data)
    assert json.loads(meta["label_map"]) == label_map and ModelFile(path).label_map == label_map
    assert meta["input"] == sidecar["input"] and json.loads(meta["features_version"]) == sidecar["features_version"]


@pytest.mark.parametrize("frames", [1, 2, 3, 57, 384, 385, 500, 1000])
def test_litert_equals_onnx_on_any_length(runners, frames: int) -> None:
    assert_same_as_onnx(runners, demo(frames))


def test_litert_equals_onnx_on_real_files(runners, sample_file: tuple[Path, int]) -> None:
    path, frames = sample_file
    xyz = read_landmarks(path)
    assert len(xyz) == frames
    assert_same_as_onnx(runners, xyz)


@pytest.mark.parametrize("part", ["left_hand", "right_hand", "face"])
def test_litert_equals_onnx_with_a_part_missing(runners, part: str) -> None:
    xyz = demo(40)
    xyz[:, TYPE_OFFSETS[part] : TYPE_OFFSETS[part] + TYPE_SIZES[part]] = np.nan  # face: the origin falls back to 0.5
    assert_same_as_onnx(runners, xyz)


def test_litert_equals_pytorch(runners, checkpoint: Path) -> None:
    # The independent reference: the PyTorch model on the pipeline's numpy preprocessing (float64 statistics).
    from train.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(checkpoint))
    for xyz in [demo(1), demo(500)] + [read_landmarks(p) for p in REAL_FILES if p.exists()]:
        p_torch, p_lite = softmax(torch_logits(model, xyz)), softmax(runners[0].logits(xyz))
        assert p_lite.argmax() == p_torch.argmax() and np.abs(p_lite - p_torch).max() <= PROB_TOLERANCE


# ---------------------------------------------------------------------------- predict --model model.tflite


def _predict(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(train_cli, ["predict", *args])
    return result.exit_code, result.stdout, result.stderr


def test_predict_tflite_equals_onnx(exported: tuple[Path, str], onnx_file: Path, tmp_path: Path) -> None:
    files = [str(p) for p in REAL_FILES if p.exists()] or pytest.skip("no real files")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    renamed = tmp_path / "model.bin"  # the contents choose the runtime, not the suffix
    renamed.write_bytes(exported[0].read_bytes())
    runs = {}
    for model in (exported[0], renamed, onnx_file):
        code, out, _ = _predict("--model", str(model), *files, str(bad), "--format", "json", "--top", "3")
        assert code == 1  # the bad file
        runs[model] = [json.loads(line) for line in out.splitlines()]
    lite, again, onnx = runs.values()
    assert lite == again
    assert [r["path"] for r in lite] == files + [str(bad)] and lite[-1]["error"] and not lite[-1]["top"]
    for a, b in zip(lite[:-1], onnx[:-1], strict=True):
        assert [s for s, _ in a["top"]] == [s for s, _ in b["top"]]
        assert np.allclose([q for _, q in a["top"]], [q for _, q in b["top"]], atol=PROB_TOLERANCE, rtol=0)


def test_predict_broken_tflite_is_one_line(exported: tuple[Path, str], tmp_path: Path) -> None:
    broken = tmp_path / "model.tflite"
    broken.write_bytes(exported[0].read_bytes()[:4096])  # truncated: the header is right, the rest is missing
    code, out, err = _predict("--model", str(broken), str(REAL_FILES[0]))
    assert code == 1 and out == ""
    assert err.startswith(f"Error: {broken}: not a model ai-edge-litert can load (") and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------- bad input: one line, nothing written


def _export(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(train_cli, ["export", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize("fmt", [None, "tflite"])
def test_unknown_suffix(checkpoint: Path, tmp_path: Path, fmt: str | None) -> None:
    out = tmp_path / "model.pb"
    code, output = _export("--checkpoint", str(checkpoint), "--out", str(out), *(["--format", fmt] if fmt else []))
    assert (code, output) == (1, f"Error: {out}: not a model file name (.pb); name it *.onnx or *.tflite\n")
    assert list(tmp_path.iterdir()) == []


def test_opset_is_onnx_only(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.tflite"
    code, output = _export("--checkpoint", str(checkpoint), "--out", str(out), "--format", "tflite", "--opset", "20")
    assert (code, output) == (1, "Error: --opset applies to ONNX only, not to a .tflite export\n")
    assert list(tmp_path.iterdir()) == []


def test_foreign_checkpoint(tmp_path: Path) -> None:
    foreign = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    out = tmp_path / "out" / "model.tflite"
    code, output = _export("--checkpoint", str(foreign), "--out", str(out))
    assert code == 1 and len(output.splitlines()) == 1
    assert output.startswith(f"Error: {foreign}: not an asl-train checkpoint: expected a dict with model, config")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt"]  # not even the output directory


def test_unwritable_out(checkpoint: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output directory should be")
    out = blocker / "model.tflite"
    code, output = _export("--checkpoint", str(checkpoint), "--out", str(out))
    assert (code, output) == (1, f"Error: {out}: cannot write the output (Not a directory)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_failed_parity_writes_nothing(
    exported: tuple[Path, str], checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import train.checkedexport as checked
    import train.tflite as tflite

    data = exported[0].read_bytes()  # this checkpoint's conversion, reused: the runtime is what differs

    class Off(ModelFile):
        def logits(self, xyz: np.ndarray) -> np.ndarray:
            return super().logits(xyz) * 1.05  # a 5% sharper softmax: about 1e-3 in probability

    monkeypatch.setattr(checked, "ModelFile", Off)
    monkeypatch.setattr(tflite, "tflite_bytes", lambda module, metadata: data)
    out = tmp_path / "model.tflite"
    code, output = _export("--checkpoint", str(checkpoint), "--out", str(out))
    assert code == 1 and len(output.splitlines()) == 1
    assert output.startswith("Error: parity check failed on ") and " of 10 sequences, e.g. " in output
    assert "(ai-edge-litert) vs" in output and output.endswith("(tolerance 0.0001); nothing was written\n")
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_is_one_line(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if not installed
    out = tmp_path / "model.tflite"
    code, output = _export("--checkpoint", str(checkpoint), "--out", str(out))
    assert (code, output) == (
        1,
        "Error: tensorflow is not installed; it comes with the tflite extra: pip install -e '.[tflite]'\n",
    )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- the lowering, op by op


class Ops(torch.nn.Module):
    """Ops the sign model does not use, or uses only one way: a strided dilated conv, a full conv, masks,
    gathers, reductions over a dynamic axis, squeeze of a size that is 1 only for T = 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2)
        self.dw = torch.nn.Conv1d(4, 4, 5, padding=2, groups=4)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs[:, 10:20, :]  # (T, 10, 3)
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        h = self.dw(self.conv(x.permute(1, 2, 0)))  # (10, 4, T')
        h = self.norm(h.transpose(1, 2)).softmax(-1)  # (10, T', 4)
        present = (~torch.isnan(inputs[:, :, 0])).sum(0)  # (543,) int64
        frames = torch.arange(inputs.shape[0]).clamp(max=5)
        picked = inputs[frames][:, [3, 1], :].nan_to_num(0.0).sum((0, 2))  # (2,)
        return torch.cat([h.mean((0, 1)), present[:2].float() / inputs.shape[0], picked, h.amax(dim=(0, 1))])


def test_lowering_matches_torch_on_other_ops() -> None:
    module = Ops().eval()
    data = tflite_bytes(module, {"label_map": "{}"})
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=data).get_signature_runner("serving_default")
    for frames in (1, 2, 3, 9, 40):
        xyz = demo(frames)
        xyz[::2, 3] = np.nan
        with torch.no_grad():
            expected = module(torch.from_numpy(xyz)).numpy()
        got = runner(inputs=xyz)["outputs"]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"{frames} frames")


def test_an_op_without_lowering_is_named() -> None:
    class Cumsum(torch.nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return inputs.nan_to_num(0.0).cumsum(0)[-1, 0]

    lowering = AtenToTF(aten_program(Cumsum()))
    import tensorflow as tf

    with pytest.raises(ExportError, match=r"^no LiteRT lowering for aten\.cumsum\.default \(node cumsum\); add one"):
        tf.function(lowering, autograph=False).get_concrete_function(tf.TensorSpec([None, 543, 3], tf.float32))


# ---------------------------------------------------------------------------- ensembles


def test_two_member_ensemble_equals_onnx_and_the_pytorch_ensemble(tmp_path: Path) -> None:
    from train.ensemble import EnsembleScorer
    from train.predict import CheckpointScorer

    label_map = {f"sign_{i:02d}": i for i in range(20)}
    members = []
    for seed in (0, 1):
        cfg = TrainConfig(preset="tiny")
        torch.manual_seed(seed)
        state = {k: v * 3.0 if v.ndim >= 2 else v for k, v in build_model(cfg, 20).state_dict().items()}
        members.append(tmp_path / f"m{seed}.pt")
        save_checkpoint(
            members[-1],
            {"model": state, "ema": None, "config": cfg.__dict__, "label_map": label_map, "step": seed, "epoch": 0},
        )
    out = tmp_path / "ensemble.tflite"
    code, output = _export(*(a for m in members for a in ("--checkpoint", str(m))), "--out", str(out))
    assert code == 0, output
    assert ", 2 members, model weights) and " in output
    sidecar = json.loads(metadata_path(out).read_text())
    assert [m["checkpoint"] for m in sidecar["members"]] == [str(m) for m in members]
    assert json.loads(metadata_of(out.read_bytes())["members"]) == sidecar["members"]
    onnx_out = tmp_path / "ensemble.onnx"
    export_onnx(members, onnx_out)
    litert, onnx = ModelFile(out, threads=1), ModelFile(onnx_out)
    scorers = [CheckpointScorer(m, device="cpu") for m in members]
    ensemble = EnsembleScorer(scorers, [str(m) for m in members])
    xyzs = [demo(t) for t in (1, 2, 57, 500)] + [read_landmarks(p) for p in REAL_FILES if p.exists()]
    for xyz in xyzs:
        p_lite, p_onnx = softmax(litert.logits(xyz)), softmax(onnx.logits(xyz))
        p_torch = ensemble.probabilities([xyz])[0]
        np.testing.assert_allclose(p_torch, np.mean([s.probabilities([xyz])[0] for s in scorers], axis=0), atol=1e-6)
        assert p_lite.argmax() == p_onnx.argmax() == p_torch.argmax()
        assert np.abs(p_lite - p_torch).max() <= PROB_TOLERANCE and np.abs(p_lite - p_onnx).max() <= PROB_TOLERANCE


# ---------------------------------------------------------------------------- docs/deploy.md


def test_deploy_snippets_run(exported: tuple[Path, str], onnx_file: Path, tmp_path: Path, monkeypatch) -> None:
    # The doc's python blocks, run in order on a real file: pyarrow's reading equals the pipeline's reader, and
    # both runtimes give the exported models' results.
    import re
    import shutil

    source = next((p for p in REAL_FILES if p.exists()), None) or pytest.skip("no real files")
    shutil.copy(source, tmp_path / "sequence.parquet")
    shutil.copy(exported[0], tmp_path / "model.tflite")
    shutil.copy(metadata_path(exported[0]), tmp_path / "model.tflite.json")
    shutil.copy(onnx_file, tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    text = (Path(__file__).parents[1] / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "docs/deploy.md", "exec"), scope)
    xyz = read_landmarks(source)
    np.testing.assert_array_equal(scope["xyz"], xyz)
    np.testing.assert_array_equal(scope["tflite_logits"], ModelFile(exported[0]).logits(xyz))
    np.testing.assert_array_equal(scope["onnx_logits"], ModelFile(onnx_file).logits(xyz))
    assert scope["signs"] == {i: f"sign_{i:03d}" for i in range(SIGNS)}


# ---------------------------------------------------------------------------- any competition model

KITTU = SHARED / "videos" / "Kittu1209_model_89.tflite"
COMPETITION_MAP = SHARED / "gislr-sample" / "sign_to_prediction_index_map.json"


def test_a_third_party_competition_model_runs_with_the_label_map(shared_dir: Path) -> None:
    # A LiteRT model trained elsewhere on the full data, in the competition's contract, with no metadata of ours.
    sample = SAMPLE_ROOT / "16069" / "100015657.parquet"  # sign `cloud`, as the model's author states
    code, _, err = _predict("--model", str(KITTU), str(sample))
    assert code == 1 and err.startswith(f"Error: {KITTU}: no label_map in its metadata (not written by")
    code, out, _ = _predict("--model", str(KITTU), "--label-map", str(COMPETITION_MAP), str(sample), "--format", "json")
    assert code == 0
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["top"][0][0] == "cloud" and len(row["top"]) == 5
    # The same numbers as the runtime called as the competition's notebooks call it.
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(KITTU)).get_signature_runner("serving_default")
    p = softmax(runner(inputs=read_landmarks(sample))["outputs"].astype(np.float64))
    names = {i: s for s, i in json.loads(COMPETITION_MAP.read_text()).items()}
    order = np.argsort(-p, kind="stable")[:5]
    assert [s for s, _ in row["top"]] == [names[int(i)] for i in order]
    np.testing.assert_allclose([q for _, q in row["top"]], p[order], atol=1e-6, rtol=0)


def _litert_file(path: Path, fn, spec) -> Path:
    import tensorflow as tf

    holder = tf.Module()
    holder.serve = tf.function(fn, input_signature=spec, autograph=False)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([holder.serve.get_concrete_function()], holder)
    path.write_bytes(converter.convert())
    return path


def test_wrong_contract_litert_files_name_the_part(tmp_path: Path, shared_dir: Path) -> None:
    import tensorflow as tf

    sample = str(SAMPLE_ROOT / "16069" / "100015657.parquet")
    two = _litert_file(
        tmp_path / "two.tflite",
        lambda inputs: {"outputs": tf.reduce_sum(inputs, [0, 2])[:250], "extra": tf.reduce_sum(inputs)},
        [tf.TensorSpec([None, 543, 3], tf.float32, name="inputs")],
    )
    flat = _litert_file(
        tmp_path / "flat.tflite",
        lambda inputs: {"outputs": tf.reduce_sum(inputs, 0)[:250]},
        [tf.TensorSpec([None, 543], tf.float32, name="inputs")],
    )
    small = _litert_file(
        tmp_path / "small.tflite",
        lambda inputs: {"outputs": tf.reduce_sum(inputs, [0, 2])[:10]},
        [tf.TensorSpec([None, 543, 3], tf.float32, name="inputs")],
    )
    parts = {
        two: "outputs: 2 (extra, outputs), not one of 250 values",
        flat: "input 'inputs': shape (T, 543), not (T, 543, 3)",
        small: f"output 'outputs': shape (10,), not (250,) for the 250 signs of {COMPETITION_MAP}",
    }
    for model, part in parts.items():
        code, out, err = _predict("--model", str(model), "--label-map", str(COMPETITION_MAP), sample)
        assert (code, out, err) == (1, "", f"Error: {model}: not the contract of a sign model: {part}\n")


# ---------------------------------------------------------------------------- the registry of lowerings


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_has_a_lowering_for_each_op_and_passes_parity(preset: str) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from train.ensemble import EnsembleModel
    from train.exportgraph import LandmarkClassifier, builtin_sequences, parity_rows

    cfg = TrainConfig(preset=preset)
    torch.manual_seed(1)
    model = build_model(cfg, 30)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0 if p.ndim >= 2 else 1.0)  # sharper probabilities: a difference in the logits shows
    model.eval()
    ensemble = [EnsembleModel([model, build_model(cfg, 30).eval()]).eval()] if preset == "tiny" else []
    for exported in [model, *ensemble]:
        module = LandmarkClassifier(exported).eval()
        program = aten_program(module)
        ops = {n.target for n in program.graph.nodes if n.op == "call_function"}
        assert ops and not {str(op) for op in ops - set(LOWERINGS)}, "ATen ops without a LiteRT lowering"
        data = tflite_bytes(module, {"label_map": "{}"})
        runner = Interpreter(model_content=data).get_signature_runner("serving_default")
        label_map = {f"s{i}": i for i in range(30)}
        run = lambda xyz, r=runner: r(inputs=xyz)["outputs"]  # noqa: E731
        rows = parity_rows(run, exported, label_map, list(builtin_sequences()))
        assert all(r.ok for r in rows), [(r.name, r.max_prob_diff) for r in rows if not r.ok]


class Comparisons(torch.nn.Module):
    """Each comparison with a tensor and with a number, on values where equality also happens."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs[:, :4, 0].nan_to_num(0.0)  # (T, 4), 0 where the test put NaN
        y = torch.cat([x[:, :2], inputs[:, 4:6, 1].nan_to_num(0.0)], dim=1)  # equal to x in two columns
        ops = [torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge]
        tensor = [op(x, y) for op in ops]
        scalar = [op(x, 0.0) for op in ops]
        return torch.stack(tensor + scalar).float().sum((1, 2))  # (12,)


def test_comparisons_are_lowered_both_ways() -> None:
    module = Comparisons().eval()
    program = aten_program(module)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    for name in ("eq", "ne", "lt", "le", "gt", "ge"):
        assert {f"aten.{name}.Tensor", f"aten.{name}.Scalar"} <= ops
        assert getattr(torch.ops.aten, name).Tensor in LOWERINGS and getattr(torch.ops.aten, name).Scalar in LOWERINGS
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=tflite_bytes(module, {})).get_signature_runner("serving_default")
    for frames in (1, 7, 40):
        xyz = demo(frames)
        xyz[::2, :3, 0] = np.nan  # zeros once cleaned: equal to the number compared with
        with torch.no_grad():
            expected = module(torch.from_numpy(xyz)).numpy()
        np.testing.assert_array_equal(runner(inputs=xyz)["outputs"], expected)
