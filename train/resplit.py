"""The rest of an interrupted training epoch, split over another number of ranks or workers.

Within an epoch the samples a rank has trained are not a prefix of its share (the shuffle buffer
and length bucketing reorder them), so the position `batch_in_epoch` alone cannot say which samples
remain once the split changes. The checkpoint therefore records the epoch's trained samples: one
bit per sample id (`pack_trained`: 12 kB for the 94,477 sequences of the full dataset). A sample's
id is its position in the training shards taken in manifest order (`train.split.shard_offsets`), which no
shuffle, rank or worker count changes.

`rest_of_epoch` splits the samples not yet trained, in the epoch's shard order, by the trainer's own
rules (`train.split.rank_counts` with padding, then `worker_counts`): every rank gets the same number
of batches, and every untrained sample goes to exactly one rank and worker. A rank short of samples
for an equal batch count is topped up with `fill`: samples the epoch already trained (at most
`ranks - 1`; the normal epoch pads the same way), never one still to come, so the trainer can train
them as padding (or weigh them 0). With nothing trained yet, the split is the normal epoch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from train.split import Range, rank_counts, shard_offsets, worker_counts


@dataclass(frozen=True)
class Share:
    """One worker's part of the rest of an epoch: runs of untrained samples in the epoch's order, then fill."""

    ranges: list[Range]
    fill: list[Range]

    def samples(self) -> int:
        return sum(r.stop - r.start for r in self.ranges + self.fill)


def pack_trained(trained: np.ndarray) -> np.ndarray:
    """The checkpoint's form of a bool mask over sample ids: uint8, one bit per sample."""
    return np.packbits(np.asarray(trained, dtype=bool))


def unpack_trained(packed: np.ndarray, samples: int) -> np.ndarray:
    """The bool mask over `samples` sample ids back from `pack_trained`; ValueError if it is another size."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 1 or len(packed) != math.ceil(samples / 8):
        raise ValueError(f"the checkpoint's trained-sample record covers {8 * packed.size} ids, not {samples}")
    return np.unpackbits(packed, count=samples).astype(bool)


def rest_steps(rest: int, ranks: int, batch_size: int) -> int:
    """Batches every rank trains in the rest of the epoch (`rest` samples left)."""
    return math.ceil(rank_counts(rest, ranks, pad=True)[0] / batch_size) if rest else 0


def rest_of_epoch(
    shards: list[dict[str, Any]], order: list[str], trained: np.ndarray, ranks: int, workers: int, batch_size: int
) -> list[list[Share]]:
    """`[rank][worker]` shares of the samples of `shards` (manifest order) not `trained`, in the epoch's
    shard `order`; each rank gets `rest_steps` batches' worth, topped up with already-trained fill."""
    offsets = shard_offsets(shards)
    sizes = {s["name"]: s["samples"] for s in shards}
    epoch = np.concatenate([np.arange(offsets[n], offsets[n] + sizes[n]) for n in order] or [np.zeros(0, int)])
    trained = np.asarray(trained, dtype=bool)
    rest, done = epoch[~trained[epoch]], epoch[trained[epoch]]
    counts = rank_counts(len(rest), ranks, pad=True) if len(rest) else [0] * ranks
    short = sum(counts) - len(rest)
    source = done if len(done) else rest  # nothing trained yet: pad by wrapping around, as a normal epoch does
    seq = np.concatenate([rest, source[np.arange(short) % max(1, len(source))]]).astype(np.int64)
    names = [s["name"] for s in shards]
    first = np.array([offsets[n] for n in names])
    shares, pos = [], 0
    for count in counts:
        row = []
        for n in worker_counts(count, workers, max(1, batch_size)):
            row.append(
                Share(
                    _runs(seq[pos : min(pos + n, len(rest))], names, first),
                    _runs(seq[max(pos, len(rest)) : pos + n], names, first),
                )
            )
            pos += n
        shares.append(row)
    return shares


def share_ids(share: Share, offsets: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(untrained ids, fill ids) of a share, in its order."""

    def ids(ranges: list[Range]) -> np.ndarray:
        parts = [np.arange(offsets[r.name] + r.start, offsets[r.name] + r.stop) for r in ranges]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    return ids(share.ranges), ids(share.fill)


def _runs(ids: np.ndarray, names: list[str], first: np.ndarray) -> list[Range]:
    """Sample ids (in order) as Ranges: one per run of consecutive ids of one shard."""
    if not len(ids):
        return []
    shard = np.searchsorted(first, ids, side="right") - 1
    cut = np.flatnonzero((np.diff(ids) != 1) | (np.diff(shard) != 0)) + 1
    starts, stops = np.r_[0, cut], np.r_[cut, len(ids)]
    return [
        Range(names[shard[a]], int(ids[a] - first[shard[a]]), int(ids[b - 1] - first[shard[a]] + 1))
        for a, b in zip(starts, stops, strict=True)
    ]
