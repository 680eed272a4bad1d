"""The sample format: atomic deterministic writes, round trip of both layouts, validation, refused members, pickles."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from decoded import Sample, decode_sample, iter_samples

from pipeline.features import MAX_LEN, pack_missing, pad_features
from pipeline.files import write_atomic, write_json_atomic
from pipeline.shards import (
    FeatureRangeError,
    ShardError,
    ShardWriter,
    decode_compact,
    encode_sample,
    iter_members,
    manifest_stats,
)
from pipeline.tario import load_npy, npy_bytes, tar_members

SOURCE = "s.tar:1000"


def make_sample(seed: int, length: int, label: int = 3) -> tuple[str, np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    compact = rng.normal(0, 1, (length, 118, 6)).astype(np.float32)
    missing = rng.random((length, 118)) < 0.3
    key = str(1000 + seed)
    meta = {
        "sequence_id": key,
        "participant_id": "123",
        "sign": "s",
        "label": label,
        "frames": length,
        "length": length,
        "fold": 0,
    }
    return key, compact, missing, meta


SAMPLES = [make_sample(i, n) for i, n in enumerate([1, 2, 17, 384])]


def write_shard(path: Path, layout: str = "compact", dtype: str = "float16") -> tuple[int, str]:
    writer = ShardWriter(path)
    for key, compact, missing, meta in SAMPLES:
        writer.write(encode_sample(key, compact, missing, meta, layout, dtype))
    return writer.close()


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def good_members(key: str = "42") -> list[tuple[str, bytes]]:
    _, compact, missing, meta = make_sample(0, 5)
    meta["sequence_id"] = key
    return encode_sample(key, compact, missing, meta, "compact", "float16")


def sample_members(layout: str = "compact", dtype: str = "float16", length: int = 5) -> dict[str, bytes]:
    """{member type: bytes} of sample 1000 (label 3) with `length` frames."""
    key, compact, missing, meta = make_sample(0, length)
    return {name.split(".", 1)[1]: data for name, data in encode_sample(key, compact, missing, meta, layout, dtype)}


# ---------------------------------------------------------------- ShardWriter


@pytest.mark.parametrize("layout", ["compact", "padded"])
def test_writer_is_deterministic_and_reports_size_and_sha(tmp_path: Path, layout: str):
    a, b = tmp_path / "a" / "s.tar", tmp_path / "b" / "s.tar"
    a.parent.mkdir()
    b.parent.mkdir()
    size_a, sha_a = write_shard(a, layout)
    size_b, sha_b = write_shard(b, layout)
    assert a.read_bytes() == b.read_bytes()
    assert (size_a, sha_a) == (size_b, sha_b)
    assert size_a == a.stat().st_size
    assert sha_a == hashlib.sha256(a.read_bytes()).hexdigest()
    assert not list(tmp_path.rglob("*.tmp"))
    with tarfile.open(a) as tar:  # fixed headers: nothing from the machine, the user or the clock
        for info in tar.getmembers():
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)


def test_writer_sample_order_and_members(tmp_path: Path):
    path = tmp_path / "s.tar"
    write_shard(path)
    with tarfile.open(path) as tar:
        names = tar.getnames()
    expected = [f"{key}.{ext}" for key, *_ in SAMPLES for ext in ("x.npy", "missing.npy", "cls", "json")]
    assert names == expected


def test_writer_abort_leaves_no_file(tmp_path: Path):
    path = tmp_path / "s.tar"
    writer = ShardWriter(path)
    key, compact, missing, meta = SAMPLES[2]
    writer.write(encode_sample(key, compact, missing, meta, "compact", "float16"))
    assert writer.tmp.exists() and not path.exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_abort_removes_the_temporary_when_closing_fails(tmp_path: Path):
    """On a full disk the buffered flush inside close() fails again: the partial shard must still go."""
    writer = ShardWriter(tmp_path / "s.tar")
    writer.write(good_members("42"))
    real_close = writer._out.file.close

    def failing_close() -> None:
        real_close()
        raise OSError(28, "No space left on device")

    writer._out.file.close = failing_close
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_abort_keeps_an_existing_shard(tmp_path: Path):
    path = tmp_path / "s.tar"
    write_shard(path)
    good = path.read_bytes()
    writer = ShardWriter(path)
    writer.write(encode_sample(*SAMPLES[0][:3], SAMPLES[0][3], "compact", "float16"))
    writer.abort()
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tar"]


# ---------------------------------------------------------------- round trip of the format


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("layout", ["compact", "padded"])
def test_encode_decode_round_trip(tmp_path: Path, layout: str, dtype: str):
    path = tmp_path / "s.tar"
    write_shard(path, layout, dtype)
    samples = list(iter_samples(path))
    assert len(samples) == len(SAMPLES)
    for sample, (_key, compact, missing, meta) in zip(samples, SAMPLES, strict=True):
        assert isinstance(sample, Sample)
        want, want_mask = pad_features(compact.astype(dtype).astype(np.float32))
        assert sample.features.dtype == np.float32
        assert sample.features.tobytes() == want.tobytes()
        assert np.array_equal(sample.mask, want_mask)
        full_missing = missing[np.minimum(np.arange(MAX_LEN), len(missing) - 1)]
        assert np.array_equal(sample.missing, full_missing)
        assert sample.label == meta["label"] and sample.meta == meta


def test_missing_bits_are_packed_big_endian(tmp_path: Path):
    missing = np.zeros((1, 118), dtype=bool)
    missing[0, 0] = missing[0, 9] = missing[0, 117] = True
    packed = pack_missing(missing)
    assert packed.shape == (1, 15)
    assert packed[0, 0] == 0b1000_0000 and packed[0, 1] == 0b0100_0000 and packed[0, 14] == 0b0000_0100


# ---------------------------------------------------------------- refused members and pickles


@pytest.mark.parametrize("ext", ["pyd", "pth", "pickle", "x.pth", "npz"])
def test_iter_members_refuses_other_member_types(tmp_path: Path, ext: str):
    path = tmp_path / "evil.tar"
    members = good_members("42")
    members.insert(2, (f"42.{ext}", b"\x80\x04K\x01."))  # a pickle of the int 1
    write_raw_tar(path, members)
    with pytest.raises(ShardError) as info:
        list(iter_members(path))
    message = str(info.value)
    assert str(path) in message and f"42.{ext}" in message and "refused type" in message
    with pytest.raises(ShardError):
        list(iter_samples(path))


def test_iter_members_refuses_links(tmp_path: Path):
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("42.x.npy")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ShardError, match="not a regular file"):
        list(iter_members(path))


def test_iter_members_groups_by_key(tmp_path: Path):
    path = tmp_path / "s.tar"
    write_raw_tar(path, good_members("7") + good_members("8"))
    got = list(iter_members(path))
    assert [k for k, _ in got] == ["7", "8"]
    assert all(set(m) == {"x.npy", "missing.npy", "cls", "json"} for _, m in got)


def test_truncated_tar_is_a_shard_error(tmp_path: Path):
    path = tmp_path / "s.tar"
    write_shard(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3 + 100])
    with pytest.raises(ShardError, match=str(path)):
        list(iter_samples(path))


class _Trap:
    """Unpickling this object creates the file `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_object_array(marker: Path) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([_Trap(str(marker))], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_pickle_trap_is_live(tmp_path: Path):
    """Control: the payload used below really runs code when unpickled."""
    marker = tmp_path / "control"
    np.load(io.BytesIO(_pickled_object_array(marker)), allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("member", ["x.npy", "missing.npy", "mask.npy"])
def test_decode_sample_refuses_pickled_arrays(tmp_path: Path, member: str):
    marker = tmp_path / "unpickled"
    key, compact, missing, meta = SAMPLES[2]
    members = dict(
        (name.split(".", 1)[1], data) for name, data in encode_sample(key, compact, missing, meta, "padded", "float32")
    )
    members[member] = _pickled_object_array(marker)
    with pytest.raises(ShardError, match="undecodable|shape"):
        decode_sample(members, "shard.tar:1002")
    assert not marker.exists(), "decode_sample unpickled an object array"


def test_decode_sample_refuses_pickled_array_in_a_shard(tmp_path: Path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.tar"
    members = [(n, _pickled_object_array(marker) if n.endswith(".x.npy") else d) for n, d in good_members("42")]
    write_raw_tar(path, members)
    with pytest.raises(ShardError, match="42"):
        list(iter_samples(path))
    assert not marker.exists()


def _x(frames: int, dtype: type = np.float16, fill: float = 0.0) -> bytes:
    return npy_bytes(np.full((frames, 118, 6), fill, dtype))


def _missing(*shape: int, dtype: type = np.uint8) -> bytes:
    return npy_bytes(np.zeros(shape, dtype))


def _mask(values: list[int]) -> bytes:
    return npy_bytes(np.array(values + [0] * (MAX_LEN - len(values)), np.uint8))


_SHAPE = "expected (L, 118, 6) with 1 <= L <= 384"
_MASK_RULE = "mask.npy is not 1 for the first L frames and 0 after (1 <= L <= 384)"
MALFORMED = {
    "x-channels": (
        "compact",
        {"x.npy": npy_bytes(np.zeros((5, 118, 5), np.float16))},
        f"x.npy has shape (5, 118, 5), {_SHAPE}",
    ),
    "x-2d": ("compact", {"x.npy": npy_bytes(np.zeros((5, 708), np.float16))}, f"x.npy has shape (5, 708), {_SHAPE}"),
    "x-0-frames": (
        "compact",
        {"x.npy": _x(0), "missing.npy": _missing(0, 15)},
        f"x.npy has shape (0, 118, 6), {_SHAPE}",
    ),
    "x-385-frames": (
        "compact",
        {"x.npy": _x(385), "missing.npy": _missing(385, 15)},
        f"x.npy has shape (385, 118, 6), {_SHAPE}",
    ),
    "x-int": ("compact", {"x.npy": _x(5, np.int16)}, "x.npy has dtype int16, expected one of float16, float32"),
    "x-nan": ("compact", {"x.npy": _x(5, np.float32, np.nan)}, "x.npy holds non-finite values"),
    "x-inf": ("compact", {"x.npy": _x(5, np.float16, -np.inf)}, "x.npy holds non-finite values"),
    "x-inf-float32": ("compact", {"x.npy": _x(5, np.float32, np.inf)}, "x.npy holds non-finite values"),
    "x-nan-float16": ("compact", {"x.npy": _x(5, np.float16, np.nan)}, "x.npy holds non-finite values"),
    "missing-L-1": ("compact", {"missing.npy": _missing(5, 1)}, "missing.npy is uint8 (5, 1), expected uint8 (5, 15)"),
    "missing-1-frame": (
        "compact",
        {"missing.npy": _missing(1, 15)},
        "missing.npy is uint8 (1, 15), expected uint8 (5, 15)",
    ),
    "missing-fewer-frames": (
        "compact",
        {"missing.npy": _missing(4, 15)},
        "missing.npy is uint8 (4, 15), expected uint8 (5, 15)",
    ),
    "missing-int64": (
        "compact",
        {"missing.npy": _missing(5, 15, dtype=np.int64)},
        "missing.npy is int64 (5, 15), expected uint8 (5, 15)",
    ),
    "mask-on-compact": (
        "compact",
        {"mask.npy": npy_bytes(np.ones(MAX_LEN, np.uint8))},
        "padded sample has x.npy of 5 frames and mask.npy of shape (384,), expected 384",
    ),
    "mask-short": (
        "padded",
        {"mask.npy": npy_bytes(np.ones(383, np.uint8))},
        "padded sample has x.npy of 384 frames and mask.npy of shape (383,), expected 384",
    ),
    "mask-gap": ("padded", {"mask.npy": _mask([1, 1, 0, 1, 1, 1])}, _MASK_RULE),
    "mask-not-from-0": ("padded", {"mask.npy": _mask([0, 1, 1, 1, 1, 1])}, _MASK_RULE),
    "mask-zero": ("padded", {"mask.npy": _mask([])}, _MASK_RULE),
    "mask-two": ("padded", {"mask.npy": _mask([1, 1, 2, 1])}, _MASK_RULE),
    "label-mismatch": ("compact", {"cls": b"4"}, "json label 3 does not match cls 4"),
    "json-list": ("compact", {"json": b"[3]"}, "json is a list, expected an object"),
    "json-no-label": ("compact", {"json": b"{}"}, "json label None does not match cls 3"),
}


@pytest.mark.parametrize("decode", [decode_compact, decode_sample], ids=["decode_compact", "decode_sample"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_sample_refused_naming_source_and_problem(decode, case: str):
    layout, change, problem = MALFORMED[case]
    members = sample_members(layout) | change
    with pytest.raises(ShardError) as info:
        decode(members, SOURCE)
    assert str(info.value) == f"{SOURCE}: {problem}"


@pytest.mark.parametrize(
    "change",
    [
        {"x.npy": b"not an npy file"},
        {"cls": b"three"},
        {"json": b"{"},
        {"missing.npy": b""},
        {"x.npy": npy_bytes(np.zeros((5, 118, 6), np.float16))[:-1]},
    ],
    ids=["x", "cls", "json", "missing-empty", "x-truncated"],
)
def test_undecodable_member_refused_naming_source(change: dict):
    with pytest.raises(ShardError) as info:
        decode_compact(sample_members() | change, SOURCE)
    assert str(info.value).startswith(f"{SOURCE}: undecodable sample (")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_one_non_finite_value_among_finite_ones_refused(dtype: type):
    x = np.random.default_rng(0).normal(0, 1, (5, 118, 6)).astype(dtype)
    x[0, 0, 0] = np.finfo(dtype).max  # the largest finite value is fine
    decode_compact(sample_members() | {"x.npy": npy_bytes(x)}, SOURCE)
    for bad in (np.nan, np.inf, -np.inf):
        x[3, 117, 5] = bad
        with pytest.raises(ShardError, match=r"^s\.tar:1000: x\.npy holds non-finite values$"):
            decode_compact(sample_members() | {"x.npy": npy_bytes(x)}, SOURCE)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("layout", ["compact", "padded"])
@pytest.mark.parametrize("length", [1, 17, MAX_LEN])
def test_decode_compact_returns_the_stored_real_frames(layout: str, dtype: str, length: int):
    _, compact, missing, _ = make_sample(0, length)
    x, packed, label = decode_compact(sample_members(layout, dtype, length), SOURCE)
    assert x.dtype == np.dtype(dtype) and x.shape == (length, 118, 6)
    assert x.tobytes() == compact.astype(dtype).tobytes()
    assert packed.dtype == np.uint8 and packed.shape == (length, 15)
    assert packed.tobytes() == pack_missing(missing).tobytes()
    assert label == 3 and type(label) is int


# ---------------------------------------------------------------- features beyond the stored dtype


def test_encode_sample_refuses_features_beyond_float16():
    key, compact, missing, meta = make_sample(0, 3)
    compact[1, 7, 0] = -70000.0
    for layout in ("compact", "padded"):
        with pytest.raises(FeatureRangeError) as info:
            encode_sample(key, compact, missing, meta, layout, "float16")
        assert (
            info.value.reason
            == str(info.value)
            == ("features exceed the float16 range (max |value| 70000); rebuild with --dtype float32")
        )
    members = encode_sample(key, compact, missing, meta, "compact", "float32")
    x, _, _ = decode_compact({n.split(".", 1)[1]: d for n, d in members}, SOURCE)
    assert x[1, 7, 0] == -70000.0  # float32 holds it


def test_encode_sample_accepts_the_largest_float16():
    key, compact, missing, meta = make_sample(0, 3)
    compact[2, 0, 5] = 65504.0
    members = encode_sample(key, compact, missing, meta, "compact", "float16")
    x, _, _ = decode_compact({n.split(".", 1)[1]: d for n, d in members}, SOURCE)
    assert x[2, 0, 5] == 65504.0 and np.isfinite(x).all()


def test_encode_sample_refuses_infinite_float32_features():
    key, compact, missing, meta = make_sample(0, 3)
    compact[0, 0, 0] = np.inf
    with pytest.raises(FeatureRangeError) as info:
        encode_sample(key, compact, missing, meta, "compact", "float32")
    assert info.value.reason == "features exceed the float32 range (max |value| inf)"


# ---------------------------------------------------------------- atomic writes


def test_write_atomic_fsyncs_the_temporary_file_then_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Path, dst: Path) -> None:
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "f.jsonl"
    write_atomic(target, b"abc\n")
    tmp = str(tmp_path / "f.jsonl.tmp")
    assert events == [("fsync", tmp), ("replace", tmp, str(target))]
    assert target.read_bytes() == b"abc\n"
    write_json_atomic(target, {"b": 1, "a": [2]})
    assert target.read_bytes() == b'{\n "a": [\n  2\n ],\n "b": 1\n}\n'
    assert [e[0] for e in events] == ["fsync", "replace", "fsync", "replace"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.jsonl"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "f.json"
    target.write_bytes(b"old")

    def fail(src: Path, dst: Path) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


# ---------------------------------------------------------------- manifest statistics


def test_manifest_stats_counts_and_histogram():
    lengths = {
        "count": 6,
        "min": 1,
        "p25": 15.3,
        "median": 108.0,
        "mean": 166.5,
        "p75": 338.2,
        "p95": 491.4,
        "p99": 527.9,
        "max": 537,
        "truncated": 1,
    }
    manifest = {
        "totals": {"samples": 6, "shards": 2, "bytes": 1000, "rejected": 1, "real_frames": 999},
        "folds": [
            {"fold": 0, "participants": ["a", "b"], "samples": 4, "shards": 1},
            {"fold": 1, "participants": ["c"], "samples": 2, "shards": 1},
        ],
        "label_map": {"TV": 0, "after": 1, "zipper": 2},
        "shards": [{"labels": [0, 0, 1, 0], "lengths": [1, 15, 16, 384]}, {"labels": [1, 0], "lengths": [383, 200]}],
        "lengths": lengths,
    }
    assert manifest_stats(manifest, top=2) == {
        "totals": manifest["totals"],
        "folds": [(0, 4, 1, 2), (1, 2, 1, 1)],
        "signs": 3,
        "most": [("TV", 4), ("after", 2)],
        "fewest": [("zipper", 0), ("after", 2)],
        "lengths": lengths,
        "histogram": [(1, 16, 2), (16, 32, 1), (32, 64, 0), (64, 128, 0), (128, 256, 1), (256, 384, 1), (384, 385, 1)],
    }


@pytest.mark.parametrize("member", ["x.npy", "missing.npy", "cls", "json"])
def test_decode_sample_requires_each_member(member: str):
    key, compact, missing, meta = make_sample(0, 5)
    members = {n.split(".", 1)[1]: d for n, d in encode_sample(key, compact, missing, meta, "compact", "float16")}
    del members[member]
    with pytest.raises(ShardError, match="undecodable"):
        decode_sample(members, "s.tar:1000")


def test_json_member_is_the_metadata():
    key, compact, missing, meta = make_sample(0, 5, label=11)
    members = dict(encode_sample(key, compact, missing, meta, "compact", "float16"))
    assert json.loads(members[f"{key}.json"]) == meta
    assert members[f"{key}.cls"] == b"11"


# ---------------------------------------------------------------- the tar reader against tarfile


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_reads_what_tarfile_writes(tmp_path: Path, fmt: int):
    """Names longer than 100 bytes (ustar prefix, GNU long name, pax path), empty and odd-sized members."""
    members = [("d/" + "k" * 120 + ".json", b"{}"), ("7.cls", b""), ("7.x.npy", bytes(range(256)) * 3)]
    if fmt == tarfile.USTAR_FORMAT:
        members[0] = ("p" * 90 + "/" + "k" * 90 + ".json", b"{}")  # ustar: long names only through the prefix
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        assert list(tar_members(f, path)) == members


def test_tar_members_refuses_a_corrupted_header(tmp_path: Path):
    path = tmp_path / "s.tar"
    write_shard(path)
    data = bytearray(path.read_bytes())
    data[5] ^= 0x20  # one bit of the first member's name: the header checksum no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="checksum"):
        list(iter_members(path))


NPY_CASES = [
    np.zeros((3, 118, 6), np.float16),
    np.arange(5, dtype=np.int64),
    np.ones((2, 15), np.uint8),
    np.float32(2.5),
    np.zeros((0, 4), np.float32),
    np.zeros((2, 3), np.float32, order="F"),
    np.array(["a"]),
    np.zeros(2, ">f4"),
]


@pytest.mark.parametrize("array", NPY_CASES)
def test_load_npy_matches_numpy(array: np.ndarray):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    got = load_npy(buf.getvalue())
    assert got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array)
