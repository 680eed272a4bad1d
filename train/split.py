"""The epoch-split arithmetic: which samples of which shards each rank and DataLoader worker reads.

Shared by the trainer's input pipeline (`train.data`) and the rest of a resumed epoch (`train.resplit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Range:
    """Samples `[start, stop)` of one shard (its manifest name), in stored order."""

    name: str
    start: int
    stop: int


def shard_offsets(shards: list[dict[str, Any]]) -> dict[str, int]:
    """The id of each shard's first sample: ids number the shards' samples in manifest order from 0."""
    counts = [s["samples"] for s in shards]
    return dict(zip([s["name"] for s in shards], np.cumsum([0, *counts[:-1]]).tolist(), strict=True))


def rank_counts(total: int, ranks: int, pad: bool) -> list[int]:
    """Samples per rank: equal (`ceil`) with padding, else a near-equal exact split."""
    if pad:
        return [math.ceil(total / ranks)] * ranks
    return [total // ranks + (r < total % ranks) for r in range(ranks)]


def worker_counts(n: int, workers: int, batch_size: int) -> list[int]:
    """Split a rank's `n` samples over workers in whole batches, the remainder to one worker."""
    full, rest = divmod(n, batch_size)
    counts = [(full // workers + (w < full % workers)) * batch_size for w in range(workers)]
    counts[min(full % workers, workers - 1) if rest else 0] += rest
    return counts


def slot_ranges(shards: list[dict[str, Any]], start: int, stop: int) -> list[Range]:
    """Cut positions `[start, stop)` of the shard sequence repeated end to end into per-shard ranges."""
    total = sum(s["samples"] for s in shards)
    bounds, pos = [], start
    while pos < stop:  # wraps around (more than once when there are fewer samples than slots)
        lo = pos % total
        hi = min(total, lo + stop - pos)
        bounds.append((lo, hi))
        pos += hi - lo
    out, offset = [], 0
    for shard in shards:
        n = shard["samples"]
        for a, b in bounds:
            lo, hi = max(a, offset), min(b, offset + n)
            if lo < hi:
                out.append(Range(shard["name"], lo - offset, hi - offset))
        offset += n
    return out
