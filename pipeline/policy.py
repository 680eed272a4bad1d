"""How long and how often a remote read may try (`ReadPolicy`), and the error a read that fails raises.

One policy is built from the options (`--io-timeout`, `--io-min-rate`, `--io-retries`) and passed down
whole to every reader: the manifest's, the shards' (`pipeline.shards`), the cache's fills
(`pipeline.cache`), http (`pipeline.http`) and `pipe:` commands (`pipeline.location`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pipeline.errors import AslError

STALL_S = 60.0  # seconds without a byte before a remote read is abandoned
MIN_RATE = 50_000  # bytes/s a remote read must average (after its first STALL_S): a 25 MB shard gets 560 s
RETRIES = 2  # further attempts after a failed remote read
RETRY_WAIT_MAX_S = 30.0  # the longest wait before a retry: waits double from 1 s up to this


class LocationError(AslError, OSError):
    """A file of a location that could not be read: the message names its URL and the reason."""


@dataclass(frozen=True)
class ReadPolicy:
    """The bounds of one remote read and its retries.

    A read is abandoned after `stall_s` seconds without a byte, and once it has run longer than
    `stall_s + received / min_rate` (`min_rate` in bytes/s; 0 leaves only the stall limit) or, when set,
    `deadline_s` in all. A failed read is tried again `retries` times, after 1 s, 2 s, 4 s... (at most
    RETRY_WAIT_MAX_S each).
    """

    stall_s: float = STALL_S
    min_rate: float = MIN_RATE
    retries: int = RETRIES
    deadline_s: float | None = None

    @classmethod
    def from_options(cls, io_timeout: float, io_min_rate: float, io_retries: int) -> ReadPolicy:
        """The policy of the command-line options (`--io-min-rate` is in kB/s)."""
        return cls(stall_s=io_timeout, min_rate=io_min_rate * 1000, retries=io_retries)

    def time_left(self, elapsed: float, received: int) -> float:
        """Seconds the read may still run, having received `received` bytes in `elapsed` seconds."""
        by_rate = self.stall_s + received / self.min_rate - elapsed if self.min_rate else math.inf
        return min(by_rate, self.deadline_s - elapsed) if self.deadline_s is not None else by_rate

    def deadline(self, size: int) -> float:
        """The longest a read of `size` bytes may take in all."""
        return self.time_left(0.0, size)

    def too_slow(self, url: str, received: int, elapsed: float) -> LocationError:
        if self.deadline_s is not None and elapsed >= self.deadline_s:
            return LocationError(f"{url}: not read within {self.deadline_s:g} s; abandoned")
        return LocationError(
            f"{url}: {received} bytes in {elapsed:.0f} s, below the minimum rate of "
            f"{self.min_rate / 1000:g} kB/s (--io-min-rate); abandoned"
        )

    def once(self) -> ReadPolicy:
        """This policy without retries (a read whose caller gives up at the first failure)."""
        return replace(self, retries=0)

    def retry_wait(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt + 1` (`attempt` from 0): 1, 2, 4, ... up to RETRY_WAIT_MAX_S."""
        return min(2.0 ** min(attempt, 64), RETRY_WAIT_MAX_S)


DEFAULT_POLICY = ReadPolicy()  # every reader's default: the options' defaults
