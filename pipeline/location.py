"""Where a shard set lives, and whole files read from it: one table, `SCHEMES`, of scheme -> reader.

A location is one of:

- a local directory, or a `file://` URL of one;
- an `http://` or `https://` URL of the directory that holds `manifest.json` and the shards
  (read over pooled, kept-alive connections: `pipeline.http`);
- a `pipe:` command template in which `{}` stands for a file name of that directory, e.g.
  `pipe:aws s3 cp s3://bucket/asl/{} -` (webdataset's `pipe:` form, run by the shell).

Every remote read is bounded in bytes (the caller's `max_bytes`) and in time (`pipeline.policy.ReadPolicy`):
it is abandoned after `stall_s` seconds without a byte, and once it has run longer than
`stall_s + bytes received / min_rate` (so a shard of known size has a deadline, and a trickle is
given up early). A command runs in its own process group, dies with the process that started it
(`pipeline.procs.die_with_parent`, even when that one is SIGKILLed) with its stderr kept to the last
`STDERR_KEEP` bytes; the group is killed when the read fails or is abandoned, when the process exits,
and on SIGTERM or SIGINT once `stop_commands_on_signals` is installed (the command lines do). A
command that closes its output but keeps running is an error, as is a non-zero exit status (with
the last line of its stderr, escaped: `pipeline.text.printable`).
"""

from __future__ import annotations

import atexit
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
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from pipeline.errors import AslError
from pipeline.policy import DEFAULT_POLICY, LocationError, ReadPolicy
from pipeline.procs import die_with_parent
from pipeline.read import InputFileError, read_file
from pipeline.text import printable

log = logging.getLogger(__name__)

STDERR_KEEP = 4096  # bytes of a command's stderr kept (its last ones): enough for its message, never a disk
_CHUNK = 1 << 20
# File names a location may be asked for: what build-shards writes. Anything else (a manifest
# naming "../x" or "a; rm -rf ~") never reaches a path or a shell command.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)


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
            raise LocationSpecError(f"{self.spec}: refused file name {printable(repr(name))}")
        return SCHEMES[self.scheme].join(self.base, name)

    def read(
        self,
        name: str,
        max_bytes: int | None = None,
        check: Callable[[bytes], str | None] | None = None,
        policy: ReadPolicy = DEFAULT_POLICY,
    ) -> bytes:
        """The whole content of file `name`, or a LocationError naming its URL and the reason.

        Reading more than `max_bytes` is an error, and so is a remote read slower than `policy` allows;
        `check(data)` may return a problem, which is an error too. A remote read that fails either way is
        tried again, `policy.retries` times (a fresh read each time, after `policy.retry_wait`); a local one
        is not (it would fail the same way).
        """
        _refuse_untyped(self)
        url, opener = self.url(name), SCHEMES[self.scheme].read
        attempts = 1 if self.is_local else policy.retries + 1
        for attempt in range(attempts):
            try:
                data = opener(url, max_bytes, policy)
                problem = check(data) if check else None
                if problem:
                    raise LocationError(f"{url}: {problem}")
                return data
            except LocationError as exc:
                if attempt == attempts - 1:
                    raise
                log.warning("%s (attempt %d of %d; retrying)", exc, attempt + 1, attempts)
                time.sleep(policy.retry_wait(attempt))
        raise AssertionError("unreachable")

    def chunks(self, name: str, max_bytes: int, policy: ReadPolicy = DEFAULT_POLICY) -> Iterator[bytes]:
        """File `name` as it arrives (a scheme that can stream it) or in one piece; one attempt, bounded as `read`."""
        stream = SCHEMES[self.scheme].chunks
        if stream is not None:
            return stream(self.url(name), max_bytes, policy)
        return iter([self.read(name, max_bytes=max_bytes, policy=policy.once())])


# Which pipe: commands may run in this process: None lets any (a program's own calls); a command line sets the
# templates typed on it, and where any other location came from (a location read from a file is data, and data
# never runs a command).
_typed_commands: tuple[frozenset[str], str] | None = None


def run_only_typed_commands(typed: Iterable[str | None], origin: str) -> None:
    """From now on, a `pipe:` location runs its command only if it is one of `typed` (the locations typed on this
    command line); any other came from `origin` (a checkpoint, a run directory, a --config file) and is refused."""
    global _typed_commands
    templates = set()
    for spec in typed:
        with contextlib.suppress(LocationSpecError):  # a location that cannot be used says so where it is read
            templates.add(Location.parse(spec).base if spec is not None else None)
    _typed_commands = (frozenset(templates - {None}), origin)


def run_any_command() -> None:
    """Let every `pipe:` location run its command again (`--allow-pipe`; a program's own calls)."""
    global _typed_commands
    _typed_commands = None


def _refuse_untyped(loc: Location) -> None:
    """LocationSpecError for a `pipe:` location not typed on this command line (`run_only_typed_commands`)."""
    if loc.kind != "pipe" or _typed_commands is None or loc.base in _typed_commands[0]:
        return
    raise LocationSpecError(
        f"{printable(loc.spec)}: not run: a pipe: location runs a shell command, and this one comes from "
        f"{_typed_commands[1]}, not from this command line; type it with --shards, or pass --allow-pipe to run "
        "commands named in files"
    )


def _read_local(path: str, max_bytes: int | None, policy: ReadPolicy) -> bytes:
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


def _read_http(url: str, max_bytes: int | None, policy: ReadPolicy) -> bytes:
    """An http(s) URL's content over this process's pooled connections."""
    from pipeline.http import http_read  # urllib3: only when an http location is read

    return http_read(url, sys.maxsize if max_bytes is None else max_bytes, policy)


def _http_chunks(url: str, max_bytes: int, policy: ReadPolicy) -> Iterator[bytes]:
    from pipeline.http import http_chunks

    return http_chunks(url, max_bytes, policy)


def _read_pipe(url: str, max_bytes: int | None, policy: ReadPolicy) -> bytes:
    """What the shell command of a `pipe:` URL writes to its stdout."""
    return read_command(url, url.removeprefix("pipe:"), max_bytes, policy)


def read_command(url: str, argv: list[str] | str, max_bytes: int | None, policy: ReadPolicy) -> bytes:
    """A command's stdout (`argv` a string: run by the shell), bounded by `max_bytes` and `policy`; LocationError
    (naming `url`) when it fails, exits non-zero, or closes its output and does not exit within `policy.stall_s`."""
    shell = isinstance(argv, str)
    what = "the pipe: command" if shell else argv[0]
    try:
        proc = subprocess.Popen(
            argv,
            shell=shell,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own group: killed whole when its read fails
            preexec_fn=die_with_parent,  # and gone with this process even when it is SIGKILLed
        )
    except OSError as exc:
        raise LocationError(f"{url}: cannot run {'the shell' if shell else argv[0]} ({exc.strerror or exc})") from None
    _running[proc.pid] = os.getpid()
    try:
        tail = bytearray()
        data = _stdout(proc, url, max_bytes, policy, tail)
        if not _exited(proc, policy.stall_s, tail):
            late = f"closed its output but did not exit within {policy.stall_s:g} s; stopped"
            raise LocationError(f"{url}: {what} {late}")
    except BaseException:
        _kill(proc)
        raise
    finally:
        _running.pop(proc.pid, None)
        proc.stdout.close()
        proc.stderr.close()
    if proc.returncode != 0:
        lines = tail.decode(errors="replace").strip().split("\n")  # not at a bare \r: it is escaped, shown
        reason = printable(lines[-1]) if lines[-1] else "no message"
        raise LocationError(f"{url}: {what} failed with exit status {proc.returncode}: {reason}")
    return data


def _stdout(proc: subprocess.Popen, url: str, limit: int | None, policy: ReadPolicy, tail: bytearray) -> bytes:
    """A command's stdout until it closes it; its stderr's last STDERR_KEEP bytes into `tail` meanwhile.
    LocationError past `limit` bytes, or when slower than `policy` allows."""
    out, err = proc.stdout.fileno(), proc.stderr.fileno()
    with contextlib.suppress(AttributeError, OSError):  # Linux: 1 MB chunks instead of 64 kB: fewer reads and selects
        fcntl.fcntl(out, fcntl.F_SETPIPE_SZ, _CHUNK)
    chunks, total, fds = [], 0, [out, err]
    start = last = time.monotonic()
    while True:
        now = time.monotonic()
        stalled, left = policy.stall_s - (now - last), policy.time_left(now - start, total)
        if stalled <= 0:
            raise LocationError(f"{url}: no data for {policy.stall_s:g} s (stalled server or command); abandoned")
        if left <= 0:
            raise policy.too_slow(url, total, now - start)
        ready, _, _ = select.select(fds, [], [], min(stalled, left))
        if err in ready and not _keep_tail(err, tail):
            fds.remove(err)
        if out in ready:
            chunk = os.read(out, _CHUNK)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            last = time.monotonic()
            if limit is not None and total > limit:
                raise LocationError(f"{url}: more than the {limit} bytes expected")


def _exited(proc: subprocess.Popen, wait_s: float, tail: bytearray) -> bool:
    """Whether the command exits within `wait_s` seconds (its stderr still read into `tail`)."""
    end, err_open = time.monotonic() + wait_s, True
    while proc.poll() is None:
        left = end - time.monotonic()
        if left <= 0:
            return False
        if err_open:  # its end comes when the command exits, unless a child of it holds stderr
            ready, _, _ = select.select([proc.stderr.fileno()], [], [], min(left, 0.1))
            err_open = not ready or _keep_tail(proc.stderr.fileno(), tail)
        else:
            time.sleep(min(left, 0.02))
    return True


def _keep_tail(fd: int, tail: bytearray) -> bool:
    """Read what is there of a stderr into its last STDERR_KEEP bytes; False at its end."""
    chunk = os.read(fd, 1 << 16)
    tail += chunk
    del tail[:-STDERR_KEEP]
    return bool(chunk)


# Commands running, by pid, with the pid of the process that started them (a forked DataLoader worker
# inherits its parent's table, and must not kill its parent's commands).
_running: dict[int, int] = {}
_handled: dict[int, Any] = {}  # signal -> the handler installed before ours


def _kill(proc: subprocess.Popen) -> None:
    """Stop the command and everything it started (its process group), then reap it."""
    with contextlib.suppress(OSError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_commands() -> None:
    """Kill the process groups of every command this process started and is still reading."""
    me = os.getpid()
    for pid, owner in list(_running.items()):
        if owner == me:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)


def stop_commands_on_signals() -> None:
    """On SIGTERM and SIGINT, kill this process's commands first, then do what the signal did before.

    From the main thread only (Python's rule for signal handlers); a no-op elsewhere and when done before.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signum not in _handled:
            _handled[signum] = signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame: Any) -> None:
    kill_commands()
    previous = _handled.get(signum)
    if callable(previous):
        previous(signum, frame)  # SIGINT: KeyboardInterrupt
        return
    signal.signal(signum, signal.SIG_DFL if previous in (None, signal.SIG_DFL) else previous)
    os.kill(os.getpid(), signum)


atexit.register(kill_commands)


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
        raise LocationSpecError(
            f"{spec}: a pipe: location needs {{}} where the file name goes, "
            "e.g. 'pipe:aws s3 cp s3://bucket/shards/{} -'"
        )
    return spec[len("pipe:") :]


def _fill_template(base: str, name: str) -> str:
    return "pipe:" + base.replace("{}", name)


@dataclass(frozen=True)
class Scheme:
    """One kind of location: how its files are read, and how a spec and a file name make their URL."""

    kind: str  # what `Location.kind` says ("local" reads are never retried nor hashed by default)
    read: Callable[[str, int | None, ReadPolicy], bytes]  # (url, max_bytes, policy) -> the file's whole content
    base: Callable[[str], str] = _no_trailing_slash  # spec -> base
    join: Callable[[str, str], str] = _url_join  # (base, file name) -> url
    chunks: Callable[[str, int, ReadPolicy], Iterator[bytes]] | None = None  # a file as it arrives, where it can stream


# A new kind of location is one reader above and one entry here (as webdataset's gopen_schemes).
SCHEMES: dict[str, Scheme] = {
    "": Scheme("local", _read_local, base=str, join=_path_join),
    "file": Scheme("local", _read_local, base=_file_url_path, join=_path_join),
    "http": Scheme("http", _read_http, chunks=_http_chunks),
    "https": Scheme("http", _read_http, chunks=_http_chunks),
    "pipe": Scheme("pipe", _read_pipe, base=_pipe_template, join=_fill_template),
}
