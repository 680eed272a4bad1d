"""Videos as inputs of `asl-train predict` and `asl-train live`: extracted in-process by extract's code path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("mediapipe", reason="the video extra is not installed: pip install -e '.[video]'")

from pipeline.cli import main as pipeline_cli  # noqa: E402
from pipeline.landmarks import TYPE_OFFSETS  # noqa: E402
from pipeline.read import read_landmarks  # noqa: E402
from train.checkpoint import build_model, save_checkpoint  # noqa: E402
from train.cli import main as train_cli  # noqa: E402
from train.config import TrainConfig  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.video]

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
SIGNS = 7


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model: these tests check the route from a video to signs, not the signs."""
    if not VIDEOS.is_dir():
        pytest.skip(f"shared test data not found at {VIDEOS}")
    cfg = TrainConfig(preset="tiny")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    state = build_model(cfg, SIGNS).state_dict()
    label_map = {f"sign_{i}": i for i in range(SIGNS)}
    save_checkpoint(
        path, {"model": state, "ema": None, "config": cfg.__dict__, "step": 0, "epoch": 0, "label_map": label_map}
    )
    return path


def test_predict_reads_videos_beside_parquet_files(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("up.mp4", "face.mp4"):
        shutil.copyfile(VIDEOS / name, folder / name)
    (folder / "readme.txt").write_text("not an input")
    extracted = tmp_path / "out"
    result = CliRunner().invoke(pipeline_cli, ["extract", str(folder / "up.mp4"), "--out", str(extracted)])
    assert result.exit_code == 0, result.output
    (parquet,) = extracted.rglob("*.parquet")
    args = [
        "predict",
        "--checkpoint",
        str(checkpoint),
        "--format",
        "json",
        "--device",
        "cpu",
        str(folder),
        str(parquet),
    ]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 1, result.output  # face.mp4 cannot be read; the others are predicted
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [Path(p["path"]).name for p in lines] == ["face.mp4", "up.mp4", parquet.name]
    face, video, landmarks = lines
    assert face["error"] == "no frame decodes (the header claims 254970 frames at 90000 fps)" and face["top"] == []
    # the video's frames and hand share are those of the file extract wrote for it, and so are its signs
    xyz = read_landmarks(parquet)
    hands = np.r_[TYPE_OFFSETS["left_hand"], TYPE_OFFSETS["right_hand"]]
    assert video["frames"] == len(xyz) == 91
    assert video["hand_share"] == pytest.approx(np.isfinite(xyz[:, hands, 0]).any(axis=1).mean())
    assert 0 < video["hand_share"] < 1
    assert video["top"] == landmarks["top"] and video["error"] is None
    assert "frames" not in landmarks


def test_live_prints_a_line_per_signing_segment(checkpoint: Path) -> None:
    demo = VIDEOS / "Kittu1209_GISLR_demo.webm"
    args = ["live", "--source", str(demo), "--checkpoint", str(checkpoint), "--max-seconds", "16", "--device", "cpu"]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    pattern = re.compile(r"(\d+\.\d\d)-(\d+\.\d\d)s \((\d+) frames\): (sign_\d \d\.\d{3}, ){2}sign_\d \d\.\d{3}")
    spans = [pattern.fullmatch(line) for line in result.output.splitlines()]
    assert len(spans) == 2 and all(spans), result.output  # the recording's signs at about 2-6 s and 13-15 s
    (a0, a1, _), (b0, b1, _) = [tuple(float(g) for g in m.groups()[:3]) for m in spans]
    assert 1 < a0 < a1 < 7 and 12 < b0 < b1 < 16


def test_live_refuses_a_source_it_cannot_open(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "x.mp4").write_text("text")
    args = ["live", "--source", str(tmp_path / "x.mp4"), "--checkpoint", str(checkpoint)]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        result.output.strip()
        .splitlines()[-1]
        .endswith("x.mp4: OpenCV cannot open this source (a camera index, video file or stream URL)")
    )


LABELLED = {"HAPPY.mp4": ("happy", 90), "up.mp4": ("up", 91), "TASTE_GOOD.mp4": ("taste", 67)}


def test_a_competition_model_predicts_the_videos_directly(checkpoint: Path) -> None:
    pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")
    label_map = VIDEOS.parent / "gislr-sample" / "sign_to_prediction_index_map.json"
    model = VIDEOS / "Kittu1209_model_89.tflite"
    videos = [str(VIDEOS / name) for name in LABELLED]
    args = ["predict", "--model", str(model), "--label-map", str(label_map), "--format", "json", *videos]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    for line, (sign, frames) in zip(lines, LABELLED.values(), strict=True):
        assert sign in [s for s, _ in line["top"]] and line["frames"] == frames, line
