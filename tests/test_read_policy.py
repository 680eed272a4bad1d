"""One read policy (`pipeline.policy.ReadPolicy`) built once from the options and passed down whole: the same
defaults for every reader, capped retry waits, and the run's policy in `evaluate` and `verify`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.policy import DEFAULT_POLICY, MIN_RATE, RETRIES, RETRY_WAIT_MAX_S, STALL_S, ReadPolicy
from train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
OLD = Path(__file__).parent / "data" / "checkpoint-format-1.pt"


class Captured(Exception):
    """Stops a command at its first read, carrying the policy it was given."""


def capture(*args: object, **kwargs: object) -> None:
    raise Captured(next(a for a in (*args, *kwargs.values()) if isinstance(a, ReadPolicy)))


def test_the_options_defaults_are_the_readers_defaults() -> None:
    assert ReadPolicy(stall_s=STALL_S, min_rate=MIN_RATE, retries=RETRIES, deadline_s=None) == DEFAULT_POLICY
    assert TrainConfig().read_policy() == DEFAULT_POLICY
    cfg = TrainConfig(io_timeout=7.5, io_min_rate=3, io_retries=4)
    assert cfg.read_policy() == ReadPolicy(stall_s=7.5, min_rate=3000, retries=4)  # kB/s to bytes/s, once


def test_retry_waits_double_up_to_a_cap() -> None:
    policy = ReadPolicy(retries=40)
    waits = [policy.retry_wait(a) for a in range(policy.retries)]
    assert waits[:6] == [1, 2, 4, 8, 16, RETRY_WAIT_MAX_S] and RETRY_WAIT_MAX_S == 30
    assert max(waits) == RETRY_WAIT_MAX_S and sum(waits) == 31 + 35 * 30
    assert policy.retry_wait(10**9) == RETRY_WAIT_MAX_S  # no overflow, however many retries are asked for


def test_the_time_a_read_may_take() -> None:
    policy = ReadPolicy(stall_s=10, min_rate=1000)
    assert policy.deadline(5000) == 15 and policy.time_left(12, 5000) == 3
    assert ReadPolicy(stall_s=10, min_rate=0).deadline(10**9) == math.inf
    capped = ReadPolicy(stall_s=10, min_rate=1000, deadline_s=12)
    assert capped.deadline(5000) == 12 and capped.time_left(11, 10**6) == 1
    assert str(capped.too_slow("u", 10, 12)) == "u: not read within 12 s; abandoned"
    assert (
        str(policy.too_slow("u", 10, 12))
        == "u: 10 bytes in 12 s, below the minimum rate of 1 kB/s (--io-min-rate); abandoned"
    )


def test_verify_builds_its_policy_from_its_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pipeline import cli

    monkeypatch.setattr(cli, "read_manifest", capture)
    for args, expected in [
        ([], DEFAULT_POLICY),
        (["--io-timeout", "3", "--io-min-rate", "2", "--io-retries", "5"], ReadPolicy(3, 2000, 5)),
    ]:
        result = CliRunner().invoke(cli.main, ["verify", str(tmp_path), *args])
        assert isinstance(result.exception, Captured) and result.exception.args[0] == expected


def test_evaluate_reads_with_the_runs_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from train import scoring
    from train.checkpoint import load_checkpoint, save_checkpoint
    from train.cli import main

    ckpt = load_checkpoint(OLD)
    ckpt["config"].update(io_timeout=9.0, io_min_rate=4.0, io_retries=6)
    save_checkpoint(tmp_path / "a.pt", ckpt)
    monkeypatch.setattr(scoring, "read_manifest", capture)
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tmp_path / "a.pt"), "--device", "cpu"])
    assert isinstance(result.exception, Captured) and result.exception.args[0] == ReadPolicy(9.0, 4000, 6)


def test_the_readers_wait_as_the_policy_says(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A location's retries and the cache's fills sleep `retry_wait`: doubling, capped (the waits, not wall time)."""
    from pipeline import cache as cache_mod
    from pipeline import location
    from pipeline.cache import ShardCache

    waits: list[float] = []
    monkeypatch.setattr(location.time, "sleep", waits.append)  # one `time` module: the cache's sleeps land here too
    assert cache_mod.time is location.time

    def failing(url: str, max_bytes: int | None, policy: ReadPolicy) -> bytes:
        raise location.LocationError(f"{url}: refused")

    monkeypatch.setitem(location.SCHEMES, "bad", location.Scheme("bad", failing))
    policy = ReadPolicy(retries=8)
    with pytest.raises(location.LocationError, match="bad://x/a.tar: refused"):
        location.Location.parse("bad://x").read("a.tar", policy=policy)
    expected = [1, 2, 4, 8, 16, 30, 30, 30]
    assert waits == expected
    waits.clear()
    shards = ShardCache(tmp_path).open("bad://x", "fp")
    with pytest.raises(location.LocationError):
        shards.read("a.tar", 3, "0" * 64, lambda: b"abc", policy=policy)  # sha256 differs every time
    assert waits == expected
