"""The lock that one writer of a directory holds: the holder's pid in the refusal, released on any exit."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import AslError
from pipeline.files import LockHeldError, locked

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
