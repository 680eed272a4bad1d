"""`asl-pipeline extract` on real sign videos with MediaPipe Holistic: layout, rejects, resume, determinism, the
Dask backend, and the route extract -> build-shards -> asl-train; a third-party competition model recognises
the extracted signs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("mediapipe", reason="the video extra is not installed: pip install -e '.[video]'")
cv2 = pytest.importorskip("cv2", reason="the video extra is not installed: pip install -e '.[video]'")

from pipeline.cli import main as pipeline_cli  # noqa: E402
from pipeline.read import read_landmarks  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.video]

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
LABELLED = {"HAPPY.mp4": ("happy", 90), "up.mp4": ("up", 91), "TASTE_GOOD.mp4": ("taste", 67)}
KAGGLE_MAP = VIDEOS.parent / "gislr-sample" / "sign_to_prediction_index_map.json"


def _videos() -> Path:
    if not VIDEOS.is_dir():
        pytest.skip(f"shared test data not found at {VIDEOS}")
    return VIDEOS


def extract(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(pipeline_cli, ["extract", *args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three labelled videos (three participants), face.mp4 and a text file, extracted with --jobs 2."""
    videos = _videos()
    tmp = tmp_path_factory.mktemp("labelled")
    (tmp / "notes.mp4").write_text("not a video\n")
    table = tmp / "videos.csv"
    rows = [f"{videos / name},{sign},{i + 1}" for i, (name, (sign, _)) in enumerate(LABELLED.items())]
    table.write_text("\n".join(["video,sign,participant_id", *rows, f"{videos / 'face.mp4'},up,9", "notes.mp4,up,9"]))
    code, output = extract(str(table), "--out", str(tmp / "out"), "--jobs", "2", "--label-map", str(KAGGLE_MAP))
    assert code == 3, output
    return tmp / "out"


def _train_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "train.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_layout_rejects_and_frames(labelled: Path) -> None:
    rows = _train_rows(labelled)
    assert [Path(r["source"]).name for r in rows] == list(LABELLED)
    assert [r["sign"] for r in rows] == [sign for sign, _ in LABELLED.values()]
    for r, (_, frames) in zip(rows, LABELLED.values(), strict=True):
        assert r["path"] == f"train_landmark_files/{r['participant_id']}/{r['sequence_id']}.parquet"
        xyz = read_landmarks(labelled / r["path"])
        assert xyz.shape == (frames, 543, 3)  # every decoded frame, no more, no less
        assert np.isfinite(xyz[:, 489:522]).all(axis=(1, 2)).mean() > 0.9  # the pose is found nearly everywhere
    rejects = [json.loads(line) for line in (labelled / "rejects.jsonl").read_text().splitlines()]
    reasons = {Path(r["source"]).name: r["reason"] for r in rejects}
    assert reasons == {
        "face.mp4": "no frame decodes (the header claims 254970 frames at 90000 fps)",
        "notes.mp4": "not a video OpenCV can open (unknown container or codec)",
    }
    assert json.loads((labelled / "sign_to_prediction_index_map.json").read_text()) == json.loads(
        KAGGLE_MAP.read_text()
    )


def test_a_competition_model_recognises_the_signs(labelled: Path) -> None:
    litert = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")
    runner = litert.Interpreter(model_path=str(VIDEOS / "Kittu1209_model_89.tflite")).get_signature_runner(
        "serving_default"
    )
    names = {i: s for s, i in json.loads(KAGGLE_MAP.read_text()).items()}
    for r in _train_rows(labelled):
        logits = runner(inputs=read_landmarks(labelled / r["path"]))["outputs"]
        top5 = [names[int(i)] for i in np.argsort(-logits)[:5]]
        assert r["sign"] in top5, (r["source"], top5)


def test_extract_then_build_shards_then_train(labelled: Path, tmp_path: Path) -> None:
    from train.cli import main as train_cli

    shards = tmp_path / "shards"
    result = CliRunner().invoke(
        pipeline_cli,
        [
            "build-shards",
            "--data-dir",
            str(labelled),
            "--out",
            str(shards),
            "--folds",
            "3",
            "--shard-size",
            "1",
            "--jobs",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 3
    args = [
        "--shards",
        str(shards),
        "--preset",
        "tiny",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--val-folds",
        "0",
        "--out",
        str(tmp_path / "run"),
    ]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "last.pt").is_file()


def _one_video(tmp_path: Path) -> Path:
    source = tmp_path / "in" / "up.mp4"
    source.parent.mkdir(exist_ok=True)
    shutil.copyfile(_videos() / "up.mp4", source)
    return source.parent


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


CAP = ["--max-frames", "8"]


def test_rerun_skips_and_same_bytes_twice(tmp_path: Path) -> None:
    videos = _one_video(tmp_path)
    code, output = extract(str(videos), "--out", str(tmp_path / "a"), "--jobs", "1", *CAP)
    assert code == 0 and "extracted 1 (8 frames" in output, output
    (landmarks,) = (tmp_path / "a" / "train_landmark_files" / "0").iterdir()
    stamp = landmarks.stat().st_mtime_ns
    code, output = extract(str(videos), "--out", str(tmp_path / "a"), "--jobs", "1", *CAP)
    assert code == 0 and "extracted 0 (0 frames" in output and "already there 1" in output, output
    assert landmarks.stat().st_mtime_ns == stamp
    code, output = extract(str(videos), "--out", str(tmp_path / "b"), "--jobs", "1", *CAP)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    code, output = extract(str(videos), "--out", str(tmp_path / "a"), "--jobs", "1", "--max-frames", "9")
    assert code == 1 and "extracted with other options" in output and len(output.strip().splitlines()) == 1, output


def test_dask_backend_writes_the_same_bytes(tmp_path: Path) -> None:
    pytest.importorskip("dask.distributed", reason="dask[distributed] is not installed")
    videos = _one_video(tmp_path)
    shutil.copyfile(_videos() / "TASTE_GOOD.mp4", videos / "taste.mp4")
    code, output = extract(str(videos), "--out", str(tmp_path / "local"), "--jobs", "2", *CAP)
    assert code == 0, output
    code, output = extract(str(videos), "--out", str(tmp_path / "dask"), "--jobs", "2", "--scheduler", "local", *CAP)
    assert code == 0 and "extracted 2 (16 frames" in output, output
    assert _files(tmp_path / "local") == _files(tmp_path / "dask")


def test_preview_and_a_video_without_a_person(tmp_path: Path) -> None:
    from PIL import Image

    videos = _one_video(tmp_path)
    writer = cv2.VideoWriter(str(videos / "empty_room.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for i in range(6):
        writer.write(np.full((120, 160, 3), 40 + 10 * i, dtype=np.uint8))
    writer.release()
    code, output = extract(str(videos), "--out", str(tmp_path / "out"), "--preview", str(tmp_path / "p"), *CAP)
    assert code == 3 and "empty_room.avi: no person found in any of its 6 frames" in output, output
    (row,) = _train_rows(tmp_path / "out")
    with Image.open(tmp_path / "p" / f"{row['sequence_id']}.gif") as gif:
        assert gif.n_frames == 8 and max(gif.size) == 240
