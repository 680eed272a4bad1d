"""`asl-train export` and `predict --model/--format` and its inputs: the ONNX file against the PyTorch path.

One tiny checkpoint (EMA on, so the two weight sets differ) is trained once; one export of it is shared.
The reference is always the PyTorch model on the pipeline's numpy preprocessing (`compact_features`),
and once more the padded 384-frame route (`preprocess` with a mask), which shares no code with the graph's
handling of lengths.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLE_FRAMES, SAMPLE_ROOT
from demo_data import demo_dataset, demo_shards
from test_features import CASES

from pipeline.features import compact_features, preprocess
from pipeline.read import read_landmarks
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.cli import main as train_cli
from train.config import TrainConfig
from train.loop import train
from train.predict import expand_inputs

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install -e '.[export]'")
ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")
pytest.importorskip("onnxscript", reason="the export extra is not installed: pip install -e '.[export]'")

from train.exportgraph import (  # noqa: E402  (after the extra's skip)
    INPUT_NAME,
    OUTPUT_NAME,
    PROB_TOLERANCE,
    LandmarkClassifier,
    parity_rows,
    softmax,
)
from train.modelfile import ModelFile, ModelFileError, onnx_session  # noqa: E402
from train.modelpair import metadata_path  # noqa: E402
from train.onnxexport import export_onnx, onnx_bytes  # noqa: E402

pytestmark = pytest.mark.slow
REAL_FILES = [SAMPLE_ROOT / rel for rel in sorted(SAMPLE_FRAMES)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_dataset(tmp_path_factory.mktemp("export-data"), sequences=300, signs=5, participants=6)


@pytest.fixture(scope="module")
def checkpoint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("export-run")
    shards = demo_shards(base, data_dir, shard_size=40, folds=3)
    cfg = TrainConfig(
        shards=str(shards),
        out=str(base / "run"),
        preset="tiny",
        epochs=1,
        batch_size=32,
        workers=0,
        device="cpu",
        ema=0.9,
        lr=3e-3,
    )
    train(cfg)
    return base / "run" / "last.pt"


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """(model.onnx, ExportResult) of the checkpoint's EMA weights, parity also checked on the real files."""
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    checks = [p for p in REAL_FILES if p.exists()]
    return out, export_onnx(checkpoint, out, check_files=checks)


@pytest.fixture(scope="module")
def ema_model(checkpoint: Path) -> torch.nn.Module:
    return model_from_checkpoint(load_checkpoint(checkpoint), use_ema=True)


def demo_files(data_dir: Path, n: int = 12) -> list[Path]:
    return sorted((data_dir / "train_landmark_files").rglob("*.parquet"))[:n]


def pytorch_probs(model: torch.nn.Module, xyz: np.ndarray) -> np.ndarray:
    """The PyTorch reference: the pipeline's numpy features of the real frames, one sequence."""
    x, _ = compact_features(xyz)
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x)[None], torch.ones(1, len(x), dtype=torch.bool)), -1)[0].numpy()


def padded_probs(model: torch.nn.Module, xyz: np.ndarray) -> np.ndarray:
    """An independent route: the 384-frame padded tensor and its mask, as the reference notebook fed the model."""
    x, mask = preprocess(xyz)
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x)[None], torch.from_numpy(mask)[None]), -1)[0].numpy()


def assert_same_prediction(p_onnx: np.ndarray, p_torch: np.ndarray) -> None:
    assert p_onnx.shape == p_torch.shape
    assert p_onnx.argmax() == p_torch.argmax()
    np.testing.assert_allclose(p_onnx, p_torch, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- the exported graph


def test_export_writes_the_contract(exported: tuple[Path, object], checkpoint: Path) -> None:
    path, result = exported
    assert result.path == path and result.metadata_path == path.with_name("model.onnx.json")
    assert result.size == path.stat().st_size and result.weights == "ema" and result.opset == 20
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == INPUT_NAME and out.name == OUTPUT_NAME
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["frames", 543, 3]
    assert [d.dim_value for d in out.type.tensor_type.shape.dim] == [5]
    assert not list(path.parent.glob("*.tmp"))
    names = [row.name for row in result.parity]
    real = [str(p) for p in REAL_FILES if p.exists()]  # the --check files come first
    assert names[: len(real)] == real
    assert [row.frames for row in result.parity[: len(real)]] == [SAMPLE_FRAMES[p] for p in sorted(SAMPLE_FRAMES)][
        : len(real)
    ]
    assert {"T = 1", "T = 2", "T = 450 (truncated at 384)", "face missing in every frame"} <= set(names)
    assert len(names) == len(real) + 10
    assert all(row.ok for row in result.parity)


def test_label_map_round_trips_through_metadata_and_json(exported: tuple[Path, object], checkpoint: Path) -> None:
    path, _ = exported
    ckpt = load_checkpoint(checkpoint)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["label_map"]) == ckpt["label_map"]
    assert props["weights"] == "ema" and json.loads(props["features_version"]) == 1
    assert json.loads(props["step"]) == ckpt["step"]
    sidecar = json.loads(metadata_path(path).read_text())
    assert sidecar["label_map"] == ckpt["label_map"]
    assert sidecar["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sidecar["model"] == "model.onnx" and sidecar["opset"] == 20
    assert ModelFile(path).label_map == ckpt["label_map"]  # what predict --model reads


def test_onnx_equals_pytorch_on_real_files(exported: tuple[Path, object], ema_model, sample_file) -> None:
    path, frames = sample_file
    xyz = read_landmarks(path)
    assert len(xyz) == frames
    p_onnx = softmax(ModelFile(exported[0]).logits(xyz))
    assert_same_prediction(p_onnx, pytorch_probs(ema_model, xyz))
    assert_same_prediction(p_onnx, padded_probs(ema_model, xyz))


def test_onnx_equals_pytorch_on_demo_files(exported: tuple[Path, object], ema_model, data_dir: Path) -> None:
    session = ModelFile(exported[0])
    files = demo_files(data_dir)
    lengths = set()
    for f in files:
        xyz = read_landmarks(f)
        lengths.add(len(xyz))
        assert_same_prediction(softmax(session.logits(xyz)), pytorch_probs(ema_model, xyz))
    assert len(lengths) > 5  # many lengths, not one shape


EDGE_CASES = [
    "T1",
    "T2",
    "T3",
    "T384",
    "T385",
    "T500",
    "late_shift_500",
    "hands_missing",
    "face_missing",
    "all_nan",
    "single_point",
    "identical_points",
    "x_or_y_only_missing",
]


@pytest.mark.parametrize("name", EDGE_CASES)
def test_onnx_equals_pytorch_on_edge_cases(exported: tuple[Path, object], ema_model, name: str) -> None:
    xyz = CASES[name]()
    p_onnx = softmax(ModelFile(exported[0]).logits(xyz))
    assert np.isfinite(p_onnx).all()
    assert_same_prediction(p_onnx, pytorch_probs(ema_model, xyz))
    assert_same_prediction(p_onnx, padded_probs(ema_model, xyz))


def test_exported_features_equal_the_pipeline(tmp_path: Path) -> None:
    # The preprocessing alone through the same export: its output is the features, compared element-wise,
    # which a classifier's probabilities (pooled over frames) could hide.
    class Features(torch.nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return compact_features(inputs)[0]

    data, _ = onnx_bytes(Features(), {})
    session = onnx_session(data)
    (tmp_path / "features.onnx").write_bytes(data)
    with pytest.raises(ModelFileError, match=r"features\.onnx: no label_map in its metadata \(not written by"):
        ModelFile(tmp_path / "features.onnx")  # a valid ONNX file, but not a sign classifier of ours
    for name in ["T1", "T2", "T7", "T383", "T384", "T385", "late_shift_500", *EDGE_CASES[7:]]:
        xyz = CASES[name]()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: xyz})
        expected = compact_features(xyz)[0]
        assert got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=name)


def test_left_hand_missing_everywhere(exported: tuple[Path, object], ema_model) -> None:
    xyz = CASES["T50"]()
    xyz[:, 468:489] = np.nan  # the left hand only, the right one kept
    assert_same_prediction(softmax(ModelFile(exported[0]).logits(xyz)), pytorch_probs(ema_model, xyz))


@pytest.mark.parametrize("fast_convs", [False, True])
def test_torch_module_is_the_pipeline_route(ema_model, fast_convs: bool) -> None:
    # The module that is exported, run eagerly: equal to the numpy pipeline route to float32 rounding,
    # with the network's Conv1d layers as they are or as the Conv2d the export uses.
    module = LandmarkClassifier(ema_model, fast_convs=fast_convs).eval()
    kinds = [type(m).__name__ for m in module.modules()]
    # the tiny preset's depthwise conv and its ECA conv
    assert (kinds.count("Conv1dAs2d"), kinds.count("Conv1d")) == ((2, 0) if fast_convs else (0, 2))
    assert sum(isinstance(m, torch.nn.Conv1d) for m in ema_model.modules()) == 2  # the original is untouched
    for name in ("T1", "T385", "face_missing"):
        xyz = CASES[name]()
        with torch.no_grad():
            logits = module(torch.from_numpy(xyz)).numpy()
        x, _ = compact_features(xyz)
        with torch.no_grad():
            expected = ema_model(torch.from_numpy(x)[None], torch.ones(1, len(x), dtype=torch.bool))[0].numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- options and failures


def test_cli_export_no_ema_opset_18(checkpoint: Path, tmp_path: Path, shared_dir: Path) -> None:
    out = tmp_path / "sub" / "raw.onnx"
    path = REAL_FILES[0]
    result = CliRunner().invoke(
        train_cli,
        [
            "export",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--no-ema",
            "--opset",
            "18",
            "--check",
            str(path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (" in result.output and "opset 18, model weights" in result.output
    assert "parity: 11 sequences (1..450 frames), top-1 equal" in result.output
    assert {o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert json.loads(metadata_path(out).read_text())["weights"] == "model"
    raw = model_from_checkpoint(load_checkpoint(checkpoint), use_ema=False)
    ema = model_from_checkpoint(load_checkpoint(checkpoint), use_ema=True)
    xyz = read_landmarks(path)
    p_onnx = softmax(ModelFile(out).logits(xyz))
    assert_same_prediction(p_onnx, pytorch_probs(raw, xyz))
    assert np.abs(p_onnx - pytorch_probs(ema, xyz)).max() > 1e-3  # the other weights really differ


def test_failed_parity_writes_nothing(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import train.exportgraph as graph

    monkeypatch.setattr(graph, "torch_logits", _shifted(graph.torch_logits))
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(train_cli, ["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 1
    assert "Error: parity check failed on 10 of 10 sequences" in result.output
    assert "nothing was written" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_onnxruntime_failure_is_one_line_and_writes_nothing(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As `--opset 23` does with onnxruntime 1.32 (its Attention kernel refuses the model's key mask); faked here,
    # so the test does not depend on a runtime version.
    import train.checkedexport as export

    class Failing(ModelFile):
        def __init__(self, source, name="model") -> None:
            super().__init__(source, name=name)
            self.graph.run = self.fail

        def fail(self, x):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : kernel refused\nmore detail")

    monkeypatch.setattr(export, "ModelFile", Failing)
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(train_cli, ["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 1
    assert result.output == (
        "Error: onnxruntime cannot run the exported model on 'demo 23 frames' (23 frames): "
        "[ONNXRuntimeError] : 1 : FAIL : kernel refused; nothing was written\n"
    )
    assert list(tmp_path.iterdir()) == []


def _shifted(fn):
    def shifted(model, xyz):
        logits = fn(model, xyz).copy()
        logits[0] += 0.01  # about 2e-3 in probability: over the tolerance, top-1 unchanged or not
        return logits

    return shifted


def test_parity_rows_measure_the_difference(ema_model) -> None:
    class Session:  # onnxruntime's interface, returning the PyTorch logits plus a known error
        def __init__(self, delta: float) -> None:
            self.delta = delta

        def run(self, names, feeds):
            assert names == [OUTPUT_NAME] and list(feeds) == [INPUT_NAME]
            x, _ = compact_features(feeds[INPUT_NAME])
            with torch.no_grad():
                logits = ema_model(torch.from_numpy(x)[None], torch.ones(1, len(x), dtype=torch.bool))[0].numpy()
            return [logits + np.eye(len(logits), dtype=np.float32)[0] * self.delta]

        def logits(self, xyz):
            return self.run([OUTPUT_NAME], {INPUT_NAME: xyz})[0]

    labels = {f"s{i}": i for i in range(5)}
    xyz = CASES["T50"]()
    (same,) = parity_rows(Session(0.0).logits, ema_model, labels, [("a", xyz)])
    assert same.ok and same.max_prob_diff == 0.0 and same.frames == 50
    (off,) = parity_rows(Session(0.05).logits, ema_model, labels, [("a", xyz)])
    p = softmax(
        ema_model(torch.from_numpy(compact_features(xyz)[0])[None], torch.ones(1, 50, dtype=torch.bool))[0]
        .detach()
        .numpy()
    )
    shifted = p.copy()
    shifted[0] *= np.exp(0.05)
    expected = np.abs(shifted / shifted.sum() - p).max()
    assert off.max_prob_diff == pytest.approx(expected, rel=1e-3) and expected > PROB_TOLERANCE
    assert not off.ok


def test_unreadable_check_file_fails_before_exporting(checkpoint: Path, tmp_path: Path, bad_dir: Path) -> None:
    bad = bad_dir / "webcam_no_row_id.parquet"
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(
        train_cli, ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--check", str(bad)]
    )
    assert result.exit_code == 1
    assert (
        result.output.strip()
        == f"Error: {bad}: missing column 'row_id' (columns: type, landmark_index, x, y, z, frame)"
    )
    assert not out.exists()


# ---------------------------------------------------------------------------- predict


def _predict(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(train_cli, ["predict", *args])
    return result.exit_code, result.stdout, result.stderr


def test_predict_json_model_equals_checkpoint(exported, checkpoint: Path, data_dir: Path, bad_dir: Path) -> None:
    files = [str(f) for f in demo_files(data_dir, 6)] + [str(p) for p in REAL_FILES if p.exists()]
    files.insert(2, str(bad_dir / "webcam_no_row_id.parquet"))
    code_m, out_m, _ = _predict("--model", str(exported[0]), *files, "--format", "json", "--top", "3")
    code_c, out_c, _ = _predict(
        "--checkpoint", str(checkpoint), *files, "--format", "json", "--top", "3", "--device", "cpu"
    )
    assert code_m == code_c == 1  # one unreadable file
    rows_m = [json.loads(line) for line in out_m.splitlines()]
    rows_c = [json.loads(line) for line in out_c.splitlines()]
    assert [r["path"] for r in rows_m] == [r["path"] for r in rows_c] == files
    for m, c in zip(rows_m, rows_c, strict=True):
        assert set(m) == {"path", "top", "error"}
        assert m["error"] == c["error"]
        assert [s for s, _ in m["top"]] == [s for s, _ in c["top"]]
        np.testing.assert_allclose([q for _, q in m["top"]], [q for _, q in c["top"]], atol=1e-5)
    assert rows_m[2] == {"path": files[2], "top": [], "error": rows_c[2]["error"]}
    assert rows_m[2]["error"].startswith("missing column 'row_id'")
    assert all(len(r["top"]) == 3 for i, r in enumerate(rows_m) if i != 2)


def test_predict_text_model_equals_checkpoint(exported, checkpoint: Path, data_dir: Path) -> None:
    files = [str(f) for f in demo_files(data_dir, 4)]
    _, out_m, _ = _predict("--model", str(exported[0]), *files)
    _, out_c, _ = _predict("--checkpoint", str(checkpoint), *files, "--device", "cpu")
    assert out_m.splitlines()[0].startswith(f"{files[0]}: ")
    assert len(out_m.splitlines()) == 4
    assert [line.split(" ")[1::2] for line in out_m.splitlines()] == [
        line.split(" ")[1::2] for line in out_c.splitlines()
    ]  # the same signs in the same order


def test_predict_csv(exported, data_dir: Path, bad_dir: Path) -> None:
    files = [str(f) for f in demo_files(data_dir, 3)] + [str(bad_dir / "webcam_no_row_id.parquet")]
    code, out, err = _predict("--model", str(exported[0]), *files, "--format", "csv", "--top", "2")
    assert code == 1 and err == ""
    rows = list(csv.reader(out.splitlines()))
    assert rows[0] == ["path", "sign_1", "probability_1", "sign_2", "probability_2", "error"]
    assert [r[0] for r in rows[1:]] == files
    jsonl = [
        json.loads(line)
        for line in _predict("--model", str(exported[0]), *files, "--format", "json", "--top", "2")[1].splitlines()
    ]
    for row, obj in zip(rows[1:], jsonl, strict=True):
        assert len(row) == 6
        assert row[1::2][:2] == [s for s, _ in obj["top"]] or not obj["top"]
        assert [float(q) for q in row[2:5:2] if q] == [q for _, q in obj["top"]]  # full precision, as in JSON
        assert row[5] == (obj["error"] or "")
    assert rows[-1][1:5] == ["", "", "", ""]


def test_predict_needs_exactly_one_model(checkpoint: Path, exported, data_dir: Path) -> None:
    f = str(demo_files(data_dir, 1)[0])
    for args in ([f], ["--checkpoint", str(checkpoint), "--model", str(exported[0]), f]):
        result = CliRunner().invoke(train_cli, ["predict", *args])
        assert result.exit_code == 2
        assert "give exactly one of --checkpoint or --model" in result.output


def test_predict_model_that_is_not_onnx(tmp_path: Path, data_dir: Path) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not a model")
    code, out, err = _predict("--model", str(fake), str(demo_files(data_dir, 1)[0]))
    assert code == 1 and out == ""
    assert err.startswith(f"Error: {fake}: not a model onnxruntime can load") and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- predict inputs: directories and lists


def test_expand_inputs_directory_list_and_files(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    root = data_dir / "train_landmark_files"
    everything = sorted(root.rglob("*.parquet"))
    assert expand_inputs([root]) == everything  # recursive, sorted
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "x.parquet").write_bytes(b"")
    (tmp_path / "a" / "y.parquet").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("not parquet")
    assert expand_inputs([tmp_path / "a"]) == [tmp_path / "a/b/x.parquet", tmp_path / "a/y.parquet"]
    monkeypatch.chdir(tmp_path)
    first_dir = root / everything[0].parent.name
    Path("list.txt").write_text(f"# a comment\n\n{everything[3]}\n  a/y.parquet  \n{first_dir}\n")
    single = everything[1]
    got = expand_inputs([single, "@list.txt", "missing.parquet"])
    in_first_dir = sorted(first_dir.glob("*.parquet"))
    assert got == [single, everything[3], Path("a/y.parquet"), *in_first_dir, Path("missing.parquet")]


def test_expand_inputs_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no \*\.parquet files under this directory$"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(ValueError, match=r"nolist\.txt: cannot read the list of files \(file not found\)$"):
        expand_inputs([f"@{tmp_path / 'nolist.txt'}"])


def test_predict_directory_and_list_through_the_cli(exported, data_dir: Path, tmp_path: Path) -> None:
    root = data_dir / "train_landmark_files"
    folder = sorted(p for p in root.iterdir() if p.is_dir())[0]
    expected = sorted(folder.glob("*.parquet"))
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(str(p) for p in expected[:2]) + "\n")
    code, out, _ = _predict("--model", str(exported[0]), str(folder), f"@{listing}", "--format", "json")
    assert code == 0
    assert [json.loads(line)["path"] for line in out.splitlines()] == [str(p) for p in expected + expected[:2]]
    code, _, err = _predict("--model", str(exported[0]), "@" + str(tmp_path / "absent.txt"))
    assert code == 1 and "absent.txt: cannot read the list of files" in err


# ---------------------------------------------------------------------------- without the extra


def test_core_install_does_not_need_the_export_extra(tmp_path: Path) -> None:
    # onnx, onnxruntime and onnxscript made unimportable: the CLI still starts, and export and predict --model
    # fail with one line naming the extra.
    code = (
        "import sys\n"
        "for m in ('onnx', 'onnxruntime', 'onnxscript'): sys.modules[m] = None\n"
        "from click.testing import CliRunner\n"
        "from train.cli import main\n"
        "import train.export, train.predict\n"
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output\n"
        f"r = CliRunner().invoke(main, ['predict', '--model', {str(tmp_path / 'm.onnx')!r}, 'x.parquet'])\n"
        "print(r.exit_code, r.output.strip())\n"
        f"r = CliRunner().invoke(main, ['export', '--checkpoint', {str(tmp_path / 'c.pt')!r}, '--out', 'o.onnx'])\n"
        "print(r.exit_code, r.output.strip())\n"
    )
    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "c.pt").write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    hint = "it comes with the export extra: pip install -e '.[export]'"
    assert proc.stdout.splitlines() == [
        f"1 Error: onnxruntime is not installed; {hint}",
        f"1 Error: onnxscript is not installed; {hint}",
    ]
    assert not (tmp_path / "o.onnx").exists()


# ---------------------------------------------------------------------------- a file without our metadata


def test_exported_file_stripped_of_metadata_runs_with_label_map(exported, checkpoint: Path, tmp_path: Path) -> None:
    files = [str(p) for p in REAL_FILES if p.exists()] or pytest.skip("no real files")
    proto = onnx.load(str(exported[0]))
    del proto.metadata_props[:]  # as a model made elsewhere comes: the competition's contract, nothing of ours
    stripped = tmp_path / "stripped.onnx"
    stripped.write_bytes(proto.SerializeToString())
    labels = tmp_path / "sign_to_prediction_index_map.json"
    labels.write_text(json.dumps(load_checkpoint(checkpoint)["label_map"]))
    code, _, err = _predict("--model", str(stripped), files[0])
    assert code == 1 and err.startswith(f"Error: {stripped}: no label_map in its metadata (not written by")
    code, with_map, _ = _predict("--model", str(stripped), "--label-map", str(labels), *files, "--format", "json")
    assert code == 0
    code, ours, _ = _predict("--model", str(exported[0]), *files, "--format", "json")
    assert code == 0 and with_map == ours  # the same graph: the same signs and probabilities, bit for bit
    # The JSON beside it, written for these bytes, stands in for the stripped metadata.
    from train.modelpair import write_model_pair

    write_model_pair(stripped, stripped.read_bytes(), {"label_map": load_checkpoint(checkpoint)["label_map"]})
    code, from_sidecar, _ = _predict("--model", str(stripped), *files, "--format", "json")
    assert code == 0 and from_sidecar == ours
