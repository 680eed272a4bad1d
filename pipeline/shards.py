"""The on-disk sample format: tar shards of `.npy`/`.cls`/`.json` members, the manifest, verification.

A sample with key `K` (its sequence_id) is the tar members:

- `K.x.npy`        features, float16 or float32: `(L, 118, 6)` real frames only (compact
                   layout) or `(384, 118, 6)` padded by the rule (padded layout)
- `K.missing.npy`  uint8 `(L or 384, 15)`: per frame, bit `i` (big-endian, `np.packbits`
                   along the points) set when point `i` was NaN in the source
- `K.mask.npy`     uint8 `(384,)`, 1 for real frames (padded layout only)
- `K.cls`          the label index as ASCII digits
- `K.json`         sequence_id, participant_id, sign, label, frames (raw), length (stored), fold

Shards are written byte-for-byte deterministically (fixed tar headers) and atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.features import FEATURE_SHAPE, MAX_LEN, N_CHANNELS, pack_missing, pad_features, unpack_missing
from pipeline.landmarks import N_POINTS

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
LAYOUTS = ("compact", "padded")
DTYPES = ("float16", "float32")
# The only member types a shard may hold; anything else (pickle, .pth, ...) is refused.
MEMBER_TYPES = frozenset({"x.npy", "missing.npy", "mask.npy", "cls", "json"})
_PACKED = (N_POINTS + 7) // 8


class ShardError(ValueError):
    """A shard that does not match the sample format."""


@dataclass
class Sample:
    """One decoded sample in the padded form, whichever layout it was stored in."""

    features: np.ndarray  # (384, 118, 6) float32
    mask: np.ndarray  # (384,) bool
    missing: np.ndarray  # (384, 118) bool
    label: int
    meta: dict[str, Any]


def encode_sample(
    key: str, compact: np.ndarray, missing: np.ndarray, meta: dict[str, Any], layout: str, dtype: str
) -> list[tuple[str, bytes]]:
    """Tar members `(name, bytes)` of one sample from its compact features (L, 118, 6) and missing (L, 118)."""
    if layout == "compact":
        members = [("x.npy", npy_bytes(compact.astype(dtype))), ("missing.npy", npy_bytes(pack_missing(missing)))]
    elif layout == "padded":
        x, mask = pad_features(compact)
        full_missing = missing[np.minimum(np.arange(MAX_LEN), len(missing) - 1)]  # padding repeats the last frame
        members = [
            ("x.npy", npy_bytes(x.astype(dtype))),
            ("mask.npy", npy_bytes(mask.astype(np.uint8))),
            ("missing.npy", npy_bytes(pack_missing(full_missing))),
        ]
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    members += [("cls", str(meta["label"]).encode()), ("json", json.dumps(meta, sort_keys=True).encode())]
    return [(f"{key}.{ext}", data) for ext, data in members]


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """Decode `.npy` bytes; object arrays (pickle) are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


class ShardWriter:
    """Writes a tar shard under a temporary name; `close()` renames it into place, `abort()` removes it.

    Plain POSIX ustar members with fixed headers (mode 0644, uid/gid 0, mtime 0), so the same
    samples always give the same bytes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._hash = hashlib.sha256()
        self.count = 0

    def write(self, members: Iterable[tuple[str, bytes]]) -> None:
        for name, data in members:
            self._put(ustar_header(name, len(data)))
            self._put(data)
            self._put(b"\0" * (-len(data) % 512))
        self.count += 1

    def _put(self, data: bytes) -> None:
        self._hash.update(data)
        self._file.write(data)

    def close(self) -> tuple[int, str]:
        """Finish the shard (end-of-archive blocks, fsync, rename); returns its size and sha256."""
        self._put(b"\0" * 1024)
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        os.replace(self.tmp, self.path)
        return size, self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file `name` (at most 100 bytes) of `size` bytes."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    header = b"".join([
        raw.ljust(100, b"\0"), b"0000644\0", b"0000000\0", b"0000000\0", b"%011o\0" % size, b"00000000000\0",
        b" " * 8, b"0", b"\0" * 100, b"ustar\x0000", b"\0" * 64, b"0000000\0" * 2, b"\0" * 155,
    ]).ljust(512, b"\0")  # fmt: skip
    return header[:148] + b"%06o\0 " % sum(header) + header[156:]


def iter_members(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(key, {member type: bytes})` per sample of a shard, in order; refuses unknown member types."""
    key, group = None, {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    raise ShardError(f"{path}: member {info.name!r} is not a regular file")
                sample_key, _, ext = Path(info.name).name.partition(".")
                if ext not in MEMBER_TYPES:
                    raise ShardError(
                        f"{path}: member {info.name!r} has a refused type {ext!r} (allowed: .npy, .cls, .json)"
                    )
                if sample_key != key and group:
                    yield key, group
                    group = {}
                key = sample_key
                group[ext] = tar.extractfile(info).read()
    except tarfile.TarError as exc:
        raise ShardError(f"{path}: not a readable tar shard ({exc})") from None
    if group:
        yield key, group


def decode_sample(members: dict[str, bytes], source: str = "") -> Sample:
    """The padded float32 sample from a sample's members, for either layout."""
    try:
        x = load_npy(members["x.npy"]).astype(np.float32)
        packed = load_npy(members["missing.npy"])
        meta = json.loads(members["json"])
        label = int(members["cls"])
        mask = load_npy(members["mask.npy"]).astype(bool) if "mask.npy" in members else None
    except (KeyError, ValueError) as exc:
        raise ShardError(f"{source}: undecodable sample ({exc!r})") from None
    if x.ndim != 3 or x.shape[1:] != (N_POINTS, N_CHANNELS) or not 1 <= len(x) <= MAX_LEN:
        raise ShardError(f"{source}: x.npy has shape {x.shape}, expected (L<=384, 118, 6)")
    if packed.shape != (len(x), _PACKED):
        raise ShardError(f"{source}: missing.npy has shape {packed.shape}, expected ({len(x)}, {_PACKED})")
    missing = unpack_missing(packed)
    if mask is not None:
        if x.shape != FEATURE_SHAPE or mask.shape != (MAX_LEN,):
            raise ShardError(f"{source}: padded sample has x {x.shape}, mask {mask.shape}")
        return Sample(x, mask, missing, label, meta)
    features, mask = pad_features(x)
    return Sample(features, mask, missing[np.minimum(np.arange(MAX_LEN), len(x) - 1)], label, meta)


def iter_samples(path: str | Path) -> Iterator[Sample]:
    """Every sample of a shard, decoded to the padded float32 form."""
    for key, members in iter_members(path):
        yield decode_sample(members, f"{path}:{key}")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary name, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest (run `asl-pipeline build-shards` first)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(shard_dir: str | Path) -> list[str]:
    """Check every shard against the manifest; returns the problems found (empty when all is well)."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    problems = []
    for entry in manifest["shards"]:
        path = shard_dir / entry["name"]
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
        problems += _sample_problems(path, entry, manifest["config"]["layout"])
    listed = {e["name"] for e in manifest["shards"]}
    problems += [f"{p}: shard not in the manifest" for p in sorted(shard_dir.glob("*.tar")) if p.name not in listed]
    return problems


def _sample_problems(path: Path, entry: dict[str, Any], layout: str) -> list[str]:
    """Decode every sample of one shard and compare keys, order and count with its manifest entry."""
    keys = []
    try:
        for key, members in iter_members(path):
            sample = decode_sample(members, f"{path}:{key}")
            if layout == "padded" and "mask.npy" not in members:
                return [f"{path}:{key}: padded layout but no mask.npy"]
            if sample.meta.get("sequence_id") != key or sample.label != sample.meta.get("label"):
                return [f"{path}:{key}: metadata does not match the key or the label"]
            keys.append(key)
    except ShardError as exc:
        return [str(exc)]
    expected = [str(k) for k in entry["sequence_ids"]]
    if keys != expected:
        return [f"{path}: holds {len(keys)} samples, manifest lists {len(expected)} (or another order)"]
    return []
