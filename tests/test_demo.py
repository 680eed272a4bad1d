"""The synthetic demo dataset: exact Kaggle layout and schema, realistic statistics, determinism, a learnable sign."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import demo
from pipeline.demo import generate_sequence, plan_dataset, sample_lengths, write_demo_dataset
from pipeline.landmarks import N_RAW, TYPE_OFFSETS

ARGS = {"sequences": 40, "signs": 5, "participants": 4, "seed": 3}
HANDS = {"left_hand": TYPE_OFFSETS["left_hand"], "right_hand": TYPE_OFFSETS["right_hand"]}
POSE = slice(TYPE_OFFSETS["pose"], TYPE_OFFSETS["pose"] + 33)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A small demo dataset written once for the module: (root, summary)."""
    root = tmp_path_factory.mktemp("demo") / "data"
    return root, write_demo_dataset(root, **ARGS)


@pytest.fixture(scope="module")
def tables(dataset: tuple[Path, dict]) -> dict[str, pa.Table]:
    """Every written parquet file's full table, by path relative to the root."""
    root, _ = dataset
    return {p.relative_to(root).as_posix(): pq.read_table(p) for p in sorted(root.rglob("*.parquet"))}


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "train.csv", newline="") as f:
        return list(csv.DictReader(f))


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- layout


def test_layout_csv_and_label_map(dataset):
    root, summary = dataset
    assert (root / "train.csv").read_text().splitlines()[0] == "path,participant_id,sequence_id,sign"
    rows = _rows(root)
    assert len(rows) == ARGS["sequences"] == summary["sequences"]
    label_map = json.loads((root / "sign_to_prediction_index_map.json").read_text())
    assert list(label_map) == sorted(label_map)  # keys in code-point order
    assert list(label_map.values()) == list(range(ARGS["signs"]))
    assert {r["sign"] for r in rows} <= set(label_map)
    assert len({r["sequence_id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["path"] == f"train_landmark_files/{r['participant_id']}/{r['sequence_id']}.parquet"
        assert (root / r["path"]).is_file()
        assert r["participant_id"].isdigit() and len(r["participant_id"]) == 5
        assert r["sequence_id"].isdigit() and 6 <= len(r["sequence_id"]) <= 10
    assert len({r["participant_id"] for r in rows}) <= ARGS["participants"]
    files = sorted(p.relative_to(root).as_posix() for p in (root / "train_landmark_files").rglob("*"))
    assert [f for f in files if f.endswith(".parquet")] == sorted(r["path"] for r in rows)
    assert not [f for f in files if Path(f).name.startswith(".")]  # no temporary files left behind


KAGGLE_SCHEMA = pa.schema(
    [("frame", pa.int16()), ("row_id", pa.string()), ("type", pa.string()), ("landmark_index", pa.int16())]
    + [(c, pa.float64()) for c in "xyz"]
)


def test_schema_is_kaggles(tables):
    for table in tables.values():
        assert table.schema.equals(KAGGLE_SCHEMA)


def test_schema_equals_the_real_files(tables, sample_file: tuple[Path, int]):
    real = pq.read_schema(sample_file[0])
    assert real.equals(KAGGLE_SCHEMA)
    for table in tables.values():
        assert table.schema.equals(real, check_metadata=True)  # pandas metadata included


def test_files_pass_the_reader_with_the_planned_frame_counts(dataset):
    from pipeline.read import read_landmarks

    root, summary = dataset
    plan = plan_dataset(**ARGS)
    assert summary["frames"] == int(plan["frames"].sum())
    for rel, frames in zip(plan["path"].tolist(), plan["frames"].tolist(), strict=True):
        xyz = read_landmarks(root / rel)
        assert xyz.shape == (frames, N_RAW, 3)


def test_row_ids_and_frame_numbers(tables):
    firsts = []
    for table in tables.values():
        expected = pc.binary_join_element_wise(
            pc.cast(table.column("frame"), pa.string()),
            table.column("type"),
            pc.cast(table.column("landmark_index"), pa.string()),
            "-",
        )
        assert pc.all(pc.equal(table.column("row_id"), expected)).as_py()
        frames = table.column("frame").to_numpy()[::N_RAW]
        assert (np.diff(frames) > 0).all()
        firsts.append(int(frames[0]))
    assert any(f != 0 for f in firsts)
    assert 5 <= np.median(firsts) <= 60


def test_coordinates_are_float32_values_with_null_for_missing(tables):
    for table in tables.values():
        for c in "xyz":
            column = table.column(c)
            values = column.to_numpy()  # nulls become NaN
            assert column.null_count == np.isnan(values).sum()
            assert pc.sum(pc.is_nan(column)).as_py() in (None, 0)  # missing values are nulls, not stored NaN
            finite = values[~np.isnan(values)]
            np.testing.assert_array_equal(finite.astype(np.float32).astype(np.float64), finite)


def test_missing_values_come_in_whole_hands_and_faces(tables):
    hand_nan = hand_rows = 0
    for table in tables.values():
        xyz = np.stack([table.column(c).to_numpy() for c in "xyz"], axis=-1).reshape(-1, N_RAW, 3)
        nan = np.isnan(xyz)
        assert (nan.all(axis=-1) == nan.any(axis=-1)).all()  # x, y, z missing together
        assert not nan[:, POSE].any()
        for start in HANDS.values():
            hand = nan[:, start : start + 21, 0]
            assert (hand.all(axis=1) == hand.any(axis=1)).all()
            hand_nan += hand.sum()
            hand_rows += hand.size
        face = nan[:, :468, 0]
        assert (face.all(axis=1) == face.any(axis=1)).all()
    assert hand_nan > 0
    assert 0.3 < hand_nan / hand_rows < 0.95


def test_train_csv_is_written_last(tmp_path, monkeypatch):
    """A complete train.csv means a complete dataset: every parquet file and the label map come before it."""
    written: list[str] = []
    real_write = demo._write_atomic

    def recording_write(path: Path, write: Callable[[Path], object]) -> None:
        real_write(path, write)
        written.append(path.relative_to(root).as_posix())

    root = tmp_path / "data"
    monkeypatch.setattr(demo, "_write_atomic", recording_write)
    write_demo_dataset(root, sequences=6, signs=2, participants=2, seed=0, jobs=1)
    assert written[-2:] == ["sign_to_prediction_index_map.json", "train.csv"]
    assert sorted(written[:-2]) == sorted(r["path"] for r in _rows(root))


# ---------------------------------------------------------------- determinism


@pytest.mark.slow
def test_same_arguments_same_bytes_any_jobs(tmp_path, dataset):
    root, _ = dataset
    reference = _file_bytes(root)
    write_demo_dataset(tmp_path / "again", **ARGS)
    assert _file_bytes(tmp_path / "again") == reference
    write_demo_dataset(tmp_path / "parallel", **ARGS, jobs=2)
    assert _file_bytes(tmp_path / "parallel") == reference
    write_demo_dataset(tmp_path / "other", **(ARGS | {"seed": 4}))
    other = _file_bytes(tmp_path / "other")
    assert other["train.csv"] != reference["train.csv"]
    assert not set(other) & {k for k in reference if k.endswith(".parquet")}


def test_same_sequence_arguments_same_values_other_seed_differs():
    a = generate_sequence(7, 11, 2, 1, 30)
    b = generate_sequence(7, 11, 2, 1, 30)
    c = generate_sequence(8, 11, 2, 1, 30)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1], equal_nan=True)


# ---------------------------------------------------------------- statistics of the generated data


def test_length_distribution_is_like_the_real_one():
    lengths = sample_lengths(np.random.default_rng(0), 5000)
    assert 18 <= np.median(lengths) <= 27
    assert 30 <= lengths.mean() <= 46
    assert 90 <= np.percentile(lengths, 95) <= 160
    large = sample_lengths(np.random.default_rng(1), 100_000)
    assert large.min() >= 2 and large.max() <= 537
    assert 0.001 < (large > 384).mean() < 0.01
    planned = plan_dataset(3000, 25, 10, 0)["frames"]
    assert 18 <= np.median(planned) <= 27


def test_gaps_first_frames_and_face_dropouts_occur():
    plan = plan_dataset(400, 5, 5, 1)
    gaps = firsts_zero = face_frames = frames = 0
    for i, (k, p, n) in enumerate(zip(plan["sign"], plan["participant"], plan["frames"], strict=True)):
        numbers, xyz = generate_sequence(1, i, int(k), int(p), int(n))
        gaps += bool((np.diff(numbers) > 1).any())
        firsts_zero += numbers[0] == 0
        face_frames += np.isnan(xyz[:, :468, 0]).all(axis=1).sum()
        frames += len(numbers)
    assert 1 <= gaps <= 40
    assert firsts_zero < 40
    assert 0.001 < face_frames / frames < 0.03


def _crude_feature(xyz: np.ndarray) -> np.ndarray:
    """Mean position and mean shape of the more often detected hand, relative to the nose, in face units."""
    left, right = (np.isfinite(xyz[:, HANDS[h], 0]).sum() for h in ("left_hand", "right_hand"))
    start = HANDS["left_hand"] if left > right else HANDS["right_hand"]
    hand = xyz[:, start : start + 21, :2]
    seen = np.isfinite(hand[:, 0, 0])
    if not seen.any():
        return np.zeros(44)
    hand = (hand[seen] - np.nanmean(xyz[:, 1, :2], axis=0)) / np.nanstd(xyz[:, :468, 0])
    if left > right:  # mirror left-handers
        hand[..., 0] *= -1
    return np.concatenate([hand[:, 0].mean(axis=0), (hand - hand[:, :1]).mean(axis=0).ravel()])


def test_signs_are_learnable_but_not_from_the_length():
    signs = 5
    plan = plan_dataset(300, signs, 8, 5)
    features = np.array(
        [
            _crude_feature(generate_sequence(5, i, int(k), int(p), int(n))[1])
            for i, (k, p, n) in enumerate(zip(plan["sign"], plan["participant"], plan["frames"], strict=True))
        ]
    )
    y, test = plan["sign"], plan["participant"] < 2  # held-out participants
    mu, sd = features[~test].mean(axis=0), features[~test].std(axis=0) + 1e-9
    z = (features - mu) / sd
    centroids = np.array([z[~test & (y == k)].mean(axis=0) for k in range(signs)])
    predicted = np.argmin(((z[test][:, None] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    assert (predicted == y[test]).mean() > 0.6  # chance is 0.2

    log_len = np.log(plan["frames"])
    by_length = np.array([log_len[~test & (y == k)].mean() for k in range(signs)])
    predicted = np.argmin(np.abs(log_len[test][:, None] - by_length[None]), axis=1)
    assert (predicted == y[test]).mean() < 0.4
