"""Files that are whole or absent: atomic writes, and a lock that names its holder.

Used for everything a crash must not leave half-written (shards' sidecars, manifests, checkpoints,
logs, exported models) and for directories one process at a time may write into.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import AslError

log = logging.getLogger(__name__)


class LockHeldError(AslError, OSError):
    """Another running process holds the lock; `pid` is its process id as it wrote it (or "unknown")."""

    def __init__(self, path: str | Path, pid: str) -> None:
        super().__init__(f"{path}: held by another process (pid {pid})")
        self.pid = pid


class AtomicFile:
    """The next version of `path`, written under a temporary name beside it (`file`, buffered) and renamed over it
    by `commit`.

    The temporary is created exclusively (`O_CREAT | O_EXCL | O_NOFOLLOW`), never opened through a name that
    already exists: a file or a symbolic link left at `PATH.tmp` (by a killed writer, or planted) is neither
    written nor followed; another free name is taken instead. Readers see the old file or the new one, never a
    part; with `durable` (the default) an fsync before the rename makes it durable only with complete contents
    behind it.
    """

    def __init__(self, path: str | Path, durable: bool = True) -> None:
        self.path, self.durable = Path(path), durable
        fd, self.tmp = _exclusive_temporary(self.path)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self) -> None:
        """Flush (and fsync), then rename over `path`; the temporary is removed if that fails."""
        try:
            self.file.flush()
            if self.durable:
                os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Close and remove the temporary: `path` stays as it was."""
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def _exclusive_temporary(path: Path) -> tuple[int, Path]:
    """A new file beside `path` and its name: `PATH.tmp` when that name is free (build-shards sweeps those after a
    kill), else `PATH.<pid>.<random>.tmp`."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    name = path.name + ".tmp"
    while True:
        tmp = path.with_name(name)
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            name = f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


@contextlib.contextmanager
def atomic_file(path: str | Path, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file whose contents replace `path` when the block ends without an error (`AtomicFile`); on an
    error `path` stays as it was."""
    out = AtomicFile(path, durable)
    try:
        yield out.file
    except BaseException:
        out.discard()
        raise
    out.commit()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` by a file holding `data`, whole or not at all (`AtomicFile`)."""
    with atomic_file(path) as f:
        f.write(data)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON with `write_atomic`."""
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold the lock file `path` (created if absent, removed on release); LockHeldError while another holds it.

    An flock, which the kernel drops when its holder dies (even by SIGKILL): a lock file left
    behind by a dead process is stale and simply taken over. The pid written inside is for the
    message only.
    """
    path = Path(path)
    fd = _lock_fd(path)
    try:
        stale = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if stale:
            log.warning("%s: left by pid %s, which is no longer running; taking it over", path, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _lock_fd(path: Path) -> int:
    """An open descriptor of `path`, flock-ed exclusively, that is still the file at `path`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeldError(path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder removes the file before unlocking: lock the file that is there now.
        try:
            mine, now = os.fstat(fd), os.stat(path)
            if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
