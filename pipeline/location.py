"""Where a shard set lives, and whole files read from it: one table, `SCHEMES`, of scheme -> reader.

A location is one of:

- a local directory, or a `file://` URL of one;
- an `http://` or `https://` URL of the directory that holds `manifest.json` and the shards
  (read with `curl`, as webdataset's own `gopen` does for these schemes);
- a `pipe:` command template in which `{}` stands for a file name of that directory, e.g.
  `pipe:aws s3 cp s3://bucket/asl/{} -` (webdataset's `pipe:` form, run by the shell).

Remote reads never hang: a command that stalls for `stall_s` seconds is killed, a non-zero
exit status is an error carrying the command's own message, and callers bound the size and
check the bytes (`pipeline.shards.read_shard` against the manifest's size and sha256). webdataset
(whose import loads torch) is imported only when a remote location is read, never by the offline stage.
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
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from pipeline.errors import AslError
from pipeline.read import InputFileError, read_file

log = logging.getLogger(__name__)

STALL_S = 60.0  # seconds without a byte before a remote read is abandoned
RETRIES = 2  # further attempts after a failed remote read
_CHUNK = 1 << 20
# File names a location may be asked for: what build-shards writes. Anything else (a manifest
# naming "../x" or "a; rm -rf ~") never reaches a path or a shell command.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class LocationError(AslError, OSError):
    """A file of a location that could not be read: the message names its URL and the reason."""


class LocationSpecError(AslError, ValueError):
    """A location that cannot be used as written (unknown scheme, a pipe: without {}, a refused file name)."""


@dataclass(frozen=True)
class Location:
    """A parsed shard location; `url(name)` is the address of one of its files."""

    spec: str  # as the user wrote it
    scheme: str  # its key in SCHEMES
    base: str  # the directory path, the URL without its trailing "/", or the command template

    @classmethod
    def parse(cls, spec: str | Path) -> Location:
        """A location from a path or a URL of a scheme in SCHEMES; LocationSpecError for anything else."""
        text = str(spec)
        scheme = urlparse(text).scheme.lower()
        if len(scheme) <= 1:  # no scheme, or one letter: a Windows drive, i.e. a path
            scheme = ""
        if scheme not in SCHEMES:
            *others, last = sorted(f"{name}:" for name in SCHEMES if name)
            raise LocationSpecError(
                f"{text}: unsupported location scheme {scheme!r}; use a directory or a {', '.join(others)} or "
                f"{last} location, e.g. 'pipe:aws s3 cp {text.rstrip('/')}/{{}} -'"
            )
        return cls(text, scheme, SCHEMES[scheme].base(text))

    def __str__(self) -> str:
        return self.spec

    @property
    def kind(self) -> str:
        """ "local", "http" or "pipe": what kind of place this is, whatever the scheme's spelling."""
        return SCHEMES[self.scheme].kind

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def path(self) -> Path:
        """The directory of a local location."""
        if not self.is_local:
            raise LocationSpecError(f"{self.spec} is not a local directory")
        return Path(self.base)

    def url(self, name: str) -> str:
        """The address of file `name` of this location (a path, an http URL or a pipe: command)."""
        if not _SAFE_NAME.fullmatch(name):
            raise LocationSpecError(f"{self.spec}: refused file name {name!r}")
        return SCHEMES[self.scheme].join(self.base, name)

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
        url, opener = self.url(name), SCHEMES[self.scheme].read
        attempts = 1 if self.is_local else retries + 1
        for attempt in range(attempts):
            try:
                data = opener(url, max_bytes, stall_s)
                problem = check(data) if check else None
                if problem:
                    raise LocationError(f"{url}: {problem}")
                return data
            except LocationError as exc:
                if attempt == attempts - 1:
                    raise
                log.warning("%s (attempt %d of %d; retrying)", exc, attempt + 1, attempts)
                time.sleep(2.0**attempt)
        raise AssertionError("unreachable")


def _read_local(path: str, max_bytes: int | None, stall_s: float) -> bytes:
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


def _read_http(url: str, max_bytes: int | None, stall_s: float) -> bytes:
    """An http(s) URL's content, read with curl as webdataset's own gopen reads these schemes."""
    argv = ["curl", "--silent", "--show-error", "--fail", "--location", "--connect-timeout", "15", url]
    return _read_command(url, argv, max_bytes, stall_s)


def _read_pipe(url: str, max_bytes: int | None, stall_s: float) -> bytes:
    """What the shell command of a `pipe:` URL writes to its stdout."""
    return _read_command(url, url.removeprefix("pipe:"), max_bytes, stall_s)


def _read_command(url: str, argv: list[str] | str, max_bytes: int | None, stall_s: float) -> bytes:
    """Run the command of `url` through webdataset's `Pipe` and collect its stdout, bounded in time and size."""
    from webdataset.gopen import Pipe  # imports torch: only when a remote location is read

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


def _drain(pipe: Any, url: str, limit: int | None, stall_s: float) -> bytes:
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


def _kill(pipe: Any) -> None:
    """Stop the command and everything it started (it runs in its own session), then reap it."""
    with contextlib.suppress(OSError):  # already gone
        os.killpg(pipe.proc.pid, signal.SIGKILL)
    pipe.stream.close()
    pipe.proc.wait()


def _no_trailing_slash(spec: str) -> str:
    return spec.rstrip("/")


def _url_join(base: str, name: str) -> str:
    return f"{base}/{name}"


def _path_join(base: str, name: str) -> str:
    return str(Path(base) / name)


def _file_url_path(spec: str) -> str:
    return url2pathname(urlparse(spec).path)


def _pipe_template(spec: str) -> str:
    """The command template of a `pipe:` location, which must say where the file name goes."""
    if "{}" not in spec:
        raise LocationSpecError(f"{spec}: a pipe: location needs {{}} where the file name goes, "
                                "e.g. 'pipe:aws s3 cp s3://bucket/shards/{} -'")  # fmt: skip
    return spec[len("pipe:") :]


def _fill_template(base: str, name: str) -> str:
    return "pipe:" + base.replace("{}", name)


@dataclass(frozen=True)
class Scheme:
    """One kind of location: how its files are read, and how a spec and a file name make their URL."""

    kind: str  # what `Location.kind` says ("local" reads are never retried nor hashed by default)
    read: Callable[[str, int | None, float], bytes]  # (url, max_bytes, stall_s) -> the file's whole content
    base: Callable[[str], str] = _no_trailing_slash  # spec -> base
    join: Callable[[str, str], str] = _url_join  # (base, file name) -> url


# A new kind of location is one reader above and one entry here (as webdataset's gopen_schemes).
SCHEMES: dict[str, Scheme] = {
    "": Scheme("local", _read_local, base=str, join=_path_join),
    "file": Scheme("local", _read_local, base=_file_url_path, join=_path_join),
    "http": Scheme("http", _read_http),
    "https": Scheme("http", _read_http),
    "pipe": Scheme("pipe", _read_pipe, base=_pipe_template, join=_fill_template),
}
