"""The sample format: deterministic atomic shard writes, round trip of both layouts, refused members and pickles."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.features import MAX_LEN, pack_missing, pad_features
from pipeline.shards import (
    Sample,
    ShardError,
    ShardWriter,
    decode_sample,
    encode_sample,
    iter_members,
    iter_samples,
    npy_bytes,
)


def make_sample(seed: int, length: int, label: int = 3) -> tuple[str, np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    compact = rng.normal(0, 1, (length, 118, 6)).astype(np.float32)
    missing = rng.random((length, 118)) < 0.3
    key = str(1000 + seed)
    meta = {"sequence_id": key, "participant_id": "123", "sign": "s", "label": label, "frames": length,
            "length": length, "fold": 0}  # fmt: skip
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
    members = dict((name.split(".", 1)[1], data) for name, data in encode_sample(key, compact, missing, meta, "padded",
                                                                                  "float32"))  # fmt: skip
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


@pytest.mark.parametrize(
    "change, phrase",
    [
        ({"x.npy": npy_bytes(np.zeros((3, 118, 5), np.float16))}, "expected (L<=384, 118, 6)"),
        ({"x.npy": npy_bytes(np.zeros((385, 118, 6), np.float16))}, "expected (L<=384, 118, 6)"),
        ({"x.npy": npy_bytes(np.zeros((0, 118, 6), np.float16))}, "expected (L<=384, 118, 6)"),
        ({"missing.npy": npy_bytes(np.zeros((4, 15), np.uint8))}, "missing.npy has shape"),
        ({"x.npy": b"not an npy file"}, "undecodable"),
        ({"cls": b"three"}, "undecodable"),
        ({"json": b"{"}, "undecodable"),
        ({"mask.npy": npy_bytes(np.ones(384, np.uint8))}, "padded sample"),
    ],
)
def test_decode_sample_rejects_malformed(change: dict, phrase: str):
    key, compact, missing, meta = make_sample(0, 5)
    members = {name.split(".", 1)[1]: data for name, data in encode_sample(key, compact, missing, meta, "compact",
                                                                           "float16")}  # fmt: skip
    members.update(change)
    with pytest.raises(ShardError) as info:
        decode_sample(members, "s.tar:1000")
    assert phrase in str(info.value) and "s.tar:1000" in str(info.value)


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
