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

import contextlib
import hashlib
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
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
from pipeline.location import STALL_S, Location, LocationError

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
    `ast.literal_eval`, the larger part of decoding a small array); any other header goes through
    numpy's header parser. Either way the data's size is checked against the shape before anything
    is allocated, so a header claiming an absurd shape is an error, not a MemoryError. The arrays
    are read-only views of `data`.
    """
    fast = _plain_npy(data)
    return fast if fast is not None else _checked_npy(data)


def _checked_npy(data: bytes) -> np.ndarray:
    f = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(f)
        if major not in (1, 2):
            raise ValueError(f"unsupported .npy format version {major}")
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
    except (ValueError, EOFError, TypeError) as exc:
        raise ValueError(f"malformed .npy header ({exc})") from None
    if dtype.hasobject:
        raise ValueError("object arrays are refused (they would be unpickled)")
    count, offset = math.prod(shape), f.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f".npy header says {dtype} {shape} ({count * dtype.itemsize} bytes), "
                         f"{len(data) - offset} bytes follow")  # fmt: skip
    return np.frombuffer(data, dtype, count, offset=offset).reshape(shape, order="F" if fortran_order else "C")


_NPY_HEADER = re.compile(rb"\{'descr': '([<|][fiub][1248])', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \} *\n")


def _plain_npy(data: bytes) -> np.ndarray | None:
    """A version-1.0 `.npy` of a numeric dtype in C order whose size matches its shape, else None."""
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
        """Remove the partial shard; also when closing fails (on a full disk the flush inside close does)."""
        try:
            with contextlib.suppress(OSError):
                self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


USTAR_NAME_BYTES = 100  # the name field of a ustar header; the writer never uses the prefix field


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file `name` (at most USTAR_NAME_BYTES) of `size` bytes."""
    raw = name.encode()
    if len(raw) > USTAR_NAME_BYTES:
        raise ValueError(f"tar member name longer than {USTAR_NAME_BYTES} bytes: {name!r}")
    header = b"".join([
        raw.ljust(100, b"\0"), b"0000644\0", b"0000000\0", b"0000000\0", b"%011o\0" % size, b"00000000000\0",
        b" " * 8, b"0", b"\0" * 100, b"ustar\x0000", b"\0" * 64, b"0000000\0" * 2, b"\0" * 155,
    ]).ljust(512, b"\0")  # fmt: skip
    return header[:148] + b"%06o\0 " % sum(header) + header[156:]


def iter_members(source: str | Path | BinaryIO, name: str | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(key, {member type: bytes})` per sample of a shard, in order; refuses unknown member types.

    `source` is a local path or any binary stream (a shard read from a URL, `io.BytesIO(data)`);
    `name` is what errors call it (default: the path).
    """
    name = str(source) if name is None else name
    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, Path)):
            try:
                source = stack.enter_context(open(source, "rb", buffering=1 << 20))
            except OSError as exc:
                raise ShardError(f"{name}: not a readable tar shard ({exc.strerror or exc})") from None
        yield from _grouped(tar_members(source, name), name)


def _grouped(members: Iterator[tuple[str, bytes]], name: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members of the same key as one sample."""
    key, group = None, {}
    try:
        for member, data in members:
            sample_key, _, ext = member.rpartition("/")[2].partition(".")
            if ext not in MEMBER_TYPES:
                raise ShardError(f"{name}: member {member!r} has a refused type {ext!r} (allowed: .npy, .cls, .json)")
            if sample_key != key and group:
                yield key, group
                group = {}
            key = sample_key
            group[ext] = data
    except OSError as exc:  # a read error of the underlying stream
        raise ShardError(f"{name}: not a readable tar shard ({exc})") from None
    if group:
        yield key, group


# Bounds on what a header may claim: a sample's largest member (padded float32 x.npy) is 1.1 MB.
MAX_MEMBER_BYTES = 64 << 20
_MAX_NAME_BYTES = 4096


def tar_members(f: BinaryIO, path: str | Path) -> Iterator[tuple[str, bytes]]:
    """`(name, data)` of every regular file in a tar stream (ustar, pax and GNU long names); others refused.

    A small reader instead of `tarfile`, whose per-header Python work costs more than decoding
    the sample. Headers are checksummed; every size is parsed strictly and bounded
    (`MAX_MEMBER_BYTES`) before anything is read; truncation and malformed pax records are
    `ShardError`s naming `path`. The stream is read front to back only (a pipe or a socket works).
    """
    long_name, pax = None, {}
    while True:
        header = f.read(512)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) < 512:
            raise ShardError(f"{path}: not a readable tar shard (truncated header)")
        size = _header_size(header, path)
        data = f.read(size)
        if len(data) < size or len(f.read(-size % 512)) < -size % 512:
            raise ShardError(f"{path}: not a readable tar shard (truncated member)")
        kind = header[156:157]
        if kind == b"x":  # pax extended header: only the path matters here
            pax = _pax_records(data, path)
            continue
        if kind in (b"g", b"L"):
            if kind == b"L" and size > _MAX_NAME_BYTES:
                raise ShardError(f"{path}: not a readable tar shard (long name of {size} bytes)")
            long_name = _text(data.split(b"\0", 1)[0], path) if kind == b"L" else long_name
            continue
        name = pax.get("path") or long_name or _header_name(header, path)
        long_name, pax = None, {}
        if kind not in (b"0", b"\0"):
            raise ShardError(f"{path}: member {name!r} is not a regular file")
        yield name, data


_ZERO_BLOCK = bytes(512)


def _header_size(header: bytes, path: str | Path) -> int:
    """The member size of a checksummed header, within `MAX_MEMBER_BYTES`."""
    try:
        checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:  # includes GNU base-256 sizes, far beyond any member of ours
        raise ShardError(f"{path}: not a readable tar shard (bad header)") from None
    if checksum != sum(header[:148]) + 256 + sum(header[156:]):
        raise ShardError(f"{path}: not a readable tar shard (header checksum mismatch)")
    if not 0 <= size <= MAX_MEMBER_BYTES:
        raise ShardError(f"{path}: not a readable tar shard (member of {size} bytes, over {MAX_MEMBER_BYTES})")
    return size


def _text(raw: bytes, path: str | Path) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ShardError(f"{path}: not a readable tar shard (member name or pax record not UTF-8)") from None


def _header_name(header: bytes, path: str | Path) -> str:
    name = _text(header[:100].split(b"\0", 1)[0], path)
    prefix = _text(header[345:500].split(b"\0", 1)[0], path) if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _pax_records(data: bytes, path: str | Path) -> dict[str, str]:
    """`key=value` records of a pax header ("LEN key=value\\n" each, LEN counting the whole record)."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise ShardError(f"{path}: not a readable tar shard (malformed pax record at byte {pos})")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise ShardError(f"{path}: not a readable tar shard (malformed pax record at byte {pos})")
        records[_text(key, path)] = _text(value, path)
        pos = end
    return records


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


def read_manifest(location: str | Path | Location) -> dict[str, Any]:
    """The manifest of a shard location (directory, URL or pipe: template), checked by `manifest_problem`."""
    loc = as_location(location)
    url = loc.url(MANIFEST)
    try:
        manifest = json.loads(loc.read(MANIFEST))
    except LocationError as exc:
        if loc.is_local and not Path(url).exists():
            raise FileNotFoundError(f"{url}: no manifest (run `asl-pipeline build-shards` first)") from None
        raise LocationError(f"cannot read the manifest: {exc}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ShardError(f"{url}: not a JSON manifest ({str(exc)[:200]})") from None
    problem = manifest_problem(manifest)
    if problem:
        raise ShardError(f"{url}: {problem}")
    return manifest


def as_location(location: str | Path | Location) -> Location:
    return location if isinstance(location, Location) else Location.parse(location)


# How shards are named (their fold first); a manifest naming anything else is refused before any read.
SHARD_STEM = r"fold(\d+)-\d{6,}"
SHARD_NAME = re.compile(SHARD_STEM + r"\.tar")


def shard_name(fold: int, index: int) -> str:
    """The name of shard `index` (from 0) of fold `fold`: `fold0-000000.tar`."""
    return f"fold{fold}-{index:06d}.tar"


_ENTRY_LISTS = ("sequence_ids", "labels", "lengths")


def manifest_problem(manifest: Any) -> str | None:
    """What makes a manifest unusable (a missing key, a wrong type, counts or labels that disagree), or None.

    Everything the loader and `verify` rely on is checked here, once, so that an edited or
    foreign manifest fails with one line before any shard is read.
    """
    if not isinstance(manifest, dict):
        return "the manifest is not a JSON object"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
    absent = [k for k in ("fingerprint", "config", "label_map", "folds", "shards", "totals") if k not in manifest]
    if absent:
        return f"manifest is missing {', '.join(map(repr, absent))} (not written by build-shards, or edited)"
    label_map, config = manifest["label_map"], manifest["config"]
    indices = list(label_map.values()) if isinstance(label_map, dict) else None
    if not indices or any(type(v) is not int for v in indices) or sorted(indices) != list(range(len(indices))):
        return "label_map must be an object mapping every sign to one of the indices 0..N-1"
    if not isinstance(config, dict) or config.get("layout") not in LAYOUTS or config.get("dtype") not in DTYPES:
        return f"config must give a layout in {LAYOUTS} and a dtype in {DTYPES}"
    folds, shards = manifest["folds"], manifest["shards"]
    if not isinstance(folds, list) or not all(isinstance(f, dict) and _ints(f, "fold", "samples") for f in folds):
        return "folds must be a list of objects with integer 'fold' and 'samples'"
    if not isinstance(shards, list):
        return "shards must be a list"
    for i, entry in enumerate(shards):
        problem = _entry_problem(entry, len(indices))
        if problem:
            name = entry.get("name") if isinstance(entry, dict) else None
            return f"shards[{i}] ({name}): {problem}"
    per_fold = Counter()
    for entry in shards:
        per_fold[entry["fold"]] += entry["samples"]
    for f in folds:
        if per_fold.pop(f["fold"], 0) != f["samples"]:
            return f"fold {f['fold']} says {f['samples']} samples, its shards hold {per_fold.get(f['fold'], 0)}"
    if per_fold:
        return f"shards of fold(s) {sorted(per_fold)}, which the manifest's folds do not list"
    return None


def _ints(d: dict[str, Any], *keys: str) -> bool:
    return all(type(d.get(k)) is int and d[k] >= 0 for k in keys)


def _entry_problem(entry: Any, n_classes: int) -> str | None:
    """What is wrong with one manifest shard entry, or None."""
    if not isinstance(entry, dict) or not _ints(entry, "fold", "samples", "bytes"):
        return "expected an object with integer 'fold', 'samples' and 'bytes'"
    name = SHARD_NAME.fullmatch(entry.get("name") if isinstance(entry.get("name"), str) else "")
    if name is None or int(name.group(1)) != entry["fold"]:
        return "name must be foldK-NNNNNN.tar, K its fold"
    if not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        return "sha256 must be 64 hex digits"
    for key in _ENTRY_LISTS:
        if not isinstance(entry.get(key), list) or len(entry[key]) != entry["samples"]:
            return f"'{key}' must list one value per sample ('samples' says {entry['samples']})"
    if not all(isinstance(k, str) and _SAMPLE_KEY.fullmatch(k) for k in entry["sequence_ids"]):
        return "sequence_ids must be strings of letters, digits, '_' or '-'"
    bad = next((v for v in entry["labels"] if type(v) is not int or not 0 <= v < n_classes), None)
    if bad is not None:
        return f"label {bad!r} is outside the label map's 0..{n_classes - 1}"
    if not all(type(v) is int and 1 <= v <= MAX_LEN for v in entry["lengths"]):
        return f"lengths must be integers in 1..{MAX_LEN}"
    return None


_SAMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def read_shard(location: Location, entry: dict[str, Any], check: str = "auto", stall_s: float = STALL_S,
               retries: int = 0) -> bytes:  # fmt: skip
    """The bytes of one shard of the manifest: exactly its size and, with `check="sha256"`, its digest.

    `check="auto"` hashes what crosses a wire (http, pipe:) and not a local directory, whose
    shards the build wrote and `verify` checks: the digest costs about 10% of a worker's time.

    Anything else is a LocationError naming the shard (retried for a remote location: a
    connection cut short or a flipped byte on the wire may not happen twice).
    """
    if check not in SHARD_CHECKS:
        raise ValueError(f"check must be one of {SHARD_CHECKS}, got {check!r}")
    if check == "auto":
        check = "size" if location.is_local else "sha256"

    def problem(data: bytes) -> str | None:
        if len(data) != entry["bytes"]:
            return f"{len(data)} bytes, manifest says {entry['bytes']} (cut short or altered)"
        if check == "sha256" and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return "sha256 differs from the manifest (altered or corrupted)"
        return None

    return location.read(entry["name"], max_bytes=entry["bytes"], check=problem, stall_s=stall_s, retries=retries)


SHARD_CHECKS = ("auto", "sha256", "size")


def shard_samples(data: bytes, entry: dict[str, Any], source: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one shard's bytes, checked against its manifest entry: the same keys, in order, and count."""
    expected, n = entry["sequence_ids"], 0
    for key, members in iter_members(io.BytesIO(data), source):
        if n >= len(expected) or key != expected[n]:
            listed = repr(expected[n]) if n < len(expected) else f"only {len(expected)} samples"
            raise ShardError(f"{source}: sample {n} is {key!r}, the manifest lists {listed}")
        yield key, members
        n += 1
    if n != len(expected):
        raise ShardError(f"{source}: holds {n} samples, manifest says {len(expected)}")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(location: str | Path | Location, manifest: dict[str, Any] | None = None,
                  progress: Callable[[int], None] | None = None) -> list[str]:  # fmt: skip
    """Check every shard against the manifest (read from `location` unless given); returns the problems found.

    Size, sha256, then every sample decoded: keys, order and count, labels, layout. `progress(bytes)`
    is called after each shard.
    """
    loc = as_location(location)
    manifest = manifest if manifest is not None else read_manifest(loc)
    problems = []
    for entry in manifest["shards"]:
        url = loc.url(entry["name"])
        try:  # a local file is read whatever its size, to say what else is wrong with it
            data = loc.read(entry["name"], max_bytes=None if loc.is_local else entry["bytes"])
        except LocationError as exc:
            problems.append(str(exc))
            continue
        if len(data) != entry["bytes"]:
            problems.append(f"{url}: {len(data)} bytes, manifest says {entry['bytes']}")
        elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{url}: sha256 differs from the manifest")
        problems += _sample_problems(data, entry, manifest["config"]["layout"], url)
        if progress:
            progress(len(data))
    if loc.is_local:
        listed = {e["name"] for e in manifest["shards"]}
        problems += [f"{p}: shard not in the manifest" for p in sorted(loc.path.glob("*.tar")) if p.name not in listed]
    return problems


def _sample_problems(data: bytes, entry: dict[str, Any], layout: str, url: str) -> list[str]:
    """Decode every sample of one shard and compare keys, order, count and labels with its manifest entry."""
    try:
        for i, (key, members) in enumerate(shard_samples(data, entry, url)):
            _, _, label = decode_compact(members, f"{url}:{key}")
            has_mask = "mask.npy" in members
            if has_mask != (layout == "padded"):
                return [f"{url}:{key}: {layout} layout, but mask.npy is {'present' if has_mask else 'absent'}"]
            if json.loads(members["json"]).get("sequence_id") != key:
                return [f"{url}:{key}: json sequence_id does not match the key"]
            if label != entry["labels"][i]:
                return [f"{url}:{key}: label {label}, manifest says {entry['labels'][i]}"]
    except ShardError as exc:
        return [str(exc)]
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
