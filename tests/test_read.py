"""read_landmarks: real files read exactly; every malformed layout rejected with a clear reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.read import LandmarkFileError, read_landmarks

ROWS = 543


def independent_read(path: Path) -> np.ndarray:
    """(T, 543, 3) float64 straight from pandas, in file order (no sorting, no validation)."""
    df = pd.read_parquet(path)
    assert len(df) % ROWS == 0
    return df[["x", "y", "z"]].to_numpy(dtype=np.float64).reshape(len(df) // ROWS, ROWS, 3)


def with_column(table: pa.Table, name: str, values) -> pa.Table:
    """`table` with column `name` replaced (same position), values given as a pyarrow or numpy array."""
    array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    return table.set_column(table.schema.get_field_index(name), name, array)


def renumber(table: pa.Table, frame_numbers) -> pa.Table:
    """Give frame block i the number frame_numbers[i] (frame and row_id columns both)."""
    frames = np.repeat(np.asarray(frame_numbers, dtype=np.int16), ROWS)
    rest = [s.split("-", 1)[1] for s in table.column("row_id").to_pylist()]
    table = with_column(table, "frame", pa.array(frames, type=pa.int16()))
    return with_column(table, "row_id", pa.array([f"{f}-{r}" for f, r in zip(frames.tolist(), rest, strict=True)]))


def reject(path: Path, phrase: str) -> LandmarkFileError:
    with pytest.raises(LandmarkFileError) as info:
        read_landmarks(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == str(path)
    assert phrase in err.reason, err.reason
    assert str(path) in str(err)
    assert phrase in str(err)
    return err


# ---------------------------------------------------------------- accepted files


def test_real_files_read_exactly(sample_file):
    path, frames = sample_file
    got = read_landmarks(path)
    rows = pq.ParquetFile(path).metadata.num_rows
    assert rows == frames * ROWS
    assert got.shape == (frames, ROWS, 3)
    assert got.dtype == np.float32
    expected = independent_read(path)
    # The float64 values are float32 widened: the downcast must be exact, NaN kept where it is.
    np.testing.assert_array_equal(got.astype(np.float64), expected)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert not np.isinf(got).any()


def test_real_file_frames_start_past_zero_and_have_nans(shared_dir):
    # The 105-frame sample starts at frame 103 and has undetected hands (NaN rows).
    path = shared_dir / "gislr-sample/train_landmark_files/16069/100015657.parquet"
    assert pd.read_parquet(path, columns=["frame"])["frame"].iloc[0] == 103
    got = read_landmarks(path)
    assert got.shape == (105, ROWS, 3)
    hands = got[:, list(range(468, 489)) + list(range(522, 543))]
    assert np.isnan(hands).any()
    assert not np.isnan(got[:, 489:522]).any()  # pose never NaN


def test_frames_not_starting_at_zero_accepted(good_table, write_parquet):
    base = read_landmarks(write_parquet(good_table, "base.parquet"))
    frames = len(base)
    path = write_parquet(renumber(good_table, np.arange(1000, 1000 + frames)))
    np.testing.assert_array_equal(read_landmarks(path), base)


def test_gap_in_frame_numbers_accepted(good_table, write_parquet):
    base = read_landmarks(write_parquet(good_table, "base.parquet"))
    frames = len(base)
    numbers = np.arange(frames) + 5 * (np.arange(frames) >= 10) + 40 * (np.arange(frames) >= 20)
    assert (np.diff(numbers) > 1).sum() == 2
    path = write_parquet(renumber(good_table, numbers))
    got = read_landmarks(path)
    # Frames are indexed by position: the gap leaves the array unchanged (no inserted frames).
    assert got.shape == base.shape
    np.testing.assert_array_equal(got, base)


def test_nan_rows_kept(good_table, write_parquet):
    base = read_landmarks(write_parquet(good_table, "base.parquet"))
    x = good_table.column("x").to_numpy().copy()
    y = good_table.column("y").to_numpy().copy()
    z = good_table.column("z").to_numpy().copy()
    # Whole face of frame 4 missing, and a single row of frame 7 (a pose point) missing.
    face4 = slice(4 * ROWS, 4 * ROWS + 468)
    one = 7 * ROWS + 500
    for col in (x, y, z):
        col[face4] = np.nan
        col[one] = np.nan
    table = with_column(with_column(with_column(good_table, "x", x), "y", y), "z", z)
    got = read_landmarks(write_parquet(table))
    expected = base.copy()
    expected[4, :468] = np.nan
    expected[7, 500] = np.nan
    np.testing.assert_array_equal(got, expected)  # NaN positions must match too
    assert np.isnan(got[4, :468]).all()
    assert np.isnan(got[7, 500]).all()
    assert not np.isnan(got[7, 499]).any()


def test_many_row_groups_with_differing_type_dictionaries(good_table, write_parquet):
    # Row groups of 500 rows split frames, so each chunk's dictionary of types differs.
    base = read_landmarks(write_parquet(good_table, "base.parquet"))
    path = write_parquet(good_table, row_group_size=500)
    assert pq.ParquetFile(path).metadata.num_row_groups > 1
    np.testing.assert_array_equal(read_landmarks(path), base)


def test_wider_integer_and_string_types_accepted(good_table, write_parquet):
    base = read_landmarks(write_parquet(good_table, "base.parquet"))
    table = with_column(good_table, "frame", good_table.column("frame").cast(pa.int64()))
    table = with_column(table, "landmark_index", table.column("landmark_index").cast(pa.int32()))
    table = with_column(table, "type", table.column("type").cast(pa.large_string()))
    table = with_column(table, "x", table.column("x").cast(pa.float32()))
    np.testing.assert_array_equal(read_landmarks(write_parquet(table)), base)


def test_dictionary_encoded_type_accepted(good_table, write_parquet):
    # pandas writes a categorical column as a parquet dictionary column.
    base = read_landmarks(write_parquet(good_table, "base.parquet"))
    table = with_column(good_table, "type", good_table.column("type").dictionary_encode())
    path = write_parquet(table)
    assert pa.types.is_dictionary(pq.read_schema(path).field("type").type)
    np.testing.assert_array_equal(read_landmarks(path), base)


def test_path_given_as_str(good_parquet):
    np.testing.assert_array_equal(read_landmarks(str(good_parquet)), read_landmarks(good_parquet))


# ---------------------------------------------------------------- rejected files


@pytest.mark.parametrize("column", ["frame", "row_id", "type", "landmark_index", "x", "y", "z"])
def test_missing_column(good_table, write_parquet, column):
    path = write_parquet(good_table.drop_columns([column]))
    reject(path, f"missing column '{column}'")


@pytest.mark.parametrize(
    ("column", "make", "phrase"),
    [
        ("x", lambda c: c.cast(pa.string()), "column 'x' is string, expected floating-point"),
        ("y", lambda c: c.cast(pa.int64()), "column 'y' is int64, expected floating-point"),
        ("frame", lambda c: c.cast(pa.float64()), "column 'frame' is double, expected integer"),
        ("landmark_index", lambda c: c.cast(pa.string()), "column 'landmark_index' is string, expected integer"),
        ("row_id", lambda c: pa.array(np.arange(len(c), dtype=np.int64)), "column 'row_id' is int64, expected string"),
        ("type", lambda c: pa.array(np.zeros(len(c), dtype=np.int32)), "column 'type' is int32, expected string"),
    ],
    ids=["x-string", "y-int", "frame-float", "index-string", "row_id-int", "type-int"],
)
def test_mistyped_column(good_table, write_parquet, column, make, phrase):
    if column == "y":  # y must be integral to cast; round first (the values themselves do not matter)
        good_table = with_column(good_table, "y", np.nan_to_num(good_table.column("y").to_numpy()).round())
    table = with_column(good_table, column, make(good_table.column(column)))
    reject(write_parquet(table), phrase)


def test_row_count_not_multiple_of_543(good_table, write_parquet):
    n = good_table.num_rows - 1
    reject(write_parquet(good_table.slice(0, n)), f"{n} rows is not a multiple of 543")


def test_extra_row_not_multiple_of_543(good_table, write_parquet):
    table = pa.concat_tables([good_table, good_table.slice(good_table.num_rows - 1, 1)])
    reject(write_parquet(table), f"{good_table.num_rows + 1} rows is not a multiple of 543")


def test_zero_rows(good_table, write_parquet):
    empty = good_table.slice(0, 0)
    assert empty.schema == good_table.schema
    reject(write_parquet(empty), "no rows (zero frames)")


def test_left_hand_and_pose_blocks_swapped(good_table, write_parquet):
    # Frame block 3: face 0..467, pose 0..32, left_hand 0..20, right_hand 0..20.
    order = np.arange(good_table.num_rows)
    b = 3 * ROWS
    block = order[b : b + ROWS].copy()
    order[b : b + ROWS] = np.concatenate([block[:468], block[489:522], block[468:489], block[522:]])
    table = good_table.take(pa.array(order))
    assert table.column("type").to_pylist()[b + 468] == "pose"
    reject(write_parquet(table), "frame block 3: rows not in the order face 0..467, left_hand, pose, right_hand")


def test_rows_shuffled_within_frame(good_table, write_parquet):
    order = np.arange(good_table.num_rows)
    rng = np.random.default_rng(0)
    b = 5 * ROWS
    order[b : b + ROWS] = rng.permutation(order[b : b + ROWS])
    reject(write_parquet(good_table.take(pa.array(order))), "frame block 5: rows not in the order")


def test_landmark_index_order_within_type(good_table, write_parquet):
    # Types stay in order, but two face rows of frame block 6 are swapped.
    order = np.arange(good_table.num_rows)
    b = 6 * ROWS
    order[[b + 10, b + 11]] = order[[b + 11, b + 10]]
    reject(write_parquet(good_table.take(pa.array(order))), "frame block 6: landmark_index not 0..n-1 within each type")


def test_right_hand_rows_renumbered_from_one(good_table, write_parquet):
    index = good_table.column("landmark_index").to_numpy().copy()
    index[522:543] += 1  # frame block 0, right_hand 1..21
    table = with_column(good_table, "landmark_index", pa.array(index, type=pa.int16()))
    reject(write_parquet(table), "frame block 0: landmark_index not 0..n-1 within each type")


def test_unknown_type_value(good_table, write_parquet):
    types = good_table.column("type").to_pylist()
    types[2 * ROWS + 530] = "right-hand"
    reject(write_parquet(with_column(good_table, "type", pa.array(types))), "unknown landmark type 'right-hand'")


def test_null_type_value(good_table, write_parquet):
    # A null in `type` is malformed like an unknown name: it must be a LandmarkFileError, not a crash.
    types = good_table.column("type").to_pylist()
    types[ROWS + 57] = None
    path = write_parquet(with_column(good_table, "type", pa.array(types)))
    with pytest.raises(LandmarkFileError) as info:
        read_landmarks(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert info.value.reason


def test_mixed_frame_numbers_in_one_block(good_table, write_parquet):
    frame = good_table.column("frame").to_numpy().copy()
    frame[3 * ROWS - 1] = frame[3 * ROWS]  # last row of block 2 carries block 3's number
    table = with_column(good_table, "frame", pa.array(frame, type=pa.int16()))
    reject(write_parquet(table), "frame block 2: mixed frame numbers inside one 543-row block")


def test_frames_decreasing(good_table, write_parquet):
    frames = good_table.num_rows // ROWS
    numbers = np.arange(frames) + 21
    numbers[[4, 5]] = numbers[[5, 4]]
    reject(write_parquet(renumber(good_table, numbers)), "frame numbers are not strictly increasing")


def test_frames_repeated(good_table, write_parquet):
    frames = good_table.num_rows // ROWS
    numbers = np.arange(frames) + 21
    numbers[9] = numbers[8]
    reject(write_parquet(renumber(good_table, numbers)), "frame numbers are not strictly increasing")


@pytest.mark.parametrize(("column", "value"), [("x", np.inf), ("z", -np.inf), ("y", 1e300)])
def test_infinite_coordinate(good_table, write_parquet, column, value):
    # 1e300 is finite in the file but overflows the float32 array.
    values = good_table.column(column).to_numpy().copy()
    values[4 * ROWS + 100] = value
    reject(write_parquet(with_column(good_table, column, values)), "infinite coordinate values")


@pytest.mark.parametrize("statistics", [True, False], ids=["with-stats", "no-stats"])
@pytest.mark.parametrize("value", [1e300, -1e300, np.inf])
@pytest.mark.parametrize("coords", ["xy", "xyz"])
def test_z_beyond_float32_rejected_whether_decoded_or_not(good_table, write_parquet, coords, value, statistics):
    # z is not decoded with coords="xy": its column statistics (or a read) must still catch a value that is
    # finite in the file but inf as float32, exactly as decoding it does.
    z = good_table.column("z").to_numpy().copy()
    z[2 * ROWS + 7] = value
    path = write_parquet(with_column(good_table, "z", z), write_statistics=statistics)
    with pytest.raises(LandmarkFileError) as info:
        read_landmarks(path, coords=coords)
    assert info.value.reason == "infinite coordinate values"
    assert str(info.value) == f"{path}: infinite coordinate values"


@pytest.mark.parametrize("coords", ["xy", "xyz"])
def test_largest_float32_z_accepted(good_table, write_parquet, coords):
    z = good_table.column("z").to_numpy().copy()
    z[2 * ROWS + 7] = -float(np.finfo(np.float32).max)  # finite in float32: a valid (if absurd) value
    got = read_landmarks(write_parquet(with_column(good_table, "z", z)), coords=coords)
    assert got.shape == (good_table.num_rows // ROWS, ROWS, len(coords))


def test_truncated_file(good_parquet, tmp_path):
    data = good_parquet.read_bytes()
    path = tmp_path / "truncated.parquet"
    path.write_bytes(data[: len(data) // 2])
    reject(path, "not a readable parquet file")


def test_text_file(tmp_path):
    path = tmp_path / "notes.parquet"
    path.write_text("frame,row_id,type,landmark_index,x,y,z\n0,0-face-0,face,0,0.5,0.5,0.0\n")
    reject(path, "not a readable parquet file")


def test_missing_path(tmp_path):
    reject(tmp_path / "no_such_dir" / "1.parquet", "file not found")


def test_bad_file_without_row_id(bad_dir):
    reject(bad_dir / "webcam_no_row_id.parquet", "missing column 'row_id'")


def test_bad_file_with_wrong_types_and_order(bad_dir):
    reject(bad_dir / "webcam_wrong_types_and_order.parquet", "unknown landmark type 'right-hand'")
