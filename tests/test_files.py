"""The lock that one writer of a directory holds: the holder's pid in the refusal, released on any exit."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import AslError
from pipeline.files import AtomicFile, LockHeldError, atomic_file, locked, write_atomic, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from pipeline.files import locked
with locked(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    lock = tmp_path / "run.lock"
    with locked(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(LockHeldError) as info, locked(lock):
            pass
        assert str(info.value) == f"{lock}: held by another process (pid {os.getpid()})"
        assert info.value.pid == str(os.getpid()) and isinstance(info.value, AslError)
        assert lock.read_text() == f"{os.getpid()}\n"  # the refused attempt leaves the holder's lock alone
    assert not lock.exists()
    with locked(lock):  # released: free again
        assert lock.exists()


def test_released_when_the_body_raises(tmp_path: Path) -> None:
    lock = tmp_path / "run.lock"
    with pytest.raises(KeyError), locked(lock):
        raise KeyError("boom")
    assert not lock.exists()
    with locked(lock):
        pass


@pytest.mark.slow
def test_a_killed_holder_leaves_a_stale_file_that_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    lock = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LockHeldError, match=f"pid {holder.pid}\\)"), locked(lock):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert lock.read_text() == f"{holder.pid}\n"  # the file stays behind; the kernel dropped the flock
    with caplog.at_level(logging.WARNING, logger="pipeline.files"), locked(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert f"left by pid {holder.pid}, which is no longer running" in caplog.text
    assert not lock.exists()


# ---------------------------------------------------------------- the atomic writer


def test_a_link_planted_at_the_temporary_name_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    out = tmp_path / "cv.json"
    (tmp_path / "cv.json.tmp").symlink_to(victim)
    hard = tmp_path / "oof.csv.tmp"
    os.link(victim, hard)  # a hard link: the same file under the temporary's name
    write_json_atomic(out, {"top1": 0.5})
    write_atomic(tmp_path / "oof.csv", b"a,b\n")
    assert victim.read_bytes() == b"keep me"
    assert json.loads(out.read_text()) == {"top1": 0.5} and not out.is_symlink()
    assert (tmp_path / "oof.csv").read_bytes() == b"a,b\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv.json", "cv.json.tmp", "oof.csv", "oof.csv.tmp", "victim"]


def test_a_free_temporary_name_is_the_plain_one_and_the_mode_follows_the_umask(tmp_path: Path) -> None:
    out = AtomicFile(tmp_path / "a.json")
    assert out.tmp == tmp_path / "a.json.tmp"
    second = AtomicFile(tmp_path / "a.json")  # a concurrent writer of the same file takes another name
    assert second.tmp.name.startswith(f"a.json.{os.getpid()}.") and second.tmp.name.endswith(".tmp")
    out.write(b"one")
    second.write(b"two")
    out.commit()
    second.commit()
    assert (tmp_path / "a.json").read_bytes() == b"two"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half of the ne")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_shard_writer_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    from pipeline.shards import ShardWriter

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "fold0-000000.tar.tmp").symlink_to(victim)
    writer = ShardWriter(tmp_path / "fold0-000000.tar")
    writer.write([("a.cls", b"1")])
    size, _ = writer.close()
    assert victim.read_bytes() == b"keep me" and (tmp_path / "fold0-000000.tar").stat().st_size == size


def test_the_pictures_never_write_through_a_planted_link(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from train.confusion import confusion_of, plot_confusion
    from train.runfiles import plot_curves

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "confusion.png.tmp").symlink_to(victim)
    (tmp_path / "curves.png.tmp").symlink_to(victim)
    plot_confusion(confusion_of(["a", "b", "b"], ["b", "b", "a"]), tmp_path / "confusion.png", "t")
    row = {"epoch": 0, "train_loss": 1.0, "val_loss": 1.0, "val_top1": 0.5, "val_top5": 0.9}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    plot_curves(tmp_path)
    assert victim.read_bytes() == b"keep me"
    for name in ("confusion.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
