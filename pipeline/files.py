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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import AslError

log = logging.getLogger(__name__)


class LockHeldError(AslError, OSError):
    """Another running process holds the lock; `pid` is its process id as it wrote it (or "unknown")."""

    def __init__(self, path: str | Path, pid: str) -> None:
        super().__init__(f"{path}: held by another process (pid {pid})")
        self.pid = pid


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
