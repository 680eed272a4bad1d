"""Where a shard set lives, and whole files read from it through webdataset's openers.

A location is one of:

- a local directory, or a `file://` URL of one;
- an `http://` or `https://` URL of the directory that holds `manifest.json` and the shards
  (read with `curl`, as webdataset's own `gopen` does for these schemes);
- a `pipe:` command template in which `{}` stands for a file name of that directory, e.g.
  `pipe:aws s3 cp s3://bucket/asl/{} -` (webdataset's `pipe:` form, run by the shell).

Remote reads never hang: a command that stalls for `stall_s` seconds is killed, a non-zero
exit status is an error carrying the command's own message, and callers bound the size and
check the bytes (`pipeline.shards.read_shard` against the manifest's size and sha256).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import Pipe

from pipeline.read import InputFileError, read_file

log = logging.getLogger(__name__)

STALL_S = 60.0  # seconds without a byte before a remote read is abandoned
RETRIES = 2  # further attempts after a failed remote read
_CHUNK = 1 << 20
# File names a location may be asked for: what build-shards writes. Anything else (a manifest
# naming "../x" or "a; rm -rf ~") never reaches a path or a shell command.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class LocationError(OSError):
    """A file of a location that could not be read: the message names its URL and the reason."""


@dataclass(frozen=True)
class Location:
    """A parsed shard location; `url(name)` is the address of one of its files."""

    spec: str  # as the user wrote it
    kind: str  # "local", "http" or "pipe"
    base: str  # the directory path, the URL without its trailing "/", or the command template

    @classmethod
    def parse(cls, spec: str | Path) -> Location:
        """A location from a path, `file://`, `http(s)://` or `pipe:...{}...`; ValueError for anything else."""
        text = str(spec)
        if text.startswith("pipe:"):
            if "{}" not in text:
                raise ValueError(f"{text}: a pipe: location needs {{}} where the file name goes, "
                                 "e.g. 'pipe:aws s3 cp s3://bucket/shards/{} -'")  # fmt: skip
            return cls(text, "pipe", text.removeprefix("pipe:"))
        scheme = urlparse(text).scheme.lower()
        if scheme in ("http", "https"):
            return cls(text, "http", text.rstrip("/"))
        if scheme == "file":
            return cls(text, "local", url2pathname(urlparse(text).path))
        if scheme and len(scheme) > 1:  # one letter: a Windows drive, i.e. a path
            raise ValueError(
                f"{text}: unsupported location scheme {scheme!r}; use a directory, file://, http(s):// or a "
                f"pipe: template such as 'pipe:aws s3 cp {text.rstrip('/')}/{{}} -'"
            )
        return cls(text, "local", text)

    def __str__(self) -> str:
        return self.spec

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def path(self) -> Path:
        """The directory of a local location."""
        if not self.is_local:
            raise ValueError(f"{self.spec} is not a local directory")
        return Path(self.base)

    def url(self, name: str) -> str:
        """The address of file `name` of this location (a path, an http URL or a pipe: command)."""
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError(f"{self.spec}: refused file name {name!r}")
        if self.kind == "local":
            return str(Path(self.base) / name)
        if self.kind == "http":
            return f"{self.base}/{name}"
        return "pipe:" + self.base.replace("{}", name)

    def read(
        self,
        name: str,
        max_bytes: int | None = None,
        check: Callable[[bytes], str | None] | None = None,
        stall_s: float = STALL_S,
        retries: int = 0,
    ) -> bytes:
        """The whole content of file `name`, or a LocationError naming its URL and the reason.

        Reading more than `max_bytes` is an error; `check(data)` may return a problem, which is an
        error too. A remote read that fails either way is tried again, `retries` times (a fresh
        read each time, after 1 s, 2 s, 4 s...); a local one is not (it would fail the same way).
        """
        url = self.url(name)
        for attempt in range(1 if self.is_local else retries + 1):
            try:
                data = _read_local(url, max_bytes) if self.is_local else _read_remote(url, self._argv(url), max_bytes,
                                                                                       stall_s)  # fmt: skip
                problem = check(data) if check else None
                if problem:
                    raise LocationError(f"{url}: {problem}")
                return data
            except LocationError as exc:
                if self.is_local or attempt == retries:
                    raise
                log.warning("%s (attempt %d of %d; retrying)", exc, attempt + 1, retries + 1)
                time.sleep(2.0**attempt)
        raise AssertionError("unreachable")

    def _argv(self, url: str) -> list[str] | str:
        """The command that writes the file to stdout: curl for http(s) (as webdataset's gopen), else the template."""
        if self.kind == "http":
            return ["curl", "--silent", "--show-error", "--fail", "--location", "--connect-timeout", "15", url]
        return url.removeprefix("pipe:")


def _read_local(path: str, max_bytes: int | None) -> bytes:
    """A regular file's bytes, through the pipeline's one input gate (`pipeline.read.read_file`): a FIFO,
    device or directory is refused, never opened blocking or read without end."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise LocationError(f"{path}: {'file not found' if exc.errno == errno.ENOENT else exc.strerror}") from None
    if max_bytes is not None and size > max_bytes:
        raise LocationError(f"{path}: {size} bytes, more than the {max_bytes} expected")
    try:
        return read_file(path, sys.maxsize)
    except InputFileError as exc:
        raise LocationError(str(exc)) from None


def _read_remote(url: str, argv: list[str] | str, max_bytes: int | None, stall_s: float) -> bytes:
    """Run the command of `url` through webdataset's `Pipe` and collect its stdout, bounded in time and size."""
    shell = isinstance(argv, str)
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty command cannot block on it
        try:
            pipe = Pipe(argv, mode="rb", shell=shell, bufsize=0, stderr=err, stdin=subprocess.DEVNULL,
                        start_new_session=True)  # fmt: skip
        except OSError as exc:
            what = "the shell" if shell else argv[0]
            raise LocationError(f"{url}: cannot run {what} ({exc.strerror or exc})") from None
        try:
            data = _drain(pipe, url, max_bytes, stall_s)
            status = pipe.proc.wait(timeout=stall_s)
        except BaseException:
            _kill(pipe)
            raise
        if status != 0:
            err.seek(0)
            message = err.read()[-2000:].decode(errors="replace").strip().splitlines()
            reason = message[-1] if message else "no message"
            what = "the pipe: command" if shell else argv[0]
            raise LocationError(f"{url}: {what} failed with exit status {status}: {reason}")
    return data


def _drain(pipe: Pipe, url: str, limit: int | None, stall_s: float) -> bytes:
    """Everything the command writes, in chunks; LocationError after `stall_s` s without a byte or past `limit`."""
    fd, chunks, total = pipe.stream.fileno(), [], 0
    with contextlib.suppress(AttributeError, OSError):  # Linux: 1 MB chunks instead of 64 kB: fewer reads and selects
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _CHUNK)
    while True:
        ready, _, _ = select.select([fd], [], [], stall_s)
        if not ready:
            raise LocationError(f"{url}: no data for {stall_s:g} s (stalled server or command); abandoned")
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            pipe.stream.close()
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if limit is not None and total > limit:
            raise LocationError(f"{url}: more than the {limit} bytes expected")


def _kill(pipe: Pipe) -> None:
    """Stop the command and everything it started (it runs in its own session), then reap it."""
    with contextlib.suppress(OSError):  # already gone
        os.killpg(pipe.proc.pid, signal.SIGKILL)
    pipe.stream.close()
    pipe.proc.wait()
