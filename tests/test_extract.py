"""`extract`'s parts that need no Holistic: the landmark file it writes, the inputs it accepts, frame selection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.extract import (
    ExtractError,
    landmark_table,
    parquet_bytes,
    plan_tasks,
)
from pipeline.landmarks import N_RAW, TYPE_OFFSETS
from pipeline.read import read_landmarks

ROOT = Path(__file__).resolve().parents[1]


def _sequence(frames: int, seed: int = 0) -> np.ndarray:
    """(T, 543, 3) float32-exact values, with the left hand missing in odd frames and the face in frame 0."""
    rng = np.random.default_rng(seed)
    xyz = rng.normal(0.5, 0.3, (frames, N_RAW, 3)).astype(np.float32).astype(np.float64)
    xyz[1::2, TYPE_OFFSETS["left_hand"] : TYPE_OFFSETS["left_hand"] + 21] = np.nan
    xyz[0, :468] = np.nan
    return xyz


def test_schema_and_rows_are_the_kaggle_files(tmp_path: Path, good_parquet: Path) -> None:
    kaggle = pq.read_table(good_parquet)
    ours = landmark_table(_sequence(3))
    assert ours.schema.remove_metadata() == kaggle.schema.remove_metadata()
    # one frame's type and landmark_index columns are the real file's, row for row
    for name in ("type", "landmark_index"):
        assert ours.column(name).to_pylist()[:N_RAW] == kaggle.column(name).to_pylist()[:N_RAW]
    frame = ours.column("frame").to_pylist()
    assert frame == [f for f in range(3) for _ in range(N_RAW)]
    columns = (frame, ours["type"].to_pylist(), ours["landmark_index"].to_pylist())
    expected_ids = [f"{f}-{t}-{i}" for f, t, i in zip(*columns, strict=True)]
    assert ours.column("row_id").to_pylist() == expected_ids
    assert ours.column("row_id").to_pylist()[468] == "0-left_hand-0"


def test_round_trip_through_the_reader(tmp_path: Path) -> None:
    xyz = _sequence(5)
    path = tmp_path / "seq.parquet"
    path.write_bytes(parquet_bytes(xyz))
    back = read_landmarks(path)
    assert back.shape == (5, N_RAW, 3)
    np.testing.assert_array_equal(back.astype(np.float64), xyz)  # NaN where NaN, every value exact
    assert np.isnan(back[1, 468:489]).all() and np.isfinite(back[0, 468:489]).all()


def test_same_landmarks_same_bytes() -> None:
    assert parquet_bytes(_sequence(4)) == parquet_bytes(_sequence(4))
    assert parquet_bytes(_sequence(4)) != parquet_bytes(_sequence(4, seed=1))


def _videos(tmp_path: Path) -> list[Path]:
    paths = []
    for name, content in (("a.mp4", b"one"), ("sub/b.webm", b"two"), ("sub/deeper/c.MOV", b"three")):
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        paths.append(path)
    (tmp_path / "in" / "notes.txt").write_text("not a video")
    return paths


def test_directories_lists_and_ids(tmp_path: Path) -> None:
    a, b, c = _videos(tmp_path)
    listing = tmp_path / "videos.txt"
    listing.write_text(f"# a comment\n\n{c}\n")
    tasks, rejects = plan_tasks([str(tmp_path / "in"), f"@{listing}"], participant="p7")
    # the directory: every video under it, recursively, sorted; c again through the list is a duplicate
    assert [t.source for t in tasks] == [str(a), str(b), str(c)]
    assert [r["source"] for r in rejects] == [str(c)] and "again" in rejects[0]["reason"]
    ids = [t.sequence_id for t in tasks]
    assert len(set(ids)) == 3 and all(i.isdigit() and not i.startswith("0") for i in ids)
    # ids come from the contents: the same bytes elsewhere get the same id
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(b"one")
    assert plan_tasks([copy])[0][0].sequence_id == ids[0]
    assert {t.participant_id for t in tasks} == {"p7"}
    assert tasks[0].relpath == f"train_landmark_files/p7/{ids[0]}.parquet"


def test_csv_input_and_row_rejects(tmp_path: Path) -> None:
    _videos(tmp_path)
    (tmp_path / "empty.mp4").write_bytes(b"")
    table = tmp_path / "videos.csv"
    table.write_text(
        "video,sign,participant_id,sequence_id\n"
        "in/a.mp4,happy,16069,100\n"
        "in/sub/b.webm,up,16069,007\n"
        "empty.mp4,up,16069,101\n"
        "in/sub/deeper/c.MOV,,../x,102\n"
        "missing.mp4,up,1,103\n"
        "in/a.mp4,happy,16069,100\n"
    )
    tasks, rejects = plan_tasks([table])
    assert [(t.source, t.sign, t.participant_id, t.sequence_id) for t in tasks] == [
        ("in/a.mp4", "happy", "16069", "100")
    ]
    assert tasks[0].path == str(tmp_path / "in" / "a.mp4")  # relative to the CSV
    reasons = {r["source"]: r["reason"] for r in rejects}
    assert "'007'" in reasons["in/sub/b.webm"] and "leading zeros" in reasons["in/sub/b.webm"]
    assert reasons["empty.mp4"] == "empty file (0 bytes)"
    assert "participant_id '../x'" in reasons["in/sub/deeper/c.MOV"]
    assert reasons["missing.mp4"] == "file not found"
    assert len(rejects) == 5  # the repeated row too


def test_input_problems_stop_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    (tmp_path / "bad.csv").write_text("file,label\nx.mp4,up\n")
    with pytest.raises(ExtractError, match="no video files under this directory"):
        plan_tasks([tmp_path / "nothing"])
    with pytest.raises(ExtractError, match=r"bad.csv: missing column\(s\) video, sign"):
        plan_tasks([tmp_path / "bad.csv"])
    with pytest.raises(ExtractError, match="absent.txt: cannot read the list of videos"):
        plan_tasks([f"@{tmp_path / 'absent.txt'}"])


@pytest.mark.video
def test_label_map_file_and_unknown_signs(tmp_path: Path) -> None:
    pytest.importorskip("mediapipe", reason="the video extra is not installed")
    from pipeline.extract import extract_videos

    (tmp_path / "v.mp4").write_bytes(b"")  # rejected before any decoding
    table = tmp_path / "videos.csv"
    table.write_text("video,sign\nv.mp4,happy\n")
    labels = tmp_path / "map.json"
    labels.write_text(json.dumps({"up": 0, "happy": 1}))
    result = extract_videos([table], tmp_path / "out", label_map=labels)
    assert result.exit_code == 3 and result.rows == []
    assert json.loads((tmp_path / "out" / "sign_to_prediction_index_map.json").read_text()) == {"happy": 1, "up": 0}
    assert (tmp_path / "out" / "train.csv").read_text() == "path,participant_id,sequence_id,sign,source\n"
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"reason": "empty file (0 bytes)", "sequence_id": "", "source": "v.mp4"}]


@pytest.mark.video
def test_a_model_complexity_the_wheel_does_not_ship_stops_with_one_line(tmp_path: Path) -> None:
    pytest.importorskip("mediapipe", reason="the video extra is not installed")
    from click.testing import CliRunner

    from pipeline.cli import main

    (tmp_path / "v.mp4").write_bytes(b"x")
    result = CliRunner().invoke(
        main, ["extract", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "o"), "--model-complexity", "2"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == (
        "Error: model complexity 2: its pose model pose_landmark_heavy.tflite is not in the installed mediapipe "
        "0.10.21 (available: 1)"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_offline_stage_imports_no_video_or_torch_library() -> None:
    code = (
        "import json, sys, pipeline.cli, pipeline.extract, pipeline.video, pipeline.holistic, pipeline.preview\n"
        "print(json.dumps([m for m in ('torch', 'mediapipe', 'cv2') if m in sys.modules]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(proc.stdout.splitlines()[-1]) == []


@pytest.mark.video
def test_one_extraction_at_a_time_writes_into_a_directory(tmp_path: Path) -> None:
    pytest.importorskip("mediapipe", reason="the video extra is not installed")
    from pipeline.extract import extract_videos
    from pipeline.files import LockHeldError, locked

    (tmp_path / "out").mkdir()
    (tmp_path / "v.mp4").write_bytes(b"")
    with locked(tmp_path / "out" / "extract.lock"), pytest.raises(LockHeldError, match="held by another process"):
        extract_videos([tmp_path / "v.mp4"], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
