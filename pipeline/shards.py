"""The on-disk sample format: tar shards of `.npy`/`.cls`/`.json` members, the manifest, verification.

A sample with key `K` (its sequence_id) is the tar members:

- `K.x.npy`        features, float16 or float32: `(L, 118, 6)` real frames only (compact
                   layout) or `(384, 118, 6)` padded by the rule (padded layout)
- `K.missing.npy`  uint8 `(L or 384, N_PACKED=15)`: per frame, bit `i` (big-endian, `np.packbits`
                   along the points) set when point `i` was NaN in the source
- `K.mask.npy`     uint8 `(384,)`, 1 for real frames (padded layout only)
- `K.cls`          the label index as ASCII digits
- `K.json`         sequence_id, participant_id, sign, label, frames (raw), length (stored), fold

Shards are written byte-for-byte deterministically (fixed tar headers) and atomically.
`decode_compact` is the one validating decoder of a sample's members; `decode_sample` pads its result.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.features import (
    FEATURE_SHAPE,
    MAX_LEN,
    N_CHANNELS,
    N_PACKED,
    pack_missing,
    pad_features,
    pad_frames,
    unpack_missing,
)
from pipeline.landmarks import N_POINTS

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
LAYOUTS = ("compact", "padded")
DTYPES = ("float16", "float32")
# The only member types a shard may hold; anything else (pickle, .pth, ...) is refused.
MEMBER_TYPES = frozenset({"x.npy", "missing.npy", "mask.npy", "cls", "json"})
_HISTOGRAM_EDGES = (1, 16, 32, 64, 128, 256)  # stored-length bins of `manifest_stats`, below MAX_LEN


class ShardError(ValueError):
    """A shard that does not match the sample format."""


class FeatureRangeError(ValueError):
    """Features that the chosen dtype cannot hold (they would be stored as inf); `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    """Tar members `(name, bytes)` of one sample from its compact features (L, 118, 6) and missing (L, 118).

    Raises FeatureRangeError when a feature value does not fit `dtype`.
    """
    x = stored_features(compact, dtype)
    if layout == "compact":
        members = [("x.npy", npy_bytes(x)), ("missing.npy", npy_bytes(pack_missing(missing)))]
    elif layout == "padded":
        x, mask = pad_features(x)
        members = [
            ("x.npy", npy_bytes(x)),
            ("mask.npy", npy_bytes(mask.astype(np.uint8))),
            ("missing.npy", npy_bytes(pack_missing(pad_frames(missing, MAX_LEN)))),
        ]
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    members += [("cls", str(meta["label"]).encode()), ("json", json.dumps(meta, sort_keys=True).encode())]
    return [(f"{key}.{ext}", data) for ext, data in members]


def stored_features(compact: np.ndarray, dtype: str) -> np.ndarray:
    """`compact` cast to the stored `dtype`; FeatureRangeError when a value would become inf in it."""
    peak = max(float(compact.max()), -float(compact.min()))
    if not peak <= float(np.finfo(dtype).max):  # also catches inf and NaN, which no decoder accepts
        hint = "; rebuild with --dtype float32" if dtype != "float32" else ""
        raise FeatureRangeError(f"features exceed the {dtype} range (max |value| {peak:.6g}){hint}")
    return compact.astype(dtype)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """Decode `.npy` bytes; object arrays (pickle) are refused. Any malformed data raises ValueError.

    The headers `np.save` writes for plain numeric arrays are parsed directly (numpy parses them with
    `ast.literal_eval`, the larger part of decoding a small array); anything else goes through
    `np.load(allow_pickle=False)`. Arrays from the fast path are read-only views of `data`.
    """
    fast = _plain_npy(data)
    if fast is not None:
        return fast
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except EOFError as exc:  # numpy's answer to empty data: one exception type for callers to catch
        raise ValueError(f"truncated .npy data ({exc})") from None


_NPY_HEADER = re.compile(rb"\{'descr': '([<|][fiub][1248])', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \} *\n")


def _plain_npy(data: bytes) -> np.ndarray | None:
    """A version-1.0 `.npy` of a numeric dtype in C order, or None to let numpy decide."""
    if data[:8] != b"\x93NUMPY\x01\x00" or len(data) < 10:
        return None
    end = 10 + int.from_bytes(data[8:10], "little")
    match = _NPY_HEADER.fullmatch(data, 10, end)
    if match is None:
        return None
    shape = tuple(int(v) for v in match.group(2).split(b",") if v.strip())
    dtype = np.dtype(match.group(1).decode())
    count = math.prod(shape)
    if len(data) - end != count * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype, count, offset=end).reshape(shape)


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

    def write(self, members: Iterable[tuple[str, bytes]]) -> None:
        for name, data in members:
            self._put(ustar_header(name, len(data)))
            self._put(data)
            self._put(b"\0" * (-len(data) % 512))

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
        with open(path, "rb", buffering=1 << 20) as f:
            for name, data in tar_members(f, path):
                sample_key, _, ext = Path(name).name.partition(".")
                if ext not in MEMBER_TYPES:
                    raise ShardError(f"{path}: member {name!r} has a refused type {ext!r} (allowed: .npy, .cls, .json)")
                if sample_key != key and group:
                    yield key, group
                    group = {}
                key = sample_key
                group[ext] = data
    except ShardError:
        raise
    except (OSError, ValueError) as exc:  # unreadable file, undecodable name or pax record
        raise ShardError(f"{path}: not a readable tar shard ({exc})") from None
    if group:
        yield key, group


def tar_members(f: BinaryIO, path: str | Path) -> Iterator[tuple[str, bytes]]:
    """`(name, data)` of every regular file in a tar stream (ustar, pax and GNU long names); others refused.

    A small reader instead of `tarfile`, whose per-header Python work costs more than decoding
    the sample: headers are checksummed, sizes and truncation checked.
    """
    long_name, pax = None, {}
    while True:
        header = f.read(512)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) < 512:
            raise ShardError(f"{path}: not a readable tar shard (truncated header)")
        try:
            checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ShardError(f"{path}: not a readable tar shard (bad header)") from None
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardError(f"{path}: not a readable tar shard (header checksum mismatch)")
        data = f.read(size)
        if len(data) < size or len(f.read(-size % 512)) < -size % 512:
            raise ShardError(f"{path}: not a readable tar shard (truncated member)")
        kind = header[156:157]
        if kind == b"x":  # pax extended header: only the path matters here
            pax = dict(_pax_records(data))
            continue
        if kind in (b"g", b"L"):
            long_name = data.rstrip(b"\0").decode() if kind == b"L" else long_name
            continue
        name = pax.get("path") or long_name or _header_name(header)
        long_name, pax = None, {}
        if kind not in (b"0", b"\0"):
            raise ShardError(f"{path}: member {name!r} is not a regular file")
        yield name, data


_ZERO_BLOCK = bytes(512)


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode()
    prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _pax_records(data: bytes) -> Iterator[tuple[str, str]]:
    """`key=value` records of a pax header ("LEN key=value\\n" each)."""
    pos = 0
    while pos < len(data):
        length = int(data[pos : data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1 : pos + length - 1].decode().partition("=")
        yield key, value
        pos += length


def decode_compact(members: dict[str, bytes], source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The real frames of one sample, validated: x (L, 118, 6) in the stored dtype, missing (L, N_PACKED) uint8, label.

    Either layout: a padded sample is cut to the frames its mask marks. Anything that does not
    match the sample format raises ShardError naming `source` (shard:key) and the problem.
    """
    try:
        x = load_npy(members["x.npy"])
        packed = load_npy(members["missing.npy"])
        mask = load_npy(members["mask.npy"]) if "mask.npy" in members else None
        label = int(members["cls"])
        meta = json.loads(members["json"])
    except (KeyError, ValueError) as exc:
        raise ShardError(f"{source}: undecodable sample ({exc!r})") from None
    problem = _arrays_problem(x, packed) or _mask_problem(mask, len(x)) or _label_problem(label, meta)
    if problem:
        raise ShardError(f"{source}: {problem}")
    if mask is None:
        return x, packed, label
    n = int(mask.sum())
    return x[:n], packed[:n], label


def _arrays_problem(x: np.ndarray, packed: np.ndarray) -> str | None:
    """What is wrong with the stored features and missing mask, or None."""
    if x.dtype.name not in DTYPES:
        return f"x.npy has dtype {x.dtype}, expected one of {', '.join(DTYPES)}"
    if x.ndim != 3 or x.shape[1:] != (N_POINTS, N_CHANNELS) or not 1 <= len(x) <= MAX_LEN:
        return f"x.npy has shape {x.shape}, expected (L, {N_POINTS}, {N_CHANNELS}) with 1 <= L <= {MAX_LEN}"
    if not _all_finite(x):
        return "x.npy holds non-finite values"
    if packed.dtype != np.uint8 or packed.shape != (len(x), N_PACKED):
        return f"missing.npy is {packed.dtype} {packed.shape}, expected uint8 ({len(x)}, {N_PACKED})"
    return None


def _all_finite(x: np.ndarray) -> bool:
    """`np.isfinite(x).all()`, also fast for float16 (numpy's float16 isfinite is ~10x slower than float32's)."""
    if x.dtype == np.float16:
        return not ((x.view(np.uint16) & 0x7C00) == 0x7C00).any()  # all exponent bits set: inf or NaN
    return bool(np.isfinite(x).all())


def _mask_problem(mask: np.ndarray | None, frames: int) -> str | None:
    """What is wrong with a padded sample's mask (1 for a prefix of real frames, 0 after), or None."""
    if mask is None:
        return None
    if frames != MAX_LEN or mask.shape != (MAX_LEN,):
        return f"padded sample has x.npy of {frames} frames and mask.npy of shape {mask.shape}, expected {MAX_LEN}"
    n = int(mask.sum())
    if n < 1 or not np.array_equal(mask, np.arange(MAX_LEN) < n):
        return f"mask.npy is not 1 for the first L frames and 0 after (1 <= L <= {MAX_LEN})"
    return None


def _label_problem(label: int, meta: Any) -> str | None:
    """What is wrong with the label and metadata (an object whose label is the .cls label), or None."""
    if not isinstance(meta, dict):
        return f"json is a {type(meta).__name__}, expected an object"
    if meta.get("label") != label:
        return f"json label {meta.get('label')!r} does not match cls {label}"
    return None


def decode_sample(members: dict[str, bytes], source: str = "") -> Sample:
    """The padded float32 sample from a sample's members, for either layout (`decode_compact`, then padding)."""
    x, packed, label = decode_compact(members, source)
    features, mask = pad_features(x, out=np.empty(FEATURE_SHAPE, dtype=np.float32))
    missing = unpack_missing(pad_frames(packed, MAX_LEN))
    return Sample(features, mask, missing, label, json.loads(members["json"]))


def iter_samples(path: str | Path) -> Iterator[Sample]:
    """Every sample of a shard, decoded to the padded float32 form."""
    for key, members in iter_members(path):
        yield decode_sample(members, f"{path}:{key}")


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` under a temporary name beside `path`, fsync, then rename over `path`.

    Readers see the old file or the new one, never a part; the fsync makes the rename
    durable only with complete contents behind it.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON with `write_atomic`."""
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


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


def verify_shards(shard_dir: str | Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """Check every shard against the manifest (read from `shard_dir` unless given); returns the problems found."""
    shard_dir = Path(shard_dir)
    manifest = manifest if manifest is not None else read_manifest(shard_dir)
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
            decode_compact(members, f"{path}:{key}")
            has_mask = "mask.npy" in members
            if has_mask != (layout == "padded"):
                return [f"{path}:{key}: {layout} layout, but mask.npy is {'present' if has_mask else 'absent'}"]
            if json.loads(members["json"]).get("sequence_id") != key:
                return [f"{path}:{key}: json sequence_id does not match the key"]
            keys.append(key)
    except ShardError as exc:
        return [str(exc)]
    expected = [str(k) for k in entry["sequence_ids"]]
    if keys != expected:
        return [f"{path}: holds {len(keys)} samples, manifest lists {len(expected)} (or another order)"]
    return []


def manifest_stats(manifest: dict[str, Any], top: int = 10) -> dict[str, Any]:
    """Counts per fold and sign, the raw length distribution and a histogram of stored lengths, from a manifest.

    `most`/`fewest`: the `top` signs at each end of the count ranking as `(sign, count)`;
    `histogram`: `(low, high, count)` per bin `[low, high)` of stored lengths, the last bin
    holding the sequences of exactly MAX_LEN frames (most of them truncated).
    """
    names = {index: sign for sign, index in manifest["label_map"].items()}
    per_sign = Counter(label for s in manifest["shards"] for label in s["labels"])
    ranked = sorted(((per_sign.get(i, 0), names[i]) for i in names), reverse=True)
    stored = np.array([n for s in manifest["shards"] for n in s["lengths"]], dtype=np.int64)
    edges = [e for e in _HISTOGRAM_EDGES if e < MAX_LEN] + [MAX_LEN, MAX_LEN + 1]
    counts, _ = np.histogram(stored, bins=edges)
    return {
        "totals": manifest["totals"],
        "folds": [(f["fold"], f["samples"], f["shards"], len(f["participants"])) for f in manifest["folds"]],
        "signs": len(names),
        "most": [(name, count) for count, name in ranked[:top]],
        "fewest": [(name, count) for count, name in ranked[::-1][:top]],
        "lengths": manifest["lengths"],
        "histogram": [(a, b, int(n)) for a, b, n in zip(edges[:-1], edges[1:], counts, strict=True)],
    }
