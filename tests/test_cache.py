"""The verified shard cache (`pipeline.cache`): keys, checks on every read, one fetch per node, LRU with pins,
kills mid-fill, unusable directories; and over HTTP, one request per shard for several epochs."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from demo_data import demo_dataset, demo_shards
from shard_server import serve_kept

from pipeline.cache import CacheError, ShardCache, cache_view
from pipeline.errors import AslError
from pipeline.files import AtomicFile
from pipeline.http import http_chunks
from pipeline.location import LocationError
from pipeline.policy import ReadPolicy
from pipeline.shards import read_manifest

LOC = "http://shards.example/asl"
FP = "build-1"
SIZE = 300_000
ONCE = ReadPolicy(retries=0)  # a failed fetch is an error at once


def blob(i: int, size: int = SIZE) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (size // 32) + bytes(size % 32)


def entry(i: int) -> dict:
    data = blob(i)
    return {"name": f"fold0-{i:06d}.tar", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class Source:
    """A fetch that counts its calls and serves `blob(i)` (or whatever `data` says) in 64 kB chunks."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.data: dict[str, bytes] = {}

    def fetch(self, i: int):  # noqa: ANN201 - a fetch callable
        name = entry(i)["name"]

        def go() -> Iterator[bytes]:
            self.calls.append(name)
            data = self.data.pop(name, blob(i))
            return (data[k : k + 65536] for k in range(0, len(data), 65536))

        return go


def read(shards, i: int, source: Source, **kw) -> bytes:  # noqa: ANN001 - a CachedShards
    e = entry(i)
    kw.setdefault("policy", ONCE)
    return shards.read(e["name"], e["bytes"], e["sha256"], source.fetch(i), **kw)


def test_a_miss_is_fetched_once_then_read_from_the_cache(tmp_path: Path) -> None:
    shards, source = ShardCache(tmp_path).open(LOC + "/", FP), Source()
    assert read(shards, 0, source) == blob(0)
    assert read(shards, 0, source) == blob(0)
    assert source.calls == [entry(0)["name"]]
    key = hashlib.sha256(f"http:{LOC}|{FP}".encode()).hexdigest()[:16]  # the trailing "/" does not matter
    assert shards.dir == tmp_path / key
    assert (tmp_path / key / entry(0)["name"]).read_bytes() == blob(0)
    assert json.loads((tmp_path / key / "location.json").read_text()) == {"location": LOC + "/", "fingerprint": FP}
    assert sorted(p.name for p in shards.dir.iterdir() if not p.name.startswith(".")) == [
        entry(0)["name"],
        "location.json",
    ]


def test_two_locations_or_two_builds_never_share_an_entry(tmp_path: Path) -> None:
    cache, source = ShardCache(tmp_path), Source()
    views = [
        cache.open(LOC, FP),
        cache.open(LOC, "build-2"),
        cache.open("http://other.example/asl", FP),
        cache.open("pipe:cat /data/{}", FP),
    ]
    for view in views:
        assert read(view, 0, source) == blob(0)
    assert len(source.calls) == 4
    assert len({v.dir for v in views}) == 4


def test_an_altered_entry_is_dropped_fetched_again_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shards, source = ShardCache(tmp_path).open(LOC, FP), Source()
    read(shards, 0, source)
    path = shards.path(entry(0)["name"])
    path.write_bytes(blob(0)[:-1])  # cut short: the size check (always on) sees it
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        assert read(shards, 0, source) == blob(0)
        assert read(shards, 0, source) == blob(0)
    assert len(source.calls) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: cached copy of {LOC}/{entry(0)['name']} differs from the manifest (size or sha256); fetched again"
    ]
    flipped = bytearray(blob(0))
    flipped[1000] ^= 1
    path.write_bytes(bytes(flipped))  # same size, but written after it was stored: hashed even on a size check
    assert read(shards, 0, source, check="size") == blob(0)
    assert len(source.calls) == 3
    stored = path.stat().st_mtime_ns
    path.write_bytes(bytes(flipped))
    os.utime(path, ns=(stored, stored))  # the stamp's mtime put back: only sha256 can tell
    assert read(shards, 0, source, check="size") == bytes(flipped)
    assert read(shards, 0, source, check="sha256") == blob(0)
    assert len(source.calls) == 4
    assert path.read_bytes() == blob(0)


def test_a_bad_fetch_is_an_error_naming_the_shard_and_stores_nothing(tmp_path: Path) -> None:
    shards, source = ShardCache(tmp_path).open(LOC, FP), Source()
    name = entry(0)["name"]
    for data, reason in [
        (blob(1), "sha256 differs from the manifest (altered or corrupted)"),
        (blob(0)[:-5], f"{SIZE - 5} bytes, manifest says {SIZE} (cut short or altered)"),
        (blob(0) + b"x", f"more than the {SIZE} bytes expected"),
    ]:
        source.data[name] = data
        with pytest.raises(LocationError) as info:
            read(shards, 0, source)
        assert str(info.value) == f"{LOC}/{name}: {reason}"
        assert sorted(p.name for p in shards.dir.iterdir() if not p.name.startswith(".")) == ["location.json"]
        assert not list(shards.dir.glob("*.tmp"))
    source.data[name] = blob(1)  # altered once on the wire: the retry reads it whole
    assert read(shards, 0, source, policy=ReadPolicy(retries=1)) == blob(0)
    assert source.calls[-2:] == [name, name]


def test_an_endless_fetch_is_cut_at_the_expected_size(tmp_path: Path) -> None:
    shards, pulled = ShardCache(tmp_path).open(LOC, FP), []

    def endless() -> Iterator[bytes]:
        while True:
            pulled.append(1)
            yield bytes(65536)

    with pytest.raises(LocationError, match="more than the 300000 bytes expected"):
        shards.read("fold0-000000.tar", SIZE, "0" * 64, endless, policy=ONCE)
    assert len(pulled) == SIZE // 65536 + 1


def test_unsafe_names_are_refused(tmp_path: Path) -> None:
    shards = ShardCache(tmp_path).open(LOC, FP)
    with pytest.raises(ValueError, match="refused file name"):
        shards.read("../x.tar", 1, "0" * 64, lambda: b"x")


# ---------------------------------------------------------------- several processes of one node


def _reader(root: str, i: int, log_path: str, barrier) -> None:  # noqa: ANN001 - a multiprocessing barrier
    shards = ShardCache(root).open(LOC, FP)

    def fetch() -> Iterator[bytes]:
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        data = blob(i)
        for k in range(0, len(data), 65536):
            time.sleep(0.05)  # a slow server: the others arrive while this fetch runs
            yield data[k : k + 65536]

    barrier.wait()
    e = entry(i)
    assert shards.read(e["name"], e["bytes"], e["sha256"], fetch) == blob(i)


@pytest.mark.slow
def test_ranks_of_a_node_wait_for_one_fetch(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, log_path = ctx.Barrier(4), tmp_path / "fetches"
    children = [
        ctx.Process(target=_reader, args=(str(tmp_path / "cache"), 3, str(log_path), barrier)) for _ in range(4)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    assert [c.exitcode for c in children] == [0, 0, 0, 0]
    assert len(log_path.read_text().split()) == 1


def _killed_filler(root: str, started: str) -> None:
    shards = ShardCache(root).open(LOC, FP)

    def fetch() -> Iterator[bytes]:
        yield blob(0)[: SIZE // 2]
        Path(started).touch()
        time.sleep(600)  # killed here, half the shard written
        yield blob(0)[SIZE // 2 :]

    e = entry(0)
    shards.read(e["name"], e["bytes"], e["sha256"], fetch)


@pytest.mark.slow
def test_a_kill_during_a_fill_leaves_only_a_temporary_that_the_next_use_removes(tmp_path: Path) -> None:
    root, started = tmp_path / "cache", tmp_path / "started"
    shards = ShardCache(root).open(LOC, FP)  # opened before the kill (opening sweeps temporaries)
    child = multiprocessing.get_context("fork").Process(target=_killed_filler, args=(str(root), str(started)))
    child.start()
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started.exists()
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=30)
    name = entry(0)["name"]
    assert not shards.path(name).exists()
    temporaries = list(shards.dir.glob("*.tmp"))
    assert [p.name for p in temporaries] == [f"{name}.tmp"]
    assert temporaries[0].stat().st_size == SIZE // 2
    source = Source()
    assert read(shards, 0, source) == blob(0)  # rerun: fetched whole, the temporary gone
    assert source.calls == [name]
    assert not list(shards.dir.glob("*.tmp"))
    # the same kill, then a fresh open (a restarted run) sweeps the temporary before any read
    (shards.dir / f"{entry(1)['name']}.99999999.0123abcd.tmp").write_bytes(b"half")
    ShardCache(root).open(LOC, FP)
    assert not list(shards.dir.glob("*.tmp"))


# ---------------------------------------------------------------- limit and eviction


def names_in(shards) -> list[str]:  # noqa: ANN001 - a CachedShards
    return sorted(p.name for p in shards.dir.iterdir() if p.name.startswith("fold"))


def test_least_recently_read_entries_are_evicted_past_the_limit(tmp_path: Path) -> None:
    cache, source = ShardCache(tmp_path, limit_bytes=int(2.5 * SIZE)), Source()
    shards = cache.open(LOC, FP)
    for i in (0, 1, 0, 2):  # 0 read again after 1: 1 is the least recently read when 2 needs room
        read(shards, i, source)
        time.sleep(0.01)
    assert names_in(shards) == [entry(0)["name"], entry(2)["name"]]
    assert cache.size() == 2 * SIZE
    read(shards, 1, source)
    assert names_in(shards) == [entry(1)["name"], entry(2)["name"]]
    assert source.calls == [entry(i)["name"] for i in (0, 1, 2, 1)]


def _pinner(root: str, names: list[str], ready, done) -> None:  # noqa: ANN001 - multiprocessing events
    shards = ShardCache(root).open(LOC, FP)
    shards.pin(names)
    ready.set()
    done.wait(60)


@pytest.mark.slow
def test_entries_pinned_by_another_process_are_never_evicted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache, source = ShardCache(tmp_path, limit_bytes=2 * SIZE), Source()
    shards = cache.open(LOC, FP)
    read(shards, 0, source)
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    pinner = ctx.Process(target=_pinner, args=(str(tmp_path), [entry(0)["name"]], ready, done))
    pinner.start()
    try:
        assert ready.wait(30)
        for i in (1, 2, 3):  # the oldest is pinned: the others make room
            assert read(shards, i, source) == blob(i)
            time.sleep(0.01)
        assert names_in(shards) == [entry(0)["name"], entry(3)["name"]]
        shards.pin([entry(3)["name"]])  # now everything cached is pinned: a new shard is read, not stored
        with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
            assert read(shards, 4, source) == blob(4)
            assert read(shards, 5, source) == blob(5)
        assert names_in(shards) == [entry(0)["name"], entry(3)["name"]]
        assert len(caplog.records) == 1 and "taken by shards being read or pinned" in caplog.records[0].getMessage()
    finally:
        done.set()
        pinner.join(timeout=30)
    shards.unpin()
    read(shards, 6, source)  # the pins are gone with their process: the least recently read goes
    assert names_in(shards) == [entry(3)["name"], entry(6)["name"]]


# ---------------------------------------------------------------- unusable directories and limits


def test_a_cache_directory_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("x")
    with pytest.raises(CacheError) as info:
        ShardCache(tmp_path / "c")
    assert str(info.value) == f"{tmp_path / 'c'}: the cache directory is a file, not a directory"
    assert isinstance(info.value, AslError)


def _open_as_nobody(root: str, queue) -> None:  # noqa: ANN001 - a multiprocessing queue
    if os.geteuid() == 0:  # root writes anywhere: check as an ordinary user
        os.setgid(65534)
        os.setuid(65534)
    try:
        ShardCache(root)
        queue.put("no error")
    except CacheError as exc:
        queue.put(str(exc))


@pytest.mark.slow
def test_a_read_only_cache_directory_is_one_line(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp())  # pytest's tmp_path lies under a directory only its owner may enter
    try:
        base.chmod(0o755)
        (base / "ro").mkdir(mode=0o555)
        (base / "closed").mkdir(mode=0o000)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        for root in (base / "ro", base / "ro" / "sub", base / "closed" / "sub"):
            child = ctx.Process(target=_open_as_nobody, args=(str(root), queue))
            child.start()
            message = queue.get(timeout=30)
            child.join(timeout=30)
            assert message == f"{root}: cannot write the cache directory (Permission denied)"
    finally:
        shutil.rmtree(base)


def test_a_limit_smaller_than_a_shard_is_one_line(tmp_path: Path) -> None:
    cache = ShardCache(tmp_path, limit_bytes=SIZE // 2)
    with pytest.raises(CacheError) as info:
        cache.open(LOC, FP, largest=SIZE)
    reason = "cache limit 0.1 MB is smaller than a shard (0.3 MB); raise the limit or leave it unset"
    assert str(info.value) == f"{tmp_path}: {reason}"
    with pytest.raises(CacheError, match=f"smaller than {LOC}/fold0-000000.tar"):
        read(cache.open(LOC, FP), 0, Source())
    with pytest.raises(CacheError, match="the cache limit must be positive, got 0 bytes"):
        ShardCache(tmp_path, limit_bytes=0)


def test_a_full_disk_goes_on_uncached_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shards, source = ShardCache(tmp_path).open(LOC, FP), Source()
    real_write, writes = AtomicFile.write, []

    def full(self: AtomicFile, data: bytes) -> None:
        if self.path.is_relative_to(tmp_path):
            writes.append(self.path)
            if len(writes) > 2:  # a little fits, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, data)

    monkeypatch.setattr(AtomicFile, "write", full)
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        assert [read(shards, i, source) for i in (0, 1, 2)] == [blob(0), blob(1), blob(2)]
    assert names_in(shards) == [] and not list(shards.dir.glob("*.tmp"))
    assert len(writes) == 3  # after the first refusal no further fill is written
    assert [r.getMessage() for r in caplog.records] == [
        f"{shards.dir}: cannot write the cache (full): No space left on device; reading {LOC}/{entry(0)['name']} "
        "and the following shards without caching"
    ]


def test_an_entry_directory_of_another_location_is_refused(tmp_path: Path) -> None:
    shards = ShardCache(tmp_path).open(LOC, FP)
    (shards.dir / "location.json").write_text(json.dumps({"location": "http://else", "fingerprint": FP}))
    with pytest.raises(CacheError, match="entry directory already holds 'http://else'"):
        ShardCache(tmp_path).open(LOC, FP)


# ---------------------------------------------------------------- over HTTP


def test_three_epochs_over_http_send_one_request_per_shard(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("cached")
    location = demo_shards(base, demo_dataset(base, sequences=120, signs=4, participants=4), shard_size=20, folds=2)
    manifest = read_manifest(location)
    cache = ShardCache(base / "cache")
    with serve_kept(location) as (url, _, requests, connections):
        shards = cache.open(url, manifest["fingerprint"])
        for _ in range(3):
            for e in manifest["shards"]:
                data = shards.read(
                    e["name"], e["bytes"], e["sha256"], lambda e=e: http_chunks(url + e["name"], e["bytes"])
                )
                assert data == (location / e["name"]).read_bytes()
        assert sorted(requests) == sorted(e["name"] for e in manifest["shards"])
        assert len(connections) == 1


# ---------------------------------------------------------------- the cache deletes only what it stored


def stored(shards, source: Source, *indices: int) -> None:  # noqa: ANN001 - a CachedShards
    for i in indices:
        read(shards, i, source)
        time.sleep(0.01)


def test_a_directory_holding_other_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"jpg")
    with pytest.raises(CacheError) as info:
        ShardCache(tmp_path, limit_bytes=1)
    assert str(info.value) == (
        f"{tmp_path}: not a shard cache directory (no .asl-shard-cache file) and not empty (holds photos, "
        "thesis.tex); give a new or empty directory, which the cache then owns"
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.jpg", "photos", "thesis.tex"]


def test_eviction_never_deletes_files_it_did_not_store(tmp_path: Path) -> None:
    cache, source = ShardCache(tmp_path / "c", limit_bytes=int(1.5 * SIZE)), Source()
    shards = cache.open(LOC, FP)
    stored(shards, source, 0)
    # files the cache did not write, put into its directory afterwards: at the root, in an entry directory
    # (a shard's name without its stamp), and a link with a stamp to a file outside
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"p" * SIZE)
    (cache.root / "notes.txt").write_bytes(b"n" * SIZE)
    (shards.dir / entry(7)["name"]).write_bytes(b"u" * SIZE)
    (shards.dir / entry(8)["name"]).symlink_to(outside / "precious")
    (shards.dir / f".{entry(8)['name']}.ok").write_text("stamp")
    # an entry directory that is a link to a folder outside, holding shard-named files with stamps
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / entry(9)["name"]).write_bytes(b"l" * SIZE)
    (linked / f".{entry(9)['name']}.ok").write_text("stamp")
    (cache.root / "0123456789abcdef").symlink_to(linked, target_is_directory=True)
    assert cache.entries() == [shards.path(entry(0)["name"])]
    stored(shards, source, 1, 2, 3)
    assert names_in(shards) == sorted([entry(3)["name"], entry(7)["name"], entry(8)["name"]])
    assert (cache.root / "notes.txt").read_bytes() == b"n" * SIZE
    assert (shards.dir / entry(7)["name"]).read_bytes() == b"u" * SIZE
    assert (outside / "precious").read_bytes() == b"p" * SIZE
    assert (linked / entry(9)["name"]).read_bytes() == b"l" * SIZE


def test_an_entry_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    cache = ShardCache(tmp_path / "c")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    key = hashlib.sha256(f"http:{LOC}|{FP}".encode()).hexdigest()[:16]
    (cache.root / key).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CacheError, match="an entry directory is a link or not a directory"):
        cache.open(LOC, FP)
    assert list(elsewhere.iterdir()) == []


def test_a_filesystem_root_or_a_directory_holding_the_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="^/: a filesystem root cannot be the cache directory"):
        ShardCache("/", limit_bytes=1)
    run = tmp_path / "runs" / "a"
    for root in (tmp_path, tmp_path / "runs", run):
        with pytest.raises(CacheError) as info:
            ShardCache(root, limit_bytes=SIZE, outputs=[run])
        assert str(info.value) == (
            f"{root}: the cache directory holds the run's output directory {run}; give the cache a directory of its own"
        )
    assert not run.exists()
    ShardCache(tmp_path / "cache", outputs=[run])  # beside the run: fine
    manifest = {"fingerprint": FP, "shards": [entry(0)]}
    with pytest.raises(CacheError, match="holds the run's output directory"):
        cache_view(tmp_path, 1.0, LOC, manifest, outputs=[run])


def test_a_fresh_filesystem_is_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "lost+found" / "#1234").write_bytes(b"fsck")
    shards, source = ShardCache(tmp_path, limit_bytes=SIZE).open(LOC, FP), Source()
    stored(shards, source, 0, 1)
    assert (tmp_path / "lost+found" / "#1234").read_bytes() == b"fsck"


def test_a_cache_from_before_the_marker_is_adopted(tmp_path: Path) -> None:
    shards, source = ShardCache(tmp_path).open(LOC, FP), Source()
    stored(shards, source, 0)
    (tmp_path / ".asl-shard-cache").unlink()
    again = ShardCache(tmp_path, limit_bytes=SIZE).open(LOC, FP)
    assert (tmp_path / ".asl-shard-cache").is_file()
    assert read(again, 0, source) == blob(0) and source.calls == [entry(0)["name"]]


@pytest.mark.parametrize("limit", [float("nan"), float("inf"), -1.0, 0.0, 1e300, True])
def test_a_limit_that_is_not_a_finite_positive_number_is_one_line(tmp_path: Path, limit: float) -> None:
    with pytest.raises(CacheError, match=r"^--cache-limit .*: must be a finite number of GB above 0$"):
        cache_view(tmp_path, limit, LOC, {"fingerprint": FP, "shards": []})


@pytest.mark.parametrize("limit", ["nan", "inf", "-1", "-inf"])
def test_the_commands_refuse_a_limit_that_is_not_a_finite_positive_number(tmp_path: Path, limit: str) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main as pipeline_main
    from train.cli import main as train_main

    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"")
    runs = [
        (pipeline_main, ["verify", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--cache-limit", limit]),
        (train_main, ["evaluate", "--checkpoint", str(ckpt), "--cache-dir", str(tmp_path), "--cache-limit", limit]),
        (train_main, ["--shards", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--cache-limit", limit]),
    ]
    for main, args in runs:
        result = CliRunner().invoke(main, args)
        assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), result.output
        last = result.output.strip().splitlines()[-1]
        assert re.match(r"Error: .*cache[-_]limit.*" + re.escape(limit), last), result.output
    assert not (tmp_path / "c").exists()
