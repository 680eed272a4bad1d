"""A static HTTP server on 127.0.0.1 for the remote-shard tests, with faults on demand.

`serve(directory)` is a context manager giving the base URL; the server thread stops when it
exits. `faults[name] = ("drop", n)` cuts the connection in the middle of the body for the next
`n` requests of that file; `("stall", seconds)` sends half of it, then nothing for `seconds`;
`("trickle", seconds)` sends half of it, then one byte every `seconds`; `("endless", 0)` sends
the file's bytes over and over with no length and never ends.
`serve_kept(directory)` is the same server speaking HTTP/1.1 (connections kept alive), which also
counts the connections it accepted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    faults: dict[str, tuple[str, float]]
    requests: list[str]
    connections: list[int]

    def setup(self) -> None:
        super().setup()
        self.connections.append(1)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # keep the test output clean

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        name = self.path.rsplit("/", 1)[-1]
        self.requests.append(name)
        kind, value = self.faults.get(name, ("", 0))
        path = Path(self.translate_path(self.path))
        if not kind or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()
        self.send_response(200)
        if kind == "endless":
            self.send_header("Connection", "close")
            self.end_headers()
            with contextlib.suppress(OSError):  # the client hangs up: that is the end
                while True:
                    self.wfile.write(data)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        if kind == "drop":
            if value <= 1:
                del self.faults[name]
            else:
                self.faults[name] = (kind, value - 1)
        elif kind == "trickle":
            with contextlib.suppress(OSError):  # the client gives up: that is the end
                for i in range(len(data) // 2, len(data)):
                    time.sleep(value)
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
        else:  # stall, then give up
            time.sleep(value)
        self.close_connection = True


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[tuple[str, dict[str, tuple[str, float]], list[str]]]:
    """(base URL, faults, names requested) of a server of `directory`, running until the block ends."""
    with _serve(directory, "HTTP/1.0") as (url, faults, requests, _):
        yield url, faults, requests


@contextlib.contextmanager
def serve_kept(directory: Path) -> Iterator[tuple[str, dict[str, tuple[str, float]], list[str], list[int]]]:
    """(base URL, faults, names requested, one item per accepted connection) of an HTTP/1.1 server."""
    with _serve(directory, "HTTP/1.1") as served:
        yield served


@contextlib.contextmanager
def _serve(directory: Path, protocol: str) -> Iterator[tuple[str, dict[str, tuple[str, float]], list[str], list[int]]]:
    faults: dict[str, tuple[str, float]] = {}
    requests: list[str] = []
    connections: list[int] = []
    attrs = {"faults": faults, "requests": requests, "connections": connections, "protocol_version": protocol}
    handler = type("Handler", (_Handler,), attrs)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", faults, requests, connections
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
