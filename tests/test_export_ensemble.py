"""`asl-train export` of several checkpoints as one ONNX file, and the model + metadata pair on disk.

The ensemble file is checked against `EnsembleScorer` over `CheckpointScorer`s (the numpy mean of each
PyTorch member's probabilities), the pair's kill points by real SIGKILLs in a subprocess.
"""

from __future__ import annotations

import errno
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

from pipeline.demo import generate_sequence
from pipeline.read import read_landmarks
from train.checkpoint import build_model, save_checkpoint
from train.cli import main as train_cli
from train.config import TrainConfig
from train.ensemble import EnsembleScorer
from train.modelpair import (
    ModelWriteError,
    legacy_metadata_path,
    metadata_path,
    settle_pair,
    sidecar_of,
    write_model_pair,
)
from train.predict import CheckpointScorer, iter_predictions

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")
pytest.importorskip("onnxscript", reason="the export extra is not installed: pip install -e '.[export]'")

from train.exportgraph import PROB_TOLERANCE, softmax  # noqa: E402
from train.modelfile import ModelFile  # noqa: E402

REAL_FILES = [SAMPLE_ROOT / rel for rel in sorted(SAMPLE_FRAMES)]
SIGNS = 20
LABEL_MAP = {f"sign_{i:02d}": i for i in range(SIGNS)}


def member(path: Path, seed: int, label_map: dict[str, int] = LABEL_MAP) -> Path:
    """An untrained tiny model, its weights scaled so that its probabilities are far from uniform."""
    cfg = TrainConfig(preset="tiny")
    torch.manual_seed(seed)
    model = build_model(cfg, len(label_map))
    state = {k: v * 3.0 if v.ndim >= 2 else v for k, v in model.state_dict().items()}
    save_checkpoint(
        path,
        {
            "model": state,
            "ema": None,
            "config": cfg.__dict__,
            "label_map": label_map,
            "step": 100 + seed,
            "epoch": seed,
        },
    )
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("members")
    return [member(base / f"fold{k}.pt", seed=k) for k in range(3)]


@pytest.fixture(scope="module")
def exported(members: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(ensemble.onnx, the CLI's output)."""
    out = tmp_path_factory.mktemp("ensemble") / "ensemble.onnx"
    checks = [a for p in REAL_FILES if p.exists() for a in ("--check", str(p))]
    args = ["export", *(a for m in members for a in ("--checkpoint", str(m))), "--out", str(out), *checks]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def sequences() -> list[tuple[str, np.ndarray]]:
    demo = [(f"T = {t}", generate_sequence(7, t, t % 5, t % 3, t)[1]) for t in (1, 2, 57, 384, 500)]
    return demo + [(str(p), read_landmarks(p)) for p in REAL_FILES if p.exists()]


def _export(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(train_cli, ["export", *args])
    return result.exit_code, result.output


# ---------------------------------------------------------------------------- the ensemble file


def test_ensemble_file_holds_every_member(exported: tuple[Path, str], members: list[Path]) -> None:
    path, output = exported
    data = path.read_bytes()
    assert output.startswith("parity: ") and ", top-1 equal, " in output
    assert f"wrote {path} ({len(data) / 1e6:.2f} MB, opset 20, 3 members, model weights) and " in output
    params = sum(v.numel() for v in torch.load(members[0], weights_only=True)["model"].values())
    assert len(data) >= 3 * 4 * params  # three members' float32 weights
    sidecar = json.loads(metadata_path(path).read_text())
    assert sidecar["sha256"] == hashlib.sha256(data).hexdigest() and sidecar["model"] == "ensemble.onnx"
    assert sidecar["label_map"] == LABEL_MAP
    assert sidecar["members"] == [
        {"checkpoint": str(m), "preset": "tiny", "weights": "model", "step": 100 + k, "epoch": k}
        for k, m in enumerate(members)
    ]
    assert "log of the mean probability of 3 members" in sidecar["output"]
    props = ModelFile(path).metadata
    assert json.loads(props["members"]) == sidecar["members"] and json.loads(props["label_map"]) == LABEL_MAP


def test_ensemble_onnx_equals_the_pytorch_ensemble(exported: tuple[Path, str], members: list[Path]) -> None:
    onnx = ModelFile(exported[0])
    scorers = [CheckpointScorer(m, device="cpu") for m in members]
    ensemble = EnsembleScorer(scorers, [str(m) for m in members])
    seen_disagreement = False
    for name, xyz in sequences():
        p_onnx = softmax(onnx.logits(xyz))
        p_members = [s.probabilities([xyz])[0] for s in scorers]
        p_mean = np.mean(p_members, axis=0)  # the reference, computed here again
        np.testing.assert_allclose(ensemble.probabilities([xyz])[0], p_mean, atol=1e-6, rtol=0)
        assert p_onnx.argmax() == p_mean.argmax(), name
        assert np.abs(p_onnx - p_mean).max() <= PROB_TOLERANCE, name
        assert abs(p_onnx.sum() - 1) < 1e-5
        # The members disagree, so a file holding one member only (or summing logits) would fail above.
        seen_disagreement |= min(np.abs(p - p_mean).max() for p in p_members) > 10 * PROB_TOLERANCE
    assert seen_disagreement


def test_predict_with_the_ensemble_file_equals_ensemble_predict(
    exported: tuple[Path, str], members: list[Path]
) -> None:
    files = [p for p in REAL_FILES if p.exists()] or pytest.skip("no real files")
    ensemble = EnsembleScorer([CheckpointScorer(m, device="cpu") for m in members], [str(m) for m in members])
    want = list(iter_predictions(ensemble, files, k=3))
    got = list(iter_predictions(ModelFile(exported[0]), files, k=3))
    for a, b in zip(got, want, strict=True):
        assert [s for s, _ in a.top] == [s for s, _ in b.top]
        np.testing.assert_allclose([q for _, q in a.top], [q for _, q in b.top], atol=PROB_TOLERANCE, rtol=0)


# ---------------------------------------------------------------------------- members that do not fit


def test_mixed_label_maps_refused_with_nothing_written(members: list[Path], tmp_path: Path) -> None:
    reordered = dict(zip(LABEL_MAP, reversed(LABEL_MAP.values()), strict=True))
    other = member(tmp_path / "other.pt", seed=9, label_map=reordered)
    out = tmp_path / "out" / "ensemble.onnx"
    code, output = _export("--checkpoint", str(members[0]), "--checkpoint", str(other), "--out", str(out))
    assert code == 1 and len(output.splitlines()) == 1
    assert output == (
        f"Error: {members[0]} and {other} have different label maps (the same {SIGNS} signs in "
        f"another order ('sign_00' is index 0 in one, {SIGNS - 1} in the other)); ensemble members "
        "must share one\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt"]


def test_a_member_that_is_not_a_checkpoint(members: list[Path], tmp_path: Path) -> None:
    foreign = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(300))
    for bad in (foreign, garbage):
        out = tmp_path / "out" / "model.onnx"
        code, output = _export("--checkpoint", str(members[0]), "--checkpoint", str(bad), "--out", str(out))
        assert code == 1 and len(output.splitlines()) == 1
        assert output.startswith(f"Error: {bad}: not an asl-train checkpoint: ")
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- --out


@pytest.mark.parametrize("name", ["m.json", "best.pt", "model", "model.onnx.bak"])
@pytest.mark.parametrize("fmt", [None, "onnx"])
def test_out_that_is_not_a_model_file_is_refused(
    members: list[Path], tmp_path: Path, name: str, fmt: str | None
) -> None:
    out = tmp_path / name
    out.write_text("precious")  # whatever stands there stays
    code, output = _export("--checkpoint", str(members[0]), "--out", str(out), *(["--format", fmt] if fmt else []))
    suffix = out.suffix or "no suffix"
    assert (code, output) == (1, f"Error: {out}: not a model file name ({suffix}); name it *.onnx or *.tflite\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name] and out.read_text() == "precious"


def test_format_that_contradicts_the_suffix(members: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    code, output = _export("--checkpoint", str(members[0]), "--out", str(out), "--format", "tflite")
    assert (code, output) == (1, f"Error: {out}: the suffix .onnx names the onnx format, not --format tflite\n")
    assert list(tmp_path.iterdir()) == []


def test_metadata_is_named_after_the_model_file() -> None:
    assert metadata_path("a/model.onnx") == Path("a/model.onnx.json")
    assert metadata_path("a/model.tflite") == Path("a/model.tflite.json")
    assert legacy_metadata_path("a/model.onnx") == Path("a/model.json")


def test_onnx_then_tflite_in_one_folder_keep_their_own_metadata(tmp_path: Path) -> None:
    onnx_file, tflite_file = tmp_path / "model.onnx", tmp_path / "model.tflite"
    write_model_pair(onnx_file, b"ONNX", {"format": "onnx"})
    write_model_pair(tflite_file, b"TFL3", {"format": "tflite"})
    assert_valid_pair_names(tmp_path, ["model.onnx", "model.onnx.json", "model.tflite", "model.tflite.json"])
    assert sidecar_of(onnx_file, b"ONNX") == {
        "model": "model.onnx",
        "sha256": hashlib.sha256(b"ONNX").hexdigest(),
        "format": "onnx",
    }
    assert sidecar_of(tflite_file, b"TFL3")["format"] == "tflite"
    assert sidecar_of(onnx_file, b"changed") is None  # the sha256 names other contents


def test_the_metadata_of_a_file_exported_before_is_still_read(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"OLD EXPORT")
    old = {"model": "model.onnx", "sha256": hashlib.sha256(b"OLD EXPORT").hexdigest(), "label_map": {"a": 0}}
    (tmp_path / "model.json").write_text(json.dumps(old))
    assert sidecar_of(model, b"OLD EXPORT") == old
    (tmp_path / "model.json").write_text(json.dumps({**old, "model": "model.tflite"}))  # the other format's
    assert sidecar_of(model, b"OLD EXPORT") is None
    (tmp_path / "model.json").write_text("[" * 100_000)
    assert sidecar_of(model, b"OLD EXPORT") is None


def assert_valid_pair_names(folder: Path, names: list[str]) -> None:
    assert sorted(p.name for p in folder.iterdir()) == names


# ---------------------------------------------------------------------------- the pair on disk


def pair_state(model: Path) -> tuple[bytes, dict]:
    return model.read_bytes(), json.loads(metadata_path(model).read_text())


def assert_valid_pair(model: Path, data: bytes, step: int) -> None:
    """The pair holds `data` and its metadata, and nothing is pending (a killed writer's lock file aside)."""
    got, sidecar = pair_state(model)
    assert got == data and sidecar["sha256"] == hashlib.sha256(data).hexdigest() and sidecar["step"] == step
    names = {p.name for p in model.parent.iterdir()} - {model.name + ".lock"}
    assert sorted(names) == sorted([metadata_path(model).name, model.name])


KILLER = """
import os, signal, sys
from pathlib import Path
import train.modelpair as mp
calls = {{"replace": 0, "fsync": 0}}
real = {{"replace": os.replace, "fsync": os.fsync}}
def patched(kind):
    def call(*args):
        calls[kind] += 1
        if (kind, calls[kind]) == ({kind!r}, {n}):
            os.kill(os.getpid(), signal.SIGKILL)
        return real[kind](*args)
    return call
mp.os.replace, mp.os.fsync = patched("replace"), patched("fsync")
mp.write_model_pair(Path(sys.argv[1]), b"NEW" * 1000, {{"step": 2}})
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "n", "after_kill", "settled"),
    [
        ("fsync", 1, "old", "discarded"),  # the pending model half-written
        ("fsync", 2, "old", "discarded"),  # the pending metadata half-written
        ("replace", 2, "old", "discarded"),  # the pending model written, the pending metadata half-way
        ("replace", 3, "old", "discarded"),  # both pending, nothing renamed
        ("replace", 4, "mismatch", "completed"),  # the metadata renamed (committed), the model not yet
    ],
)
def test_a_kill_leaves_the_old_pair_or_the_new_one(
    tmp_path: Path, kind: str, n: int, after_kill: str, settled: str
) -> None:
    model = tmp_path / "model.onnx"
    old, new = b"OLD" * 900, b"NEW" * 1000
    write_model_pair(model, old, {"step": 1})
    assert_valid_pair(model, old, 1)
    run = subprocess.run(
        [sys.executable, "-c", KILLER.format(kind=kind, n=n), str(model)],
        capture_output=True,
        cwd=Path(__file__).parents[1],
    )
    assert run.returncode == -9, run.stderr.decode()
    data, sidecar = pair_state(model)
    if after_kill == "old":
        assert data == old and sidecar["sha256"] == hashlib.sha256(old).hexdigest() and sidecar["step"] == 1
    else:  # what a reader sees between the renames: the sha256 does not match, so the pair does not look valid
        assert data == old and sidecar["step"] == 2 and sidecar["sha256"] != hashlib.sha256(data).hexdigest()
    assert settle_pair(model) == settled
    assert_valid_pair(model, old if settled == "discarded" else new, 1 if settled == "discarded" else 2)
    assert settle_pair(model) == "clean"
    write_model_pair(model, b"THIRD", {"step": 3})  # the next export starts from a settled pair
    assert_valid_pair(model, b"THIRD", 3)
    assert not (tmp_path / "model.onnx.lock").exists()  # the dead writer's lock, taken over and released


@pytest.mark.slow
def test_the_next_write_settles_an_interrupted_one(tmp_path: Path) -> None:
    model = tmp_path / "model.tflite"
    write_model_pair(model, b"old", {"step": 1})
    run = subprocess.run(
        [sys.executable, "-c", KILLER.format(kind="replace", n=4), str(model)], cwd=Path(__file__).parents[1]
    )
    assert run.returncode == -9
    write_model_pair(model, b"newer", {"step": 3})
    assert_valid_pair(model, b"newer", 3)


@pytest.mark.parametrize(("failing_call", "named"), [(1, "model.onnx"), (2, "model.onnx.json")])
def test_disk_full_names_the_file_and_keeps_the_old_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_call: int, named: str
) -> None:
    import train.modelpair as mp

    model = tmp_path / "model.onnx"
    write_model_pair(model, b"old", {"step": 1})
    calls = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == failing_call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(mp.os, "fsync", fsync)
    with pytest.raises(ModelWriteError) as info:
        write_model_pair(model, b"new" * 100, {"step": 2})
    assert str(info.value) == (
        f"{tmp_path / named}: cannot write (No space left on device); the previous {named}, if any, is unchanged"
    )
    monkeypatch.undo()
    assert_valid_pair(model, b"old", 1)  # no pending file left either


def test_disk_full_during_export_is_one_line(
    exported: tuple[Path, str], members: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import train.modelpair as mp
    import train.onnxexport as export

    data = exported[0].read_bytes()  # these members' graph, reused: the write is what is tested
    monkeypatch.setattr(export, "onnx_bytes", lambda module, metadata, opset: (data, 20))

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mp.os, "fsync", full)
    out = tmp_path / "model.onnx"
    code, output = _export(*(a for m in members for a in ("--checkpoint", str(m))), "--out", str(out))
    assert (code, output) == (
        1,
        f"Error: {out}: cannot write (No space left on device); the previous model.onnx, if any, is unchanged\n",
    )
    assert list(tmp_path.iterdir()) == []
