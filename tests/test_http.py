"""Pooled HTTP reads (`pipeline.http`) against a local HTTP/1.1 server: reuse, stalls, bounds, one-line errors."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from shard_server import serve_kept

from pipeline.http import http_chunks, http_read, pool
from pipeline.location import LocationError
from pipeline.policy import ReadPolicy


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four files of different sizes and contents (3 MB and more: several chunks each)."""
    base = tmp_path_factory.mktemp("served")
    for i in range(4):
        (base / f"fold0-{i:06d}.tar").write_bytes(bytes([i]) * 1000 + bytes(range(256)) * (12_000 + 100 * i))
    return base


def test_one_connection_serves_several_files(files: Path) -> None:
    with serve_kept(files) as (url, _, requests, connections):
        for path in sorted(files.iterdir()):
            assert http_read(url + path.name, path.stat().st_size) == path.read_bytes()
        assert requests == sorted(p.name for p in files.iterdir())
        assert len(connections) == 1


def _child_read(url: str, size: int, queue: multiprocessing.Queue) -> None:
    queue.put((http_read(url, size), id(pool())))


@pytest.mark.slow
def test_a_forked_child_opens_its_own_connection(files: Path) -> None:
    path = files / "fold0-000001.tar"
    with serve_kept(files) as (url, _, _, connections):
        assert http_read(url + path.name, path.stat().st_size) == path.read_bytes()
        fork = multiprocessing.get_context("fork")
        queue = fork.Queue()
        child = fork.Process(target=_child_read, args=(url + path.name, path.stat().st_size, queue))
        child.start()
        data, _ = queue.get(timeout=30)
        child.join(timeout=30)
        assert data == path.read_bytes()
        assert len(connections) == 2  # the parent's socket was not shared with the child
        assert http_read(url + path.name, path.stat().st_size) == path.read_bytes()
        assert len(connections) == 2  # and the parent still reuses its own


def test_a_stalled_server_is_abandoned_and_the_next_read_reconnects(files: Path) -> None:
    path = files / "fold0-000000.tar"
    with serve_kept(files) as (url, faults, _, connections):
        faults[path.name] = ("stall", 30)
        start = time.monotonic()
        with pytest.raises(LocationError) as info:
            http_read(url + path.name, path.stat().st_size, ReadPolicy(stall_s=0.5))
        assert time.monotonic() - start < 10
        assert str(info.value) == f"{url}{path.name}: no data for 0.5 s (stalled server); abandoned"
        del faults[path.name]
        assert http_read(url + path.name, path.stat().st_size) == path.read_bytes()
        assert len(connections) == 2  # the stalled connection was not put back in the pool


def test_a_trickling_server_meets_the_deadline(files: Path) -> None:
    path = files / "fold0-000002.tar"
    with serve_kept(files) as (url, faults, _, _):
        faults[path.name] = ("trickle", 0.05)  # a byte every 50 ms never trips a 2 s stall timeout
        start = time.monotonic()
        with pytest.raises(LocationError, match=r"fold0-000002.tar: not read within 1 s; abandoned$"):
            http_read(url + path.name, path.stat().st_size, ReadPolicy(stall_s=2, min_rate=0, deadline_s=1))
        assert time.monotonic() - start < 5


def test_an_endless_body_is_cut_at_the_expected_size(files: Path) -> None:
    path = files / "fold0-000003.tar"
    size = path.stat().st_size
    with serve_kept(files) as (url, faults, _, _):
        faults[path.name] = ("endless", 0)
        got = 0
        with pytest.raises(LocationError) as info:
            for chunk in http_chunks(url + path.name, size):
                got += len(chunk)
        assert str(info.value) == f"{url}{path.name}: more than the {size} bytes expected"
        assert got <= size
        del faults[path.name]
        assert http_read(url + path.name, size) == path.read_bytes()


def test_a_longer_announced_body_is_refused_before_reading(files: Path) -> None:
    path = files / "fold0-000003.tar"
    with serve_kept(files) as (url, _, _, _):
        with pytest.raises(LocationError) as info:
            http_read(url + path.name, 100)
        assert str(info.value) == f"{url}{path.name}: {path.stat().st_size} bytes announced, more than the 100 expected"


def test_errors_are_one_line_naming_the_url(files: Path) -> None:
    with serve_kept(files) as (url, _, _, _):
        with pytest.raises(LocationError) as info:
            http_read(url + "fold9-000000.tar", 10)
        assert str(info.value) == f"{url}fold9-000000.tar: HTTP 404 File not found"
    with pytest.raises(LocationError) as info:  # the server is gone
        http_read(url + "fold0-000000.tar", 10, ReadPolicy(stall_s=2))
    message = str(info.value)
    assert message.startswith(f"{url}fold0-000000.tar: ") and "\n" not in message
    assert "refused" in message.lower()
