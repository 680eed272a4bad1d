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
`decode_compact` is the one validating decoder of a sample's members. The byte level (tar members,
`.npy`) is `pipeline.tario`; where shards live and how they are read is `pipeline.location`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from pipeline.errors import AslError
from pipeline.features import MAX_LEN, N_CHANNELS, N_PACKED, pack_missing, pad_features, pad_frames
from pipeline.files import AtomicFile
from pipeline.landmarks import N_POINTS
from pipeline.location import Location, LocationError, LocationSpecError
from pipeline.policy import DEFAULT_POLICY, ReadPolicy
from pipeline.tario import TAR_END, TarError, load_npy, member_blocks, npy_bytes, tar_members
from pipeline.text import printable

if TYPE_CHECKING:
    from pipeline.cache import CachedShards

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
LAYOUTS = ("compact", "padded")
DTYPES = ("float16", "float32")
# The only member types a shard may hold; anything else (pickle, .pth, ...) is refused.
MEMBER_TYPES = frozenset({"x.npy", "missing.npy", "mask.npy", "cls", "json"})
_HISTOGRAM_EDGES = (1, 16, 32, 64, 128, 256)  # stored-length bins of `manifest_stats`, below MAX_LEN
# A manifest of the full dataset (94,477 sequences) is about 5 MB: a larger body is not one, and is not read.
MANIFEST_MAX_BYTES = 64 << 20


class ShardError(AslError, ValueError):
    """A shard that does not match the sample format."""


class NoManifestError(AslError, FileNotFoundError):
    """A local shard directory without a manifest (nothing built there yet)."""


class FeatureRangeError(AslError, ValueError):
    """Features that the chosen dtype cannot hold (they would be stored as inf); `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


class ShardWriter:
    """Writes a tar shard under a temporary name; `close()` renames it into place, `abort()` removes it.

    Plain POSIX ustar members with fixed headers (mode 0644, uid/gid 0, mtime 0), so the same
    samples always give the same bytes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._out = AtomicFile(self.path)
        self._hash = hashlib.sha256()

    @property
    def tmp(self) -> Path:
        """The temporary the shard is written under until `close`."""
        return self._out.tmp

    def write(self, members: Iterable[tuple[str, bytes]]) -> None:
        for name, data in members:
            for block in member_blocks(name, data):
                self._put(block)

    def _put(self, data: bytes) -> None:
        self._hash.update(data)
        self._out.write(data)

    def close(self) -> tuple[int, str]:
        """Finish the shard (end-of-archive blocks, fsync, rename); returns its size and sha256."""
        self._put(TAR_END)
        size = self._out.file.tell()
        self._out.commit()
        return size, self._hash.hexdigest()

    def abort(self) -> None:
        """Remove the partial shard; also when closing fails (on a full disk the flush inside close does)."""
        self._out.discard()


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
        try:
            yield from _grouped(tar_members(source, name), name)
        except TarError as exc:
            raise ShardError(f"{name}: not a readable tar shard ({exc.reason})") from None


def _grouped(members: Iterator[tuple[str, bytes]], name: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members of the same key as one sample."""
    key, group = None, {}
    for member, data in members:
        sample_key, _, ext = member.rpartition("/")[2].partition(".")
        if ext not in MEMBER_TYPES:
            raise ShardError(f"{name}: member {member!r} has a refused type {ext!r} (allowed: .npy, .cls, .json)")
        if sample_key != key and group:
            yield key, group
            group = {}
        key = sample_key
        group[ext] = data
    if group:
        yield key, group


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


def read_manifest(location: str | Path | Location, policy: ReadPolicy = DEFAULT_POLICY) -> dict[str, Any]:
    """The manifest of a shard location (directory, URL or pipe: template), checked by `manifest_problem`.

    At most MANIFEST_MAX_BYTES are read, remotely within `policy`'s time and in one attempt: a location that cannot
    give its manifest is a setting to correct before anything starts.
    """
    loc = as_location(location)
    url = loc.url(MANIFEST)
    try:
        manifest = json.loads(loc.read(MANIFEST, max_bytes=MANIFEST_MAX_BYTES, policy=policy.once()))
    except LocationError as exc:
        if loc.is_local and not Path(url).exists():
            raise NoManifestError(f"{url}: no manifest (run `asl-pipeline build-shards` first)") from None
        raise LocationError(f"cannot read the manifest: {exc}") from None
    except LocationSpecError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ShardError(f"{url}: not a JSON manifest ({str(exc)[:200]})") from None
    problem = manifest_problem(manifest)
    if problem:
        raise ShardError(f"{url}: {problem}")
    return manifest


def as_location(location: str | Path | Location) -> Location:
    return location if isinstance(location, Location) else Location.parse(location)


# How shards are named (their fold first); a manifest naming anything else is refused before any read.
SHARD_STEM = r"fold([0-9]+)-[0-9]{6,}"  # ASCII digits only: re's \d also takes "٣" and "３"
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
    if unprintable := next((k for k in label_map if not k.isprintable() or not k.strip()), None):
        return f"label_map sign {printable(repr(unprintable))} is empty or holds control characters"
    if not isinstance(config, dict) or config.get("layout") not in LAYOUTS or config.get("dtype") not in DTYPES:
        return f"config must give a layout in {LAYOUTS} and a dtype in {DTYPES}"
    folds, shards = manifest["folds"], manifest["shards"]
    if not isinstance(folds, list) or not all(isinstance(f, dict) and _ints(f, "fold", "samples") for f in folds):
        return "folds must be a list of objects with integer 'fold' and 'samples'"
    if not isinstance(shards, list):
        return "shards must be a list"
    longest_sign = max(map(len, label_map))
    for i, entry in enumerate(shards):
        problem = _entry_problem(entry, len(indices)) or _size_problem(entry, config, longest_sign)
        if problem:
            name = entry.get("name") if isinstance(entry, dict) else None
            return f"shards[{i}] ({printable(repr(name))}): {problem}"
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
_NPY_HEADER_MAX = 256  # np.save's header of a shard array is 128 bytes


def max_shard_bytes(entry: dict[str, Any], config: dict[str, Any], longest_sign: int) -> int:
    """The most bytes a shard of the entry's samples (their stored lengths) can take in the manifest's layout and
    dtype: the bound on a shard's declared size, so that a manifest cannot make a reader take gigabytes."""
    frames = np.asarray(entry["lengths"], dtype=np.int64)
    if config["layout"] == "padded":
        frames = np.full_like(frames, MAX_LEN)
    itemsize = np.dtype(config["dtype"]).itemsize
    header = _NPY_HEADER_MAX
    sizes = [
        header + frames * N_POINTS * N_CHANNELS * itemsize,
        header + frames * N_PACKED,
        np.full_like(frames, 20),
        np.full_like(frames, 1024 + 6 * longest_sign),
    ]  # x, missing, cls, json (\uXXXX escapes)
    if config["layout"] == "padded":
        sizes.append(np.full_like(frames, header + MAX_LEN))
    # each member: its header, its data rounded up to 512-byte blocks, and room for a pax header per sample
    blocks = sum(512 + -(-n // 512) * 512 for n in sizes) + 1024
    return int(blocks.sum()) + len(TAR_END) + 10240  # a tar tool's record padding


def _size_problem(entry: dict[str, Any], config: dict[str, Any], longest_sign: int) -> str | None:
    """Whether the entry declares more bytes than its samples can take."""
    bound = max_shard_bytes(entry, config, longest_sign)
    if entry["bytes"] > bound:
        return f"declares {entry['bytes']} bytes, more than its {entry['samples']} samples can take ({bound})"
    return None


def read_shard(
    location: Location,
    entry: dict[str, Any],
    check: str = "auto",
    policy: ReadPolicy = DEFAULT_POLICY,
    cache: CachedShards | None = None,
) -> bytes:
    """The bytes of one shard of the manifest: exactly its size and, with `check="sha256"`, its digest.

    `check="auto"` hashes what crosses a wire (http, pipe:) and not a local directory, whose
    shards the build wrote and `verify` checks: the digest costs about 10% of a worker's time.
    A remote shard is read as `policy` says (time, retries); with `cache` (this location's view of
    a `pipeline.cache.ShardCache`) it is read from the cache, fetched into it on a miss (always
    checked for sha256 then), the cached copy re-checked for size (and sha256 with `check="sha256"`).

    Anything else is a LocationError naming the shard (retried for a remote location: a
    connection cut short or a flipped byte on the wire may not happen twice).
    """
    if check not in SHARD_CHECKS:
        raise ValueError(f"check must be one of {SHARD_CHECKS}, got {check!r}")
    if cache is not None and not location.is_local:
        name, size = entry["name"], entry["bytes"]
        return cache.read(
            name,
            size,
            entry["sha256"],
            lambda: location.chunks(name, size, policy),
            check="sha256" if check == "sha256" else "size",
            policy=policy,
        )
    if check == "auto":
        check = "size" if location.is_local else "sha256"

    def problem(data: bytes) -> str | None:
        if len(data) != entry["bytes"]:
            return f"{len(data)} bytes, manifest says {entry['bytes']} (cut short or altered)"
        if check == "sha256" and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return "sha256 differs from the manifest (altered or corrupted)"
        return None

    return location.read(entry["name"], max_bytes=entry["bytes"], check=problem, policy=policy)


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


def verify_shards(
    location: str | Path | Location,
    manifest: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    policy: ReadPolicy = DEFAULT_POLICY,
    cache: CachedShards | None = None,
) -> list[str]:
    """Check every shard against the manifest (read from `location` unless given); returns the problems found.

    Size, sha256, then every sample decoded: keys, order and count, labels, layout. `progress(bytes)`
    is called after each shard. Remote shards are read as `read_shard` reads them, within `policy` (through `cache`
    when given: a cached copy is hashed, and fetched again when it differs).
    """
    loc = as_location(location)
    manifest = manifest if manifest is not None else read_manifest(loc, policy)
    problems = []
    for entry in manifest["shards"]:
        url = loc.url(entry["name"])
        try:  # a local file is read whatever its size, to say what else is wrong with it
            if cache is not None and not loc.is_local:
                data = read_shard(loc, entry, "sha256", policy, cache)
            else:
                data = loc.read(entry["name"], max_bytes=None if loc.is_local else entry["bytes"], policy=policy)
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


def manifest_totals(manifest: dict[str, Any]) -> dict[str, int]:
    """Shards, samples and bytes, counted from the manifest's shard entries (which `manifest_problem` checked)."""
    shards = manifest["shards"]
    return {
        "shards": len(shards),
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
    }


_LENGTH_KEYS = ("count", "min", "p25", "median", "mean", "p75", "p95", "p99", "max", "truncated")


def summary_problem(manifest: dict[str, Any]) -> str | None:
    """What `manifest_stats` needs beyond what training needs (totals, participants, length statistics), or None."""
    totals, lengths = manifest.get("totals"), manifest.get("lengths")
    if not isinstance(totals, dict) or not _ints(totals, "samples", "shards", "bytes", "rejected"):
        return "totals must be an object with integer 'samples', 'shards', 'bytes' and 'rejected'"
    if not all(_ints(f, "shards") and isinstance(f.get("participants"), list) for f in manifest["folds"]):
        return "every fold must have an integer 'shards' and a list of 'participants'"
    keys = _LENGTH_KEYS if isinstance(lengths, dict) and lengths.get("count") != 0 else ("count",)
    if not isinstance(lengths, dict) or not all(_number(lengths.get(k)) for k in keys):
        return f"lengths must be an object of numbers {', '.join(_LENGTH_KEYS)} (only count when it is 0)"
    return None


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def manifest_stats(manifest: dict[str, Any], top: int = 10, source: str = MANIFEST) -> dict[str, Any]:
    """Counts per fold and sign, the raw length distribution and a histogram of stored lengths, from a manifest.

    `most`/`fewest`: the `top` signs at each end of the count ranking as `(sign, count)`, sign names escaped
    for printing; `histogram`: `(low, high, count)` per bin `[low, high)` of stored lengths, the last bin
    holding the sequences of exactly MAX_LEN frames (most of them truncated). A ShardError naming `source`
    when the manifest lacks the summaries (`summary_problem`).
    """
    if problem := summary_problem(manifest):
        raise ShardError(f"{source}: {problem}")
    names = {index: printable(sign) for sign, index in manifest["label_map"].items()}
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
