"""build-shards under bad inputs and faults (issue 9): a one-line reason, never a traceback or a hang.

Every test starts from the three real sample files of the shared data's gislr-sample, adds one bad
input or fault, runs the real CLI and checks the exit status, that the message names the
file and the problem, that nothing crashed, and that every good input still lands in the shards.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from decoded import iter_samples
from demo_data import demo_dataset

from pipeline import build as build_mod
from pipeline import shards as shards_mod
from pipeline.build import LOCK, MAX_ID_DIGITS, output_lock
from pipeline.cli import main
from pipeline.features import compact_features
from pipeline.read import clip, read_landmarks
from pipeline.shards import FeatureRangeError, iter_members, verify_shards

ROOT = Path(__file__).resolve().parents[1]
LABEL_MAP = "sign_to_prediction_index_map.json"
COLUMNS = ("path", "participant_id", "sequence_id", "sign")
SHORT = "train_landmark_files/22343/239181.parquet"  # the real 30-frame file
BIG = "train_landmark_files/16069/100015657.parquet"  # the real 105-frame file, 1.6 MB
BAD = "train_landmark_files/11111"  # where the tests put their bad inputs


# ---------------------------------------------------------------- helpers


@pytest.fixture
def data(tmp_path: Path, sample_data: Path) -> Path:
    """A writable copy of the real sample dataset (3 files, 3 participants)."""
    out = tmp_path / "data"
    shutil.copytree(sample_data, out)
    for p in [out, *out.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (out / BAD).mkdir()
    return out


@pytest.fixture
def good_ids(sample_data: Path) -> list[str]:
    """The sequence ids of the real sample dataset, sorted."""
    with open(sample_data / "train.csv", newline="") as f:
        return sorted(r["sequence_id"] for r in csv.DictReader(f))


def append_rows(data: Path, *rows: dict[str, str] | str) -> None:
    """Add rows to train.csv: dicts of the four columns, or raw text lines."""
    with open(data / "train.csv", "a", newline="") as f:
        for row in rows:
            f.write(row + "\n" if isinstance(row, str) else ",".join(row[c] for c in COLUMNS) + "\n")


def row(path: str, sequence_id: str = "5000", sign: str = "hello", participant: str = "11111") -> dict[str, str]:
    return {"path": path, "participant_id": participant, "sequence_id": sequence_id, "sign": sign}


def build(data: Path, out: Path, *extra: str) -> Result:
    args = ["build-shards", "--data-dir", data, "--out", out, "--jobs", "1", "--shard-size", "2", "--folds", "2"]
    return CliRunner().invoke(main, [str(a) for a in [*args, *extra]])


def check_exit(result: Result, code: int) -> None:
    """The exit status, and no exception other than the CLI's own exit (CliRunner would swallow a traceback)."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def landed(out: Path) -> list[str]:
    """The sequence ids in the shards, checked against the manifest and decoded; sorted."""
    manifest = json.loads((out / "manifest.json").read_text())
    in_manifest = sorted(i for s in manifest["shards"] for i in s["sequence_ids"])
    in_shards = sorted(key for tar in out.glob("*.tar") for key, _ in iter_members(tar))
    assert in_shards == in_manifest and manifest["totals"]["samples"] == len(in_shards)
    assert verify_shards(out) == []
    return in_shards


def rejects_of(out: Path) -> list[dict[str, str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    lines = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert lines == manifest["rejects"] and manifest["totals"]["rejected"] == len(lines)
    return lines


def with_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


@contextlib.contextmanager
def fifo_guard(*fifos: Path, seconds: float = 10.0) -> Iterator[None]:
    """Bound a test that reads FIFOs: after `seconds`, open their write ends so a blocked reader sees end of file.

    A reader that (wrongly) waits for a writer then fails its assertions instead of hanging the suite.
    """
    done = threading.Event()

    def release() -> None:
        if done.wait(seconds):
            return
        while not done.wait(0.1):
            for fifo in fifos:
                with contextlib.suppress(OSError):  # ENXIO: no reader waiting yet
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    guard = threading.Thread(target=release, daemon=True)
    guard.start()
    try:
        yield
    finally:
        done.set()
        guard.join()


# ---------------------------------------------------------------- one bad landmark file: a reject, the rest lands


def _outside_file(data: Path) -> str:
    shutil.copyfile(data / SHORT, data.parent / "outside.parquet")
    os.symlink(data.parent / "outside.parquet", data / BAD / "a.parquet")
    return f"{BAD}/a.parquet"


def _outside_dir(data: Path) -> str:
    (data.parent / "elsewhere").mkdir()
    shutil.copyfile(data / SHORT, data.parent / "elsewhere" / "b.parquet")
    os.symlink(data.parent / "elsewhere", data / "train_landmark_files" / "22222")
    return "train_landmark_files/22222/b.parquet"


def _dev_zero(data: Path) -> str:
    os.symlink("/dev/zero", data / BAD / "zero.parquet")
    return f"{BAD}/zero.parquet"


def _fifo(data: Path) -> str:
    os.mkfifo(data / BAD / "pipe.parquet")
    return f"{BAD}/pipe.parquet"


def _fifo_via_symlink(data: Path) -> str:
    os.mkfifo(data / BAD / "pipe")
    os.symlink("pipe", data / BAD / "link.parquet")
    return f"{BAD}/link.parquet"


def _directory(data: Path) -> str:
    (data / BAD / "dir.parquet").mkdir()
    return f"{BAD}/dir.parquet"


def _over_limit(data: Path) -> str:
    with open(data / BAD / "huge.parquet", "wb") as f:
        f.truncate(65 << 20)  # sparse: 65 MiB on paper, nothing on disk
    return f"{BAD}/huge.parquet"


def _broken_symlink(data: Path) -> str:
    os.symlink("gone.parquet", data / BAD / "broken.parquet")
    return f"{BAD}/broken.parquet"


def _same_path(data: Path) -> str:
    return SHORT


def _same_path_spelled_otherwise(data: Path) -> str:
    return SHORT.replace("/22343/", "/./22343//")


def _same_file_via_symlink(data: Path) -> str:
    os.symlink(data / SHORT, data / BAD / "alias.parquet")
    return f"{BAD}/alias.parquet"


def _path_of_200_kb(data: Path) -> str:
    return "a/" * 100_000 + "x.parquet"


def _float16_inf_in_z(data: Path) -> str:
    """float16 coordinates (accepted) with one inf in z, which the features never decode (float16 statistics)."""
    table = pq.read_table(data / SHORT)
    z = table.column("z").to_numpy().astype(np.float16)
    z[1000] = np.inf
    table = with_column(table, "z", pa.array(z))
    for c in "xy":
        table = with_column(table, c, table.column(c).cast(pa.float16()))
    pq.write_table(table, data / BAD / "f16inf.parquet")
    return f"{BAD}/f16inf.parquet"


FILE_CASES: dict[str, tuple[Callable[[Path], str], str]] = {
    "symlink-leaving-data-dir": (_outside_file, "outside the data directory"),
    "symlinked-dir-leaving-data-dir": (_outside_dir, "outside the data directory"),
    "symlink-to-dev-zero": (_dev_zero, "outside the data directory"),
    "fifo": (_fifo, "not a regular file (a FIFO)"),
    "fifo-via-symlink": (_fifo_via_symlink, "not a regular file (a FIFO)"),
    "directory": (_directory, "not a regular file (a directory)"),
    "over-max-file-mb": (_over_limit, "file of 65.0 MB is over the 64 MB limit (--max-file-mb)"),
    "broken-symlink": (_broken_symlink, "file not found"),
    "same-path-twice": (_same_path, "same file as train.csv line 4 (sequence_id 239181)"),
    "same-file-other-spelling": (_same_path_spelled_otherwise, "same file as train.csv line 4 (sequence_id 239181)"),
    "same-file-via-symlink": (_same_file_via_symlink, "same file as train.csv line 4 (sequence_id 239181)"),
    "float16-with-inf": (_float16_inf_in_z, "infinite coordinate values"),
    "path-of-200-kb": (_path_of_200_kb, "cannot stat (File name too long)"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_landmark_file_is_rejected_and_the_rest_lands(tmp_path: Path, data: Path, case: str, good_ids: list[str]):
    setup, phrase = FILE_CASES[case]
    path = setup(data)
    append_rows(data, row(path))
    out = tmp_path / "out"
    fifos = [p for p in (data / BAD).iterdir() if p.is_fifo()]
    with fifo_guard(*fifos):
        result = build(data, out)
    check_exit(result, 3)
    (reject,) = rejects_of(out)
    assert (reject["sequence_id"], reject["path"]) == ("5000", path) and phrase in reject["reason"], reject
    assert f"rejected {clip(path, 200)}: {reject['reason']}" in result.output
    assert landed(out) == good_ids


# ---------------------------------------------------------------- one bad row of train.csv: a reject, the rest lands

ROW_CASES: dict[str, tuple[str, str]] = {
    "short-row": (f"{SHORT},22343,5000", "3 fields, expected 4 (as in the header)"),
    "long-row": (f"{SHORT},22343,5000,hello,extra", "5 fields, expected 4 (as in the header)"),
    "empty-path": (",22343,5000,hello", "empty path"),
    "empty-participant": (f"{BAD}/x.parquet,,5000,hello", "empty participant_id"),
    "empty-sequence-id": (f"{BAD}/x.parquet,22343,,hello", "empty sequence_id"),
    "empty-sign": (f"{BAD}/x.parquet,22343,5000,", "empty sign"),
    "all-empty": (",,,", "empty path, participant_id, sequence_id, sign"),
    "leading-zeros": (f"{BAD}/x.parquet,22343,0239181,hello", "sequence_id '0239181' has leading zeros"),
    "arabic-indic-digits": (f"{BAD}/x.parquet,22343,١٢٣,hello", "sequence_id '١٢٣' is not a non-negative integer"),
    "superscript-digit": (f"{BAD}/x.parquet,22343,5²,hello", "sequence_id '5²' is not a non-negative integer"),
    "negative-id": (f"{BAD}/x.parquet,22343,-5,hello", "sequence_id '-5' is not a non-negative integer"),
    "id-too-long-for-a-tar-name": (
        f"{BAD}/x.parquet,22343,{'9' * (MAX_ID_DIGITS + 1)},hello",
        f"sequence_id of {MAX_ID_DIGITS + 1} digits is longer than {MAX_ID_DIGITS}",
    ),
    "unknown-sign": (f"{BAD}/x.parquet,22343,5000,not_a_sign", "unknown sign 'not_a_sign'"),
    "sign-of-200-kb": (f"{BAD}/x.parquet,22343,5000,{'x' * 200_000}", f"unknown sign '{'x' * 76}... (not in"),
    "duplicate-id": (f"{BAD}/x.parquet,22343,239181,hello", "duplicate sequence_id (first at train.csv line 4)"),
    "absolute-path": ("/etc/passwd,22343,5000,hello", "path '/etc/passwd' escapes the data directory"),
    "climbing-path": (
        "train_landmark_files/../../x.parquet,22343,5000,hello",
        "path 'train_landmark_files/../../x.parquet' escapes",
    ),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_bad_train_csv_row_is_rejected_and_the_rest_lands(tmp_path: Path, data: Path, case: str, good_ids: list[str]):
    line, phrase = ROW_CASES[case]
    shutil.copyfile(data / SHORT, data / BAD / "x.parquet")  # a good file: only the row is wrong
    append_rows(data, line)
    out = tmp_path / "out"
    result = build(data, out)
    check_exit(result, 3)
    (reject,) = rejects_of(out)
    assert reject["reason"].startswith(f"train.csv line 5: {phrase}"), reject
    assert len(reject["reason"]) < 200, "a reason quoting the row is clipped"
    assert f"rejected {reject['path']}: {reject['reason']}" in result.output
    assert landed(out) == good_ids


# ---------------------------------------------------------------- accepted: what looks odd but is fine


def test_float16_coordinates_are_read_exactly_and_built(tmp_path: Path, data: Path, good_ids: list[str]):
    table = pq.read_table(data / SHORT)
    for c in "xyz":
        table = with_column(table, c, table.column(c).cast(pa.float16()))
    pq.write_table(table, data / BAD / "f16.parquet")
    append_rows(data, row(f"{BAD}/f16.parquet"))
    out = tmp_path / "out"
    check_exit(build(data, out, "--dtype", "float32"), 0)
    assert landed(out) == sorted([*good_ids, "5000"])

    got = read_landmarks(data / BAD / "f16.parquet")
    want = np.stack([table.column(c).to_numpy().astype(np.float32) for c in "xyz"], axis=-1).reshape(-1, 543, 3)
    assert got.tobytes() == want.tobytes()  # float16 -> float32 is exact: bit for bit, NaN where NaN
    compact, _ = compact_features(want)
    (sample,) = [s for tar in out.glob("*.tar") for s in iter_samples(tar) if s.meta["sequence_id"] == "5000"]
    assert np.array_equal(sample.features[: len(compact)], compact)


def test_longest_allowed_id_and_links_inside_the_data_dir_are_accepted(tmp_path: Path, data: Path, good_ids: list[str]):
    """An id of MAX_ID_DIGITS digits fits a tar name; links inside the data dir, and the dir itself a link, are fine.

    A hard link is a file of its own (bench/build.py lists hard links to build more rows than files).
    """
    longest = "9" * MAX_ID_DIGITS
    shutil.copyfile(data / SHORT, data / BAD / "real.parquet")
    os.symlink("real.parquet", data / BAD / "inside.parquet")  # to a file inside that no other row names
    os.link(data / SHORT, data / BAD / "hard.parquet")
    os.symlink(data, tmp_path / "data-link")
    append_rows(data, row(f"{BAD}/inside.parquet", longest), row(f"{BAD}/hard.parquet", "5001"))
    out = tmp_path / "out"
    check_exit(build(tmp_path / "data-link", out), 0)
    assert landed(out) == sorted([*good_ids, longest, "5001"])


def test_train_csv_as_a_spreadsheet_saves_it_is_accepted(tmp_path: Path, data: Path, good_ids: list[str]):
    """A byte order mark, CRLF line ends, quoted fields, extra columns in another order, blank lines: all fine."""
    with open(data / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lines = ["note,sign,sequence_id,participant_id,path"] + [
        f'"a, note",{r["sign"]},{r["sequence_id"]},"{r["participant_id"]}",{r["path"]}' for r in rows
    ]
    (data / "train.csv").unlink()
    (data / "train.csv").write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\r\n\r\n").encode())
    out = tmp_path / "out"
    check_exit(build(data, out), 0)
    assert landed(out) == good_ids


def test_raising_max_file_mb_rebuilds_only_the_rejected_files_shard(tmp_path: Path, data: Path, good_ids: list[str]):
    out = tmp_path / "out"
    first = build(data, out, "--max-file-mb", "1")  # the real 105-frame file is 1.6 MB
    check_exit(first, 3)
    assert f"rejected {BIG}: file of 1.6 MB is over the 1 MB limit (--max-file-mb)" in first.output
    assert landed(out) == sorted(set(good_ids) - {"100015657"})
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    check_exit(build(data, out, "--max-file-mb", "2"), 0)
    assert landed(out) == good_ids
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert sum(before[n] != after[n] for n in before) == 1, "only the shard of the rejected file is rebuilt"


# ---------------------------------------------------------------- what one file raises: a reject if it is the input's


def _fail_on_the_short_file(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Make the preprocessing raise `exc` for the real 3-frame file alone."""
    real = build_mod.compact_features

    def flaky(xyz: np.ndarray):
        if len(xyz) == 3:
            raise exc
        return real(xyz)

    monkeypatch.setattr(build_mod, "compact_features", flaky)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (OSError(errno.EIO, "Input/output error"), "could not be processed (OSError: [Errno 5] Input/output error)"),
        (pa.ArrowInvalid("bad dictionary"), "could not be processed (ArrowInvalid: bad dictionary)"),
        (pa.ArrowNotImplementedError("no kernel"), "could not be processed (ArrowNotImplementedError: no kernel)"),
        (FeatureRangeError("features exceed the float16 range"), "features exceed the float16 range"),
    ],
    ids=["OSError", "ArrowInvalid", "ArrowNotImplementedError", "our-error-class"],
)
def test_an_input_error_from_one_file_rejects_that_file_only(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception, reason: str, good_ids: list[str]
):
    _fail_on_the_short_file(monkeypatch, exc)
    out = tmp_path / "out"
    result = build(data, out)
    check_exit(result, 3)
    path = "train_landmark_files/49445/1006440534.parquet"
    assert f"rejected {path}: {reason}" in result.output
    assert [r["path"] for r in rejects_of(out)] == [path]
    assert landed(out) == sorted(set(good_ids) - {"1006440534"})


@pytest.mark.parametrize("exc", [ZeroDivisionError("division by zero"), TypeError("unsupported operand")])
def test_a_bug_in_the_preprocessing_stops_the_build_with_its_traceback(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception, good_ids: list[str]
):
    """A bug in our code is not a bad input: the exception propagates, nothing is rejected, no manifest is written."""
    _fail_on_the_short_file(monkeypatch, exc)
    out = tmp_path / "out"
    result = build(data, out)
    assert result.exception is exc and result.exit_code == 1, result.output
    assert "rejected" not in result.output
    assert not (out / "manifest.json").exists() and not (out / "rejects.jsonl").exists()
    assert not list(out.glob("*.tmp")), "a stopped build left temporary files"
    for tar in out.glob("*.tar"):  # the shards finished before the bug stay whole: a rerun keeps them
        assert (out / tar.name.replace(".tar", ".json")).exists()
    monkeypatch.undo()
    check_exit(build(data, out), 0)
    assert landed(out) == good_ids


BUGGY_CLI = """
import sys
import pipeline.build
def bug(xyz):
    return 1 // 0
pipeline.build.compact_features = bug
from pipeline.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_the_command_prints_a_bugs_traceback_and_exit_status_1_not_rejects(tmp_path: Path, data: Path):
    out = tmp_path / "out"
    proc = _run([sys.executable, "-c", BUGGY_CLI, *_cli_command(data, out, jobs=1)[3:]])
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr and proc.stderr.endswith(
        "ZeroDivisionError: integer division or modulo by zero\n"
    )
    assert "rejected" not in proc.stderr + proc.stdout
    assert not (out / "rejects.jsonl").exists() and not (out / "manifest.json").exists()


def test_member_name_too_long_for_tar_stops_before_writing(tmp_path: Path, data: Path, monkeypatch):
    """train.csv's gate bounds ids, so a name too long for the tar writer is our bug: it stops the build before a
    byte of that sample is written, and no shard is left half-written."""
    real = build_mod.encode_sample

    def long_names(key: str, *args: object):
        members = real(key, *args)
        return [("9" * 95 + name, data) for name, data in members] if key == "239181" else members

    monkeypatch.setattr(build_mod, "encode_sample", long_names)
    out = tmp_path / "out"
    result = build(data, out)
    assert isinstance(result.exception, ValueError) and result.exit_code == 1, result.output
    assert str(result.exception).startswith("tar member name longer than 100 bytes")
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    for tar in out.glob("*.tar"):
        assert (out / tar.name.replace(".tar", ".json")).exists(), f"{tar.name} without its sidecar"


# ---------------------------------------------------------------- train.csv or the label map unusable: one line, exit 1


def _replace(data: Path, name: str, content: bytes) -> None:
    (data / name).unlink()
    (data / name).write_bytes(content)


def _csv(content: bytes) -> Callable[[Path], None]:
    return lambda data: _replace(data, "train.csv", content)


def _csv_edited(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Replace train.csv by `edit(its good content)`."""
    return lambda data: _replace(data, "train.csv", edit((data / "train.csv").read_bytes()))


def _label_map(content: bytes) -> Callable[[Path], None]:
    return lambda data: _replace(data, LABEL_MAP, content)


def _as_directory(name: str) -> Callable[[Path], None]:
    def setup(data: Path) -> None:
        (data / name).unlink()
        (data / name).mkdir()

    return setup


def _as_fifo(name: str) -> Callable[[Path], None]:
    def setup(data: Path) -> None:
        (data / name).unlink()
        os.mkfifo(data / name)

    return setup


def _as_link(name: str, target: str) -> Callable[[Path], None]:
    def setup(data: Path) -> None:
        (data / name).unlink()
        os.symlink(target, data / name)

    return setup


HEADER = b"path,participant_id,sequence_id,sign\n"
INDEX_CASES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "csv-empty": ("train.csv", _csv(b""), "empty (expected the header path,participant_id,sequence_id,sign"),
    "csv-blank-lines": ("train.csv", _csv(b"\n\n\n"), "empty (expected the header"),
    "csv-header-only": ("train.csv", _csv(HEADER), "no rows after the header"),
    "csv-not-utf8": (
        "train.csv",
        _csv_edited(lambda good: good + b"train_landmark_files/1/\xff.parquet,1,7,hello\n"),
        "not UTF-8 text (byte 0xff on line 5)",
    ),
    "csv-latin1-header": (
        "train.csv",
        _csv(b"p\xe4th,participant_id,sequence_id,sign\n"),
        "not UTF-8 text (byte 0xe4 on line 1)",
    ),
    "csv-unterminated-quote": (
        "train.csv",
        _csv_edited(lambda good: good + b'"train_landmark_files/1/7.parquet,1,7,hello\n'),
        "malformed CSV in the row starting at line 5: unexpected end of data (an unterminated quote?)",
    ),
    "csv-text-after-quote": (
        "train.csv",
        _csv_edited(lambda good: HEADER + b'"a"b,1,7,hello\n' + good[len(HEADER) :]),
        "malformed CSV in the row starting at line 2: ',' expected after '\"'",
    ),
    "csv-missing-column": (
        "train.csv",
        _csv(b"path,participant_id,sign\na,1,hello\n"),
        "missing column(s) sequence_id (has: path, participant_id, sign)",
    ),
    "csv-repeated-column": (
        "train.csv",
        _csv(b"path,participant_id,sequence_id,sign,sign\na,1,7,hello,x\n"),
        "column 'sign' appears more than once in the header",
    ),
    "csv-binary": ("train.csv", _csv(bytes(range(256)) * 4), "not UTF-8 text (byte 0x80 on line 2)"),
    "csv-nul-byte": (
        "train.csv",
        _csv_edited(lambda good: good + b"train_landmark_files/1/7\0.parquet,1,7,hello\n"),
        "not a text file (a NUL byte on line 5)",
    ),
    "csv-directory": ("train.csv", _as_directory("train.csv"), "not a regular file (a directory)"),
    "csv-fifo": ("train.csv", _as_fifo("train.csv"), "not a regular file (a FIFO)"),
    "csv-dev-zero": ("train.csv", _as_link("train.csv", "/dev/zero"), "not a regular file (a character device)"),
    "csv-broken-link": ("train.csv", _as_link("train.csv", "nowhere.csv"), "file not found"),
    "map-empty": (LABEL_MAP, _label_map(b""), "empty (expected a JSON object of sign -> index)"),
    "map-not-utf8": (LABEL_MAP, _label_map(b'{"hello\xff": 0}'), "not UTF-8 text (byte 0xff on line 1)"),
    "map-truncated": (LABEL_MAP, _label_map(b'{"hello": 0,'), "not valid JSON (Expecting property name"),
    "map-deeply-nested": (LABEL_MAP, _label_map(b"[" * 200_000 + b"]" * 200_000), "not valid JSON (nested too deeply)"),
    "map-nested-object": (LABEL_MAP, _label_map(b'{"hello": {"a": 0}}'), "index of 'hello' is {'a': 0}"),
    "map-repeated-sign": (
        LABEL_MAP,
        _label_map(b'{"hello": 0, "cloud": 1, "white": 2, "hello": 3}'),
        "sign 'hello' appears more than once",
    ),
    "map-nan": (LABEL_MAP, _label_map(b'{"hello": NaN}'), "index of 'hello' is nan, expected an integer"),
    "map-directory": (LABEL_MAP, _as_directory(LABEL_MAP), "not a regular file (a directory)"),
    "map-fifo": (LABEL_MAP, _as_fifo(LABEL_MAP), "not a regular file (a FIFO)"),
    "map-broken-link": (LABEL_MAP, _as_link(LABEL_MAP, "nowhere.json"), "file not found"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_unusable_train_csv_or_label_map_stops_with_one_line(tmp_path: Path, data: Path, case: str):
    name, setup, phrase = INDEX_CASES[case]
    setup(data)
    out = tmp_path / "out"
    with fifo_guard(data / name):
        result = build(data, out)
    check_exit(result, 1)
    assert result.output.startswith(f"Error: {data / name}: {phrase}"), result.output
    assert result.output.count("\n") == 1, "one line"
    assert not out.exists(), "a refused build wrote into --out"


# ---------------------------------------------------------------- options


def test_one_fold_is_refused_with_what_to_do_instead(tmp_path: Path, data: Path):
    out = tmp_path / "out"
    result = build(data, out, "--folds", "1")
    check_exit(result, 2)  # a usage error, before any work
    assert result.output.endswith(
        "Error: Invalid value for '--folds': --folds 1 puts every participant in one fold and leaves none for "
        "validation: build with --folds 2 or more (default 5) and choose at training time which folds validate "
        "(asl-train --val-folds; --val-folds none trains on every fold)\n"
    ), result.output
    assert not out.exists()
    with pytest.raises(build_mod.BuildError, match="--folds 0 leaves none for validation"):
        build_mod.build_shards(data, out, build_mod.BuildOptions(folds=0))
    assert not out.exists()


# ---------------------------------------------------------------- the output: not writable, full, stale, locked


def _cli_command(data: Path, out: Path, jobs: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "build-shards",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--jobs",
        str(jobs),
        "--shard-size",
        "2",
        "--folds",
        "2",
    ]


def _run(cmd: list[str], preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=preexec_fn)


def _obey_file_permissions() -> Callable[[], None] | None:
    """A preexec_fn under which root, too, obeys file permissions (no capabilities after exec); None for others."""
    if os.geteuid() != 0:
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: only a system call after it
    pr_capbset_drop = 24

    def drop() -> None:
        for cap in range(64):
            prctl(pr_capbset_drop, cap, 0, 0, 0)

    return drop


@pytest.mark.slow
@pytest.mark.parametrize("where", ["out", "parent"])
def test_read_only_output_is_one_line_then_a_rerun_builds(tmp_path: Path, data: Path, where: str, good_ids: list[str]):
    parent = tmp_path / "ro"
    parent.mkdir()
    out = parent / "out"
    if where == "out":
        out.mkdir()
    (out if where == "out" else parent).chmod(0o555)
    try:
        proc = _run(_cli_command(data, out), _obey_file_permissions())
    finally:
        (out if where == "out" else parent).chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.endswith("Permission denied)\n") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"Error: {out}: cannot write the output ("), proc.stderr
    check_exit(build(data, out), 0)
    assert landed(out) == good_ids


@pytest.mark.slow
def test_full_output_is_one_line_leaves_no_temporaries_then_a_rerun_builds(
    tmp_path: Path, data: Path, good_ids: list[str]
):
    """A file size limit makes every write past 60 kB fail as on a full disk, in the main process and both workers."""

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    out = tmp_path / "out"
    proc = _run(_cli_command(data, out, jobs=2), small_disk)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == f"Error: {out}: cannot write the output (File too large)", proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("*.tmp")), "a failed build left temporary files"
    check_exit(build(data, out), 0)
    assert landed(out) == good_ids


def test_disk_full_while_writing_a_shard(tmp_path: Path, data: Path, monkeypatch, good_ids: list[str]):
    def full(self: shards_mod.ShardWriter, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(shards_mod.ShardWriter, "_put", full)
        result = build(data, out)
    check_exit(result, 1)
    assert result.output == f"Error: {out}: cannot write the output (No space left on device)\n"
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"], "only the plan, no partial shard, no lock"
    check_exit(build(data, out), 0)
    assert landed(out) == good_ids


def test_stale_temporaries_of_a_killed_build_are_removed(tmp_path: Path, data: Path, good_ids: list[str]):
    out = tmp_path / "out"
    check_exit(build(data, out), 0)
    ours = ["fold0-000000.tar.tmp", "fold1-000000.json.tmp", "manifest.json.tmp", "plan.json.tmp", "rejects.jsonl.tmp"]
    for name in ours:
        (out / name).write_bytes(b"partial")
    (out / "notes.tmp").write_bytes(b"the user's")
    (out / "fold0-000000.tar").unlink()  # as if killed while rewriting this shard
    check_exit(build(data, out), 0)
    assert not [n for n in ours if (out / n).exists()]
    assert (out / "notes.tmp").read_bytes() == b"the user's", "only the build's own temporaries are removed"
    assert landed(out) == good_ids


HOLD_LOCK = """
import sys, time
from pathlib import Path
from pipeline.build import output_lock
with output_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_second_build_refuses_while_one_runs_and_a_dead_holders_lock_is_taken_over(
    tmp_path: Path, data: Path, good_ids: list[str]
):
    out = tmp_path / "out"
    check_exit(build(data, out), 0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert (out / LOCK).read_text() == f"{holder.pid}\n"
        for extra in ([], ["--force", "--folds", "3"]):  # --force neither: it would delete the holder's shards
            result = build(data, out, *extra)
            check_exit(result, 1)
            assert result.output == (
                f"Error: {out}: another build-shards (pid {holder.pid}) is writing here; "
                "wait for it to end or choose another --out\n"
            )
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK} == before
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, with the dead holder's pid
        holder.wait()
    assert (out / LOCK).read_text() == f"{holder.pid}\n"
    check_exit(build(data, out, "--force", "--folds", "3"), 0)
    assert not (out / LOCK).exists()
    assert landed(out) == good_ids
    assert json.loads((out / "manifest.json").read_text())["config"]["folds"] == 3


def test_lock_is_exclusive_within_one_process_too(tmp_path: Path):
    refused = pytest.raises(build_mod.BuildError, match=f"another build-shards \\(pid {os.getpid()}\\)")
    with output_lock(tmp_path), refused, output_lock(tmp_path):
        pass
    assert not (tmp_path / LOCK).exists()
    with output_lock(tmp_path):  # released: free again
        assert (tmp_path / LOCK).read_text() == f"{os.getpid()}\n"


@pytest.mark.slow
def test_two_builds_at_once_never_crash_and_agree_with_one_plan(tmp_path: Path):
    """Started together: each either builds or refuses at once; the result is one consistent build."""
    data = demo_dataset(tmp_path, sequences=120, signs=4, participants=4, seed=3)
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(_cli_command(data, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        results.append((p.returncode, stdout, stderr))
    for code, _, stderr in results:
        assert code in (0, 1) and "Traceback" not in stderr, stderr
        if code == 1:
            assert stderr.startswith(f"Error: {out}: another build-shards (pid ") and stderr.count("\n") == 1, stderr
    assert 0 in [code for code, *_ in results]
    plan = json.loads((out / "plan.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert plan["fingerprint"] == manifest["fingerprint"]
    assert len(landed(out)) == 120
    assert not (out / LOCK).exists() and not list(out.glob("*.tmp"))


# ---------------------------------------------------------------- bounds: a value that sizes the manifest


def test_folds_beyond_what_a_reader_accepts_are_one_line_and_nothing_written(tmp_path: Path, data: Path):
    out = tmp_path / "out"
    result = build(data, out, "--folds", "1000000")
    assert result.exit_code == 2 and not out.exists(), result.output
    assert f"--folds 1000000 is more than {build_mod.MAX_FOLDS:,}: the manifest would be over the 64 MiB" in (
        result.output
    )
    with pytest.raises(build_mod.BuildError, match=f"more than {build_mod.MAX_FOLDS:,}"):
        build_mod.build_shards(data, out, build_mod.BuildOptions(folds=build_mod.MAX_FOLDS + 1), jobs=1)
    assert not out.exists()


def test_max_folds_is_where_the_fold_list_alone_outgrows_the_readers_limit():
    """Independently: MAX_FOLDS + 1 of the smallest fold entries, as the build writes them, are over the limit,
    and MAX_FOLDS of them, without the rest of the manifest, are not."""
    entry = {"fold": 0, "participants": [], "samples": 0, "shards": 0}
    folds = [len(json.dumps({"folds": [entry] * n}, indent=1, sort_keys=True)) for n in (1, 2)]
    each = folds[1] - folds[0]
    assert build_mod.MAX_FOLDS * each <= shards_mod.MANIFEST_MAX_BYTES
    over = json.dumps({"folds": [entry] * (build_mod.MAX_FOLDS + 1)}, indent=1, sort_keys=True)
    assert len(over) > shards_mod.MANIFEST_MAX_BYTES


def test_many_empty_folds_build_and_every_reader_reads_them(tmp_path: Path, data: Path, good_ids: list[str]):
    out = tmp_path / "out"
    check_exit(build(data, out, "--folds", "5000"), 0)
    manifest = shards_mod.read_manifest(out)
    assert [f["fold"] for f in manifest["folds"]] == list(range(5000))
    assert sorted(f["samples"] for f in manifest["folds"] if f["samples"]) == [1, 1, 1]  # one a participant
    assert landed(out) == good_ids


def test_a_manifest_over_the_readers_limit_is_refused_before_it_is_written(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch, good_ids: list[str]
):
    out = tmp_path / "out"
    monkeypatch.setattr(build_mod, "MANIFEST_MAX_BYTES", 2000)
    result = build(data, out)
    check_exit(result, 1)
    assert result.output.startswith(f"Error: {out / 'manifest.json'}: would be ") and result.output.count("\n") == 1
    assert "bytes, over the 2,000 every reader accepts" in result.output
    assert not (out / "manifest.json").exists() and len(list(out.glob("*.tar"))) == 2
    monkeypatch.undo()
    rerun = build(data, out)
    check_exit(rerun, 0)
    assert "built 0, reused 2" in rerun.output  # the shards were kept: the rerun only writes the manifest
    assert landed(out) == good_ids
