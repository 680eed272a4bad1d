"""Files of an `http(s)://` location, streamed over pooled connections (urllib3) instead of a process per file.

One connection pool per process (DataLoader workers are forked: a child never reuses its parent's
sockets). A read gives up as its `pipeline.policy.ReadPolicy` says (`stall_s` seconds without a byte,
`deadline_s` seconds in all, an average below `min_rate` bytes/s), or past `max_bytes` (it
never reads more than `max_bytes + 1` bytes of a body, so an endless or oversized body costs one
bounded read). Every failure is one `LocationError` line naming the URL, the server's text in it (a
reason phrase, an error's message) escaped for printing. Nothing is retried here: whole-file retries
stay the caller's (`--io-retries`), with their meaning.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError, ReadTimeoutError

from pipeline.policy import DEFAULT_POLICY, LocationError, ReadPolicy
from pipeline.text import printable

_CHUNK = 1 << 20
CONNECT_S = 15.0  # as the curl reader's --connect-timeout
_pools: dict[int, urllib3.PoolManager] = {}
_POOL_PREFIX = re.compile(r"^\w*Connection\w*\([^)]*\): ")


def pool() -> urllib3.PoolManager:
    """This process's connection pool (a forked child gets its own, never its parent's sockets)."""
    pid = os.getpid()
    if pid not in _pools:
        _pools.clear()  # a parent's pool, inherited across fork: drop it without closing the parent's sockets
        # redirects followed as curl --location does; no hidden retries: a failed read is the caller's to retry
        retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5, raise_on_redirect=True)
        manager = urllib3.PoolManager(num_pools=8, maxsize=4, retries=retries)
        manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        _pools[pid] = manager
    return _pools[pid]


class _Deadline:
    """Shuts down the socket of this thread's request unless it is answered (status line and headers) within
    `seconds`: a server that sends them a byte at a time never trips a per-read timeout."""

    def __init__(self, seconds: float) -> None:
        self.conn: Any = None  # the connection the request went out on (set by `_Watched.request`)
        self.expired = False
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(seconds,), name="http-deadline", daemon=True).start()

    def _run(self, seconds: float) -> None:
        if self._done.wait(seconds):
            return
        self.expired = True
        while not self._done.is_set():  # until the request gives up (it may still be connecting)
            sock = getattr(self.conn, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: no TLS state touched
            self._done.wait(0.05)

    def stop(self) -> None:
        self._done.set()


_current = threading.local()  # .deadline: the `_Deadline` of the request this thread is making


class _Watched:
    """A connection that tells the current request's deadline which socket to shut."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        deadline = getattr(_current, "deadline", None)
        if deadline is not None:
            deadline.conn = self
        return super().request(*args, **kwargs)


class _HTTPConnection(_Watched, HTTPConnection):
    pass


class _HTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def http_chunks(url: str, max_bytes: int, policy: ReadPolicy = DEFAULT_POLICY) -> Iterator[bytes]:
    """The body of `url` in chunks; LocationError (naming `url`) on a status other than 200, a stall, a read
    slower than `policy` allows, a body longer than `max_bytes`, or a broken connection. The connection is kept
    for reuse only after a whole body was read."""
    start, stall_s = time.monotonic(), policy.stall_s
    answer_s = min(stall_s, policy.deadline(0))  # connection, status line and headers: one deadline
    late = f"no status line and headers within {answer_s:g} s; abandoned"
    _current.deadline = deadline = _Deadline(answer_s)
    try:
        response = pool().request(
            "GET",
            url,
            headers={"Accept-Encoding": "identity"},
            preload_content=False,
            decode_content=False,
            timeout=urllib3.Timeout(connect=min(CONNECT_S, stall_s), read=stall_s),
        )
    except (HTTPError, OSError) as exc:
        if deadline.expired and not _stalled(exc):
            raise LocationError(f"{url}: {late}") from None
        if not isinstance(exc, HTTPError):
            raise
        raise LocationError(f"{url}: {_reason(exc, stall_s)}") from None
    finally:
        deadline.stop()
        _current.deadline = None
    if deadline.expired:  # answered just as its socket was shut: the body cannot be read from it
        response.close()
        response.release_conn()
        raise LocationError(f"{url}: {late}")
    done = False
    try:
        if response.status != 200:
            raise LocationError(f"{url}: HTTP {response.status} {printable(response.reason or '')}".rstrip())
        announced = response.headers.get("Content-Length")
        if announced is not None and announced.isdigit() and int(announced) > max_bytes:
            raise LocationError(f"{url}: {int(announced)} bytes announced, more than the {max_bytes} expected")
        total = 0
        while True:
            # read1: whatever has arrived, so a trickling server meets the deadline check below
            chunk = response.read1(min(_CHUNK, max_bytes + 1 - total))
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise LocationError(f"{url}: more than the {max_bytes} bytes expected")
            elapsed = time.monotonic() - start
            if policy.time_left(elapsed, total) < 0:
                raise policy.too_slow(url, total, elapsed)
            yield chunk
        done = True
    except HTTPError as exc:
        raise LocationError(f"{url}: {_reason(exc, stall_s)}") from None
    finally:
        if not done:  # a body left unread (error, or the consumer stopped early): this connection is not reusable
            response.close()
        response.release_conn()


def http_read(url: str, max_bytes: int, policy: ReadPolicy = DEFAULT_POLICY) -> bytes:
    """The whole body of `url` (see `http_chunks`)."""
    return b"".join(http_chunks(url, max_bytes, policy))


def _reason(exc: HTTPError, stall_s: float) -> str:
    """One line for a urllib3 error: a stall says so; otherwise the innermost cause's message."""
    if _stalled(exc):
        return f"no data for {stall_s:g} s (stalled server); abandoned"
    cause = getattr(exc, "reason", None) or exc
    text = cause.args[0] if cause.args and isinstance(cause.args[0], str) else str(cause)  # not the args tuple
    return printable(_POOL_PREFIX.sub("", text))  # the URL is said once, by the caller


def _stalled(exc: BaseException) -> bool:
    """Whether urllib3 gave up for want of a byte within the read timeout."""
    return isinstance(exc, ReadTimeoutError) or isinstance(getattr(exc, "reason", None), ReadTimeoutError)
