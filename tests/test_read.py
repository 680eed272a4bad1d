"""read_landmarks: real files read exactly; every malformed layout rejected with a clear reason."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.read import MB, InputFileError, LandmarkFileError, read_file, read_landmarks

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


@pytest.mark.parametrize("coords", ["xy", "xyz"])
def test_float16_coordinates_read_exactly(good_table, write_parquet, coords):
    """float16 widens to float32 without loss: the array is the file's values, bit for bit (NaN where NaN)."""
    table = good_table
    for c in "xyz":
        table = with_column(table, c, table.column(c).cast(pa.float16()))
    got = read_landmarks(write_parquet(table), coords=coords)
    want = np.stack([table.column(c).to_numpy().astype(np.float32) for c in coords], axis=-1)
    assert got.tobytes() == want.reshape(-1, ROWS, len(coords)).tobytes()
    assert np.isnan(got).any() and not np.isnan(got[:, 489:522]).any()  # the hands' NaN kept, pose never NaN


@pytest.mark.parametrize("coords", ["xy", "xyz"])
def test_float16_inf_rejected_whether_decoded_or_not(good_table, write_parquet, coords):
    # parquet float16 statistics come back from pyarrow as raw bytes: the reader must not trust them as numbers
    z = good_table.column("z").to_numpy().astype(np.float16)
    z[3 * ROWS + 2] = -np.inf
    path = write_parquet(with_column(good_table, "z", pa.array(z)))
    with pytest.raises(LandmarkFileError) as info:
        read_landmarks(path, coords=coords)
    assert info.value.reason == "infinite coordinate values"


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


def test_column_given_twice(good_table, write_parquet):
    table = pa.Table.from_arrays([*good_table.columns, good_table.column("x")], names=[*good_table.column_names, "x"])
    reject(write_parquet(table), "column 'x' appears more than once")


# ---------------------------------------------------------------- the input gate: regular files of bounded size


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "pipe.parquet"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock() -> None:  # if the reader wrongly blocks, a writer arrives after 10 s: the test fails, never hangs
        if not done.wait(10):
            os.close(os.open(fifo, os.O_WRONLY))

    guard = threading.Thread(target=unblock, daemon=True)
    guard.start()
    try:
        reject(fifo, "not a regular file (a FIFO)")
    finally:
        done.set()
        guard.join()


@pytest.mark.parametrize(("path", "kind"), [("/dev/zero", "a character device"), ("/dev/null", "a character device")])
def test_device_is_refused_without_reading_it(path, kind):
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    reject(Path(path), f"not a regular file ({kind})")


def test_directory_is_refused(tmp_path):
    (tmp_path / "dir.parquet").mkdir()
    reject(tmp_path / "dir.parquet", "not a regular file (a directory)")


def test_file_over_the_size_limit_is_refused_before_reading(good_parquet, tmp_path):
    size = good_parquet.stat().st_size
    assert read_landmarks(good_parquet, max_bytes=size).shape[0] == 30  # exactly at the limit: read
    err = reject_with(good_parquet, size - 1)
    assert err.reason == f"file of {size / MB:.1f} MB is over the {(size - 1) / MB:g} MB limit (--max-file-mb)"
    sparse = tmp_path / "huge.parquet"
    with open(sparse, "wb") as f:
        f.truncate(65 * MB)  # 65 MiB on paper, nothing on disk: refused from its size, never read
    with pytest.raises(LandmarkFileError, match="over the 64 MB limit"):
        read_landmarks(sparse)


def reject_with(path: Path, max_bytes: int) -> LandmarkFileError:
    with pytest.raises(LandmarkFileError) as info:
        read_landmarks(path, max_bytes=max_bytes)
    return info.value


def test_read_file_returns_the_bytes_and_names_the_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 1000)
    assert read_file(path, 1000) == b"x" * 1000
    with pytest.raises(InputFileError) as info:
        read_file(path, 999)
    assert str(info.value).startswith(f"{path}: file of 0.0 MB is over the ")
    with pytest.raises(InputFileError, match="file not found"):
        read_file(tmp_path / "absent", 1000)


def test_file_growing_while_read_is_refused(tmp_path, monkeypatch):
    """What is read must be what was checked: a file longer than its stat said (still being written) is refused."""
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 1000)
    real_fstat = os.fstat

    def stale_fstat(fd: int) -> os.stat_result:
        st = list(real_fstat(fd))
        st[6] = 400  # st_size, as when stat ran before the writer appended
        return os.stat_result(st)

    monkeypatch.setattr(os, "fstat", stale_fstat)
    with pytest.raises(InputFileError, match="file grew while being read"):
        read_file(path, 1000)


def small_file_of_a_huge_table(tmp_path: Path, frames: int, type_name: str = "face") -> Path:
    """A parquet file of `frames` constant frames: compressed, it stays small whatever it decodes to."""
    n = frames * ROWS
    table = pa.table(
        {
            "frame": pa.array(np.repeat(np.arange(frames, dtype=np.int16), ROWS)),
            "row_id": pa.array(["0-face-0"] * n),
            "type": pa.DictionaryArray.from_arrays(np.zeros(n, dtype=np.int32), [type_name]),
            "landmark_index": pa.array(np.zeros(n, dtype=np.int16)),
            **{c: pa.array(np.zeros(n)) for c in "xyz"},
        }
    )
    path = tmp_path / "bomb.parquet"
    pq.write_table(table, path, compression="zstd")
    return path


def test_small_file_declaring_too_many_rows_is_refused_before_decoding(tmp_path):
    path = small_file_of_a_huge_table(tmp_path, frames=200)  # 108,600 rows: 2.6 MB at 24 bytes a row
    assert path.stat().st_size < MB // 4
    err = reject_with(path, MB)
    assert (
        err.reason
        == "108600 rows (200 frames) decode to more than the 1 MB limit allows (--max-file-mb; at most 160 frames)"
    )
    with pytest.raises(LandmarkFileError, match="frame block 0: rows not in the order"):  # a larger limit admits it
        read_landmarks(path, max_bytes=2 * MB)


def test_small_file_decompressing_past_the_limit_is_refused(tmp_path):
    path = small_file_of_a_huge_table(tmp_path, frames=1, type_name="f" * (3 * MB))  # one 3 MB string
    assert path.stat().st_size < MB // 4
    err = reject_with(path, MB)
    assert err.reason.startswith("columns decompress to 3.0 MB, more than the 1 MB limit allows")


def test_reason_quoting_the_file_is_clipped(good_table, write_parquet):
    long_type = "hand" * 1000
    types = good_table.column("type").to_pylist()
    types[5] = long_type
    err = reject(write_parquet(with_column(good_table, "type", pa.array(types))), "unknown landmark type 'handhand")
    assert len(err.reason) < 200
