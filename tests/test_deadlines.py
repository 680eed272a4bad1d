"""Time and children: one deadline for a whole http request (status line and headers included), and `pipe:`
commands and DataLoader workers that end with the process that started them, even a SIGKILLed one."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.http import http_read
from pipeline.location import LocationError
from pipeline.policy import ReadPolicy

ROOT = Path(__file__).resolve().parents[1]
PR_GET_PDEATHSIG = 2


@contextlib.contextmanager
def trickling_server(head: bytes, every_s: float) -> Iterator[tuple[str, list[int]]]:
    """A server on 127.0.0.1 that answers every request with `head`, one byte each `every_s` seconds; yields its
    URL and the number of bytes it got out before the client hung up (one entry per connection)."""
    listener = socket.create_server(("127.0.0.1", 0))
    sent: list[int] = []
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        n = 0
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            for byte in head:
                if stop.is_set():
                    break
                conn.sendall(bytes([byte]))
                n += 1
                time.sleep(every_s)
        sent.append(n)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/", sent
    finally:
        stop.set()
        listener.close()


HEAD = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"y" * 40) for i in range(200)) + b"\r\n"


@pytest.mark.parametrize(
    ("head", "policy"),
    [
        (HEAD, ReadPolicy(stall_s=0.5, min_rate=0)),  # the status line itself a byte at a time
        (HEAD, ReadPolicy(stall_s=5, min_rate=0, deadline_s=0.5)),  # the whole read's deadline is shorter
        (b"HTTP/1.1 200 OK\r\n" + HEAD[17:], ReadPolicy(stall_s=0.5, min_rate=10**6)),
    ],
)
def test_a_server_that_trickles_its_status_line_and_headers_is_abandoned(head: bytes, policy: ReadPolicy) -> None:
    with trickling_server(head, every_s=0.01) as (url, sent):
        with pytest.raises(LocationError) as info:
            http_read(url + "fold0-000000.tar", 1000, policy)
        seconds = min(policy.stall_s, policy.deadline(0))
        assert str(info.value) == f"{url}fold0-000000.tar: no status line and headers within {seconds:g} s; abandoned"
        for _ in range(500):  # the server sees the connection shut (no wall time asserted: only that it ends)
            if sent:
                break
            time.sleep(0.01)
        assert len(sent) == 1 and sent[0] < len(head)


PARENT = """
import sys
from pipeline.location import Location
Location.parse(sys.argv[1]).read("x")
"""


def _gone(pid: int, tries: int = 500) -> bool:
    for _ in range(tries):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for init to reap it is gone too
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a parent-death signal is Linux's")
def test_a_pipe_command_dies_with_its_sigkilled_parent(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    spec = f"pipe:echo $$ > {pidfile}.part && mv {pidfile}.part {pidfile} && exec sleep 120 # {{}}"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, spec], cwd=ROOT)
    try:
        for _ in range(1500):
            if pidfile.exists() or parent.poll() is not None:
                break
            time.sleep(0.02)
        command = int(pidfile.read_text())
        assert not _gone(command, tries=1)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _gone(command), "the pipe: command outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def _report_pdeathsig(queue: multiprocessing.Queue) -> None:
    from train.data import worker_init

    worker_init(0)
    value = ctypes.c_int()
    ctypes.CDLL(None, use_errno=True).prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
    queue.put(value.value)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a parent-death signal is Linux's")
def test_a_dataloader_worker_is_set_to_die_with_the_trainer() -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_report_pdeathsig, args=(queue,))
    child.start()
    assert queue.get(timeout=60) == signal.SIGKILL
    child.join(timeout=60)
