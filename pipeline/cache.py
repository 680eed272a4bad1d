"""A verified local cache of the shards of remote locations, shared by the processes of one node.

    cache = ShardCache("/local/cache", limit_bytes=50 * 2**30)
    shards = cache.open("https://data.example.org/asl/shards/", manifest["fingerprint"])
    data = shards.read(entry["name"], entry["bytes"], entry["sha256"], fetch=lambda: http_chunks(url, entry["bytes"]))

Only remote locations (http(s), `pipe:`) are meant to be cached: the caller decides, and never
caches a local directory (its shards already are local files; a copy would only cost disk and time).

Layout: `ROOT/<key>/<shard name>` with `ROOT/<key>/location.json` saying which location and build
the entry directory holds; `key = sha256("<location>|<fingerprint>")[:16]`, so two locations, or two
builds at one location, never share an entry.

Every read re-checks the cached file against the manifest: size always; sha256 when asked, and also
whenever the file's mtime differs from the one stamped when it was stored (`.<name>.ok`), so a file
written to after it was stored is hashed even under a size-only check. A file that fails is dropped
and fetched again, with one warning.

A fetch streams into a temporary file beside the entry (`pipeline.files.AtomicFile`: `<name>.tmp`, created
exclusively), is checked for size and sha256, then renamed: a process killed mid-fill leaves only the
temporary, which the next fill of that shard (or the next `open`) removes. Past `limit_bytes`, the
least recently read entries (by access time, set on every read) are evicted, never one being read,
filled or pinned (`pin`) by any process.

Locks are `flock`s, released by the kernel when a process dies; the cache directory must be on a
node-local filesystem (flock over NFS is not reliable). Per entry:
`.<name>.fill`: exclusive while it is fetched, so the ranks of a node wait for one fetch instead of
each fetching; `.<name>.use`: shared while it is read or pinned, and taken exclusive (without
waiting) to evict it.

The cache owns its root: a new or empty directory is marked with `.asl-shard-cache`, and a directory
that holds anything else (or a filesystem root, or one holding the run's output) is refused.
Eviction considers only what the cache stored (real files of shard names, stamped, in real entry
directories), and never follows a symbolic link.

Failures: a cache directory that is a file, cannot be created or written, is not the cache's, a
limit that is not positive or smaller than a shard are `CacheError`s (one line, at `ShardCache()` or the read): each is
a setting to correct before a long run, not something to discover later in a traffic bill. A disk
that fills up (or a filesystem turned read-only) during a run is not: the run goes on uncached, with
one warning, rather than stop or crowd out the checkpoints that share the disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import AslError
from pipeline.files import AtomicFile, write_atomic, write_json_atomic
from pipeline.location import Location, LocationError
from pipeline.policy import DEFAULT_POLICY, ReadPolicy
from pipeline.read import InputFileError, read_file
from pipeline.text import printable

log = logging.getLogger(__name__)

CHECKS = ("size", "sha256")
Fetch = Callable[[], "Iterator[bytes] | bytes"]
_META = "location.json"
MARKER = ".asl-shard-cache"  # in a cache's root: the directory is the cache's, and eviction may delete in it
_TEMPORARY = re.compile(r"(.+?)(?:\.\d+\.[0-9a-f]{8})?\.tmp")  # `pipeline.files` temporaries: (the name)
_KEY = re.compile(r"[0-9a-f]{16}")  # an entry directory's name
_ENTRY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)  # the shard names a location accepts


class CacheError(AslError, OSError):
    """A cache directory or limit that cannot be used: one line naming the directory and the reason."""


class ShardCache:
    """A cache directory, optionally bounded to `limit_bytes` in all (every location and build together)."""

    def __init__(self, root: str | Path, limit_bytes: int | None = None, outputs: Iterable[str | Path] = ()) -> None:
        self.root = Path(root)
        if limit_bytes is not None and limit_bytes <= 0:
            raise CacheError(f"{self.root}: the cache limit must be positive, got {limit_bytes} bytes")
        self.limit_bytes = limit_bytes
        _check_usable(self.root, outputs)
        free = shutil.disk_usage(self.root).free
        if limit_bytes is not None and limit_bytes > free + self.size():
            log.warning(
                "%s: cache limit %s is more than the disk's free space (%s); it fills the disk first",
                self.root,
                _mb(limit_bytes),
                _mb(free),
            )

    def open(self, location: str | Location, fingerprint: str, largest: int = 0) -> CachedShards:
        """The entries of one location and build; CacheError when `largest` (bytes of the largest shard
        to be read) cannot fit under the limit."""
        return CachedShards(self, Location.parse(str(location)), fingerprint, largest)

    def entries(self) -> list[Path]:
        """The cached shard files of every location and build: only files this cache stored (its own names, each
        with its stamp), never through a symbolic link."""
        return [d / name for d in _entry_dirs(self.root) for name in _entry_names(d)]

    def size(self) -> int:
        """Bytes held by the cached shard files."""
        return sum(_size(p) for p in self.entries())

    def evict(self, room: int = 0) -> bool:
        """Drop least recently read entries until `room` more bytes fit under the limit; False when they
        cannot (the rest are being read, filled or pinned)."""
        if self.limit_bytes is None:
            return True
        with _locked(self.root / ".evict", fcntl.LOCK_EX):  # one scan at a time: two evictors would overshoot
            entries = sorted((_last_use(p), _size(p), p) for p in self.entries())
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total + room <= self.limit_bytes:
                    break
                if _drop_unused(path):
                    total -= size
                    log.info("%s: evicted (least recently read; cache limit %s)", path, _mb(self.limit_bytes))
            return total + room <= self.limit_bytes


class CachedShards:
    """One location's and build's entries in a `ShardCache`; `read` is the only way in."""

    def __init__(self, cache: ShardCache, location: Location, fingerprint: str, largest: int = 0) -> None:
        self.cache, self.location, self.fingerprint = cache, location, fingerprint
        key = hashlib.sha256(f"{location.kind}:{location.base}|{fingerprint}".encode()).hexdigest()[:16]
        self.dir = cache.root / key
        self._pins: dict[str, int] = {}
        self._uncached: str | None = None  # why fills are no longer written, once they cannot be
        self._said: set[str] = set()  # the kinds of warning given, each given once
        if largest:
            self._check_fits("a shard", largest)
        try:
            self.dir.mkdir(exist_ok=True)
            if not _is_key_dir(self.dir):
                raise CacheError(f"{self.dir}: an entry directory is a link or not a directory; remove it")
            _claim(self.dir / _META, {"location": location.spec, "fingerprint": fingerprint})
        except CacheError:
            raise
        except OSError as exc:
            raise CacheError(f"{self.dir}: cannot use the cache directory ({exc.strerror or exc})") from None
        for tmp in self.dir.glob("*.tmp"):  # left by killed fills; a fill still running holds its lock
            name = _TEMPORARY.fullmatch(tmp.name)
            if name and _ENTRY.fullmatch(name[1]) and name[1] != _META:  # location.json's: another opener's
                lock = _locked(self._lock(name[1], "fill"), fcntl.LOCK_EX | fcntl.LOCK_NB)
                with contextlib.suppress(BlockingIOError), lock:
                    tmp.unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        """Where shard `name` is cached (a name a location refuses is refused here too)."""
        self.location.url(name)
        return self.dir / name

    def read(
        self, name: str, size: int, sha256: str, fetch: Fetch, check: str = "size", policy: ReadPolicy = DEFAULT_POLICY
    ) -> bytes:
        """The bytes of shard `name`: `size` bytes with digest `sha256` (the manifest's entry).

        A cached copy is checked (size, and sha256 with `check="sha256"`); without one, `fetch()`
        (the file's bytes, or its chunks) is checked for size and sha256, stored and returned. A fetch
        that fails (LocationError, or a mismatch) is tried again `policy.retries` times, after `policy.retry_wait`.
        """
        if check not in CHECKS:
            raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
        path = self.path(name)
        self._check_fits(self.location.url(name), size)
        with _locked(self._lock(name, "use"), fcntl.LOCK_SH):  # no eviction while it is read
            data = _cached(path, size, sha256, check)
            if data is None:
                with _locked(self._lock(name, "fill"), fcntl.LOCK_EX):  # others wait for one fetch
                    data = _cached(path, size, sha256, check)  # filled by the process we waited for?
                    if data is None:
                        data = self._refill(name, path, size, sha256, fetch, policy)
            with contextlib.suppress(FileNotFoundError):  # the last use, which eviction goes by: the access time
                os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))  # (the stamp's mtime kept)
        return data

    def pin(self, names: Iterable[str]) -> None:
        """Keep these entries from eviction by any process until `unpin` (or this process ends)."""
        for name in names:
            if name not in self._pins:
                fd = os.open(self._lock(name, "use"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                fcntl.flock(fd, fcntl.LOCK_SH)
                self._pins[name] = fd

    def unpin(self, names: Iterable[str] | None = None) -> None:
        """Let these entries (default: all this view pinned) be evicted again."""
        for name in list(self._pins) if names is None else names:
            fd = self._pins.pop(name, None)
            if fd is not None:
                os.close(fd)

    def _refill(self, name: str, path: Path, size: int, sha256: str, fetch: Fetch, policy: ReadPolicy) -> bytes:
        """Drop a bad entry (saying so), then fetch it, `retries` more times if the fetch fails."""
        if path.exists() or path.is_symlink():
            log.warning(
                "%s: cached copy of %s differs from the manifest (size or sha256); fetched again",
                path,
                self.location.url(name),
            )
            path.unlink(missing_ok=True)
        for tmp in self.dir.glob(f"{glob.escape(name)}*.tmp"):  # we hold its fill lock: a killed fill's temporary
            if (found := _TEMPORARY.fullmatch(tmp.name)) and found[1] == name:
                tmp.unlink(missing_ok=True)
        for attempt in range(policy.retries + 1):
            try:
                return self._fill(name, path, size, sha256, fetch)
            except LocationError as exc:
                if attempt == policy.retries:
                    raise
                log.warning("%s (attempt %d of %d; retrying)", exc, attempt + 1, policy.retries + 1)
                time.sleep(policy.retry_wait(attempt))
        raise AssertionError("unreachable")

    def _fill(self, name: str, path: Path, size: int, sha256: str, fetch: Fetch) -> bytes:
        """Fetch, check and (while the cache can take it) store one shard."""
        url = self.location.url(name)
        out = self._create(path, url, size)
        digest, chunks, total = hashlib.sha256(), [], 0
        try:
            got = fetch()
            with contextlib.closing(_chunks(got)) as stream:
                for chunk in stream:
                    total += len(chunk)
                    if total > size:
                        raise LocationError(f"{url}: more than the {size} bytes expected")
                    digest.update(chunk)
                    chunks.append(chunk)
                    if out is not None and not self._write(out, chunk, url):
                        out = None
            if total != size:
                raise LocationError(f"{url}: {total} bytes, manifest says {size} (cut short or altered)")
            if digest.hexdigest() != sha256:
                raise LocationError(f"{url}: sha256 differs from the manifest (altered or corrupted)")
            if out is not None:
                try:
                    out.file.flush()
                    _write_stamp(path, os.fstat(out.file.fileno()), sha256)  # mtime: fixed by the last write
                    out.commit()  # complete contents behind the rename, even after a crash of the machine
                    out = None
                except OSError as exc:
                    self._stop_caching(url, exc)
        finally:
            if out is not None:
                out.discard()
        self.cache.evict()  # concurrent fills may each have made room for themselves only
        return b"".join(chunks)

    def _create(self, path: Path, url: str, size: int) -> AtomicFile | None:
        """The entry's next version (`pipeline.files.AtomicFile`), or None when this shard is not to be stored."""
        if self._uncached is not None:
            return None
        if not self.cache.evict(room=size):
            limit = _mb(self.cache.limit_bytes)
            self._warn_once(
                "limit",
                f"{self.cache.root}: the cache limit {limit} is taken by shards being read "
                f"or pinned; {url} and others read without caching",
            )
            return None
        try:
            return AtomicFile(path)
        except OSError as exc:
            self._stop_caching(url, exc)
            return None

    def _write(self, out: AtomicFile, chunk: bytes, url: str) -> bool:
        """Write a whole chunk; False (the temporary dropped, caching stopped, said once) when the disk refuses it."""
        try:
            out.write(chunk)
            return True
        except OSError as exc:
            out.discard()
            self._stop_caching(url, exc)
            return False

    def _stop_caching(self, url: str, exc: OSError) -> None:
        reason = exc.strerror or str(exc)
        self._uncached = reason
        full = " (full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        self._warn_once(
            "write",
            f"{self.dir}: cannot write the cache{full}: {reason}; reading {url} and the following "
            "shards without caching",
        )

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._said:
            self._said.add(kind)
            log.warning("%s", message)

    def _check_fits(self, what: str, size: int) -> None:
        limit = self.cache.limit_bytes
        if limit is not None and size > limit:
            raise CacheError(
                f"{self.cache.root}: cache limit {_mb(limit)} is smaller than {what} ({_mb(size)}); "
                "raise the limit or leave it unset"
            )

    def _lock(self, name: str, kind: str) -> Path:
        return self.dir / f".{name}.{kind}"


def cache_view(
    cache_dir: str | Path | None,
    limit_gb: float | None,
    location: str | Location,
    manifest: dict[str, Any],
    outputs: Iterable[str | Path] = (),
) -> CachedShards | None:
    """The cache of `location`'s shards under `cache_dir` (`--cache-dir`, `--cache-limit` in GB), or None without
    a cache directory or for a local directory (never cached: its shards already are local files). `outputs` are
    the run's output directories, which the cache directory must not hold.

    Opened before any shard is read, so a directory or limit that cannot work is one line at once.
    """
    limit = limit_bytes(limit_gb)
    loc = Location.parse(str(location))
    if cache_dir is None:
        return None
    if loc.is_local:
        log.info("%s is a local directory: its shards are read in place, not cached in %s", loc, cache_dir)
        return None
    largest = max((s["bytes"] for s in manifest["shards"]), default=0)
    return ShardCache(cache_dir, limit, outputs).open(loc, manifest["fingerprint"], largest=largest)


def limit_bytes(limit_gb: float | None) -> int | None:
    """`--cache-limit` (GB) in bytes; CacheError unless it is a finite number above 0."""
    if limit_gb is None:
        return None
    size = limit_gb * 1e9 if isinstance(limit_gb, int | float) and not isinstance(limit_gb, bool) else math.nan
    if not (math.isfinite(size) and size >= 1):
        raise CacheError(f"--cache-limit {limit_gb}: must be a finite number of GB above 0")
    return int(size)


def _check_usable(root: Path, outputs: Iterable[str | Path] = ()) -> None:
    """CacheError unless `root` is (or can be made) a writable directory that this cache owns: marked by
    MARKER, or new or empty (then marked now). A filesystem root, a directory that holds anything else, or one
    that holds an output directory of the run (`outputs`) is refused: eviction would be deleting in it."""
    try:
        if root.exists() and not root.is_dir():
            raise CacheError(f"{root}: the cache directory is a file, not a directory")
        real = root.resolve()
        if real == real.parent:
            raise CacheError(f"{root}: a filesystem root cannot be the cache directory; give a directory of its own")
        for out in outputs:
            if Path(out).resolve().is_relative_to(real):
                raise CacheError(
                    f"{root}: the cache directory holds the run's output directory {out}; give the cache a "
                    "directory of its own"
                )
        root.mkdir(parents=True, exist_ok=True)
        _claim_root(root)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except CacheError:
        raise
    except OSError as exc:
        raise CacheError(f"{root}: cannot write the cache directory ({exc.strerror or exc})") from None


def _claim_root(root: Path) -> None:
    """Mark `root` as a shard cache's (once), or CacheError when it holds anything this cache did not write."""
    marker = root / MARKER
    if _is_marker(marker):
        return
    foreign = sorted(name for name in os.listdir(root) if not _cache_owned(root, name))
    if foreign and not _is_marker(marker):  # (marked meanwhile: another process of the node opened it first)
        shown = ", ".join(printable(name) for name in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise CacheError(
            f"{root}: not a shard cache directory (no {MARKER} file) and not empty (holds {shown}); "
            "give a new or empty directory, which the cache then owns"
        )
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        if _is_marker(marker):  # marked by another process at the same moment
            return
        raise
    with os.fdopen(fd, "w") as f:
        f.write("A shard cache of asl-pipeline: it deletes only the entries it stored here.\n")


def _is_marker(path: Path) -> bool:
    return stat.S_ISREG(_lstat_mode(path))


def _cache_owned(root: Path, name: str) -> bool:
    """Whether a name in a cache root without marker is the cache's own (a cache from before the marker)."""
    if name in (".evict", MARKER, "lost+found") or name.startswith(".probe-"):  # lost+found: a mount point's
        return True
    path = root / name
    return _is_key_dir(path) and (path / _META).is_file()


def _is_key_dir(path: Path) -> bool:
    """A real directory (not a link to one) named as the cache names entry directories."""
    return bool(_KEY.fullmatch(path.name)) and stat.S_ISDIR(_lstat_mode(path))


def _entry_dirs(root: Path) -> list[Path]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return [root / name for name in sorted(names) if _is_key_dir(root / name)]


def _entry_names(directory: Path) -> list[str]:
    """The shard files the cache stored in an entry directory: regular files (not links) of the names the
    cache gives, each with its stamp beside it."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [
        name
        for name in sorted(names)
        if _ENTRY.fullmatch(name)
        and name != _META
        and not name.endswith(".tmp")
        and stat.S_ISREG(_lstat_mode(directory / name))
        and stat.S_ISREG(_lstat_mode(directory / f".{name}.ok"))
    ]


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def _claim(meta: Path, owner: dict[str, str]) -> None:
    """Record which location and build an entry directory holds; CacheError if it holds another's."""
    if meta.exists():
        try:
            found = json.loads(meta.read_text())
        except (OSError, ValueError):
            found = None
        if found == owner:
            return
        if found is not None:  # a 64-bit key collision, or an edited file: never mix two locations' shards
            raise CacheError(
                f"{meta}: entry directory already holds {found.get('location')!r} build "
                f"{found.get('fingerprint')!r}; use another cache directory"
            )
    write_json_atomic(meta, owner)


def _cached(path: Path, size: int, sha256: str, check: str) -> bytes | None:
    """The cached file's bytes if it is the manifest's shard (size, and sha256 if asked or if the file was
    modified since it was stored: its mtime is no longer the stamp's); None otherwise."""
    try:
        mtime = os.stat(path).st_mtime_ns
        data = read_file(path, size)  # the input gate: regular files only, never more than `size` bytes
    except (InputFileError, OSError):
        return None  # absent, larger, not a regular file, unreadable: fetched again
    if len(data) != size:
        return None
    if (check == "sha256" or _stamp(path) != f"{size} {mtime} {sha256}") and hashlib.sha256(data).hexdigest() != sha256:
        return None
    return data


def _write_stamp(path: Path, st: os.stat_result, sha256: str) -> None:
    """Record the stored file's size, mtime (`st`: its temporary's, which the rename keeps) and digest beside it
    (`.<name>.ok`): a later write to the file changes its mtime, and the next read then hashes it even when only
    sizes are checked."""
    write_atomic(path.with_name(f".{path.name}.ok"), f"{st.st_size} {st.st_mtime_ns} {sha256}".encode())


def _stamp(path: Path) -> str | None:
    try:
        return path.with_name(f".{path.name}.ok").read_text()
    except OSError:
        return None


def _chunks(got: Iterator[bytes] | bytes) -> Iterator[bytes]:
    """A fetch's result as chunks (closing the fetch's own iterator when abandoned)."""
    if isinstance(got, bytes | bytearray | memoryview):
        yield bytes(got)
        return
    try:
        yield from got
    finally:
        close = getattr(got, "close", None)
        if close is not None:
            close()


def _drop_unused(path: Path) -> bool:
    """Delete an entry unless some process reads, fills or pins it; names are unlinked inside the entry directory
    opened without following a link, so nothing outside the cache is ever removed."""
    try:
        with _locked(path.with_name(f".{path.name}.use"), fcntl.LOCK_EX | fcntl.LOCK_NB):
            try:
                fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return False
            try:
                for name in (path.name, f".{path.name}.ok"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=fd)
            finally:
                os.close(fd)
            return True
    except (BlockingIOError, OSError):
        return False


@contextlib.contextmanager
def _locked(lock: Path, how: int) -> Iterator[None]:
    """Hold `flock(how)` on the file `lock` (created if absent, never through a link; lock files stay: deleting one
    races its users)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


def _last_use(path: Path) -> int:
    try:
        return path.lstat().st_atime_ns
    except FileNotFoundError:
        return 0


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 1e6:.1f} MB"
