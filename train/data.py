"""The trainer's input pipeline: shards -> length-bucketed, trimmed CPU batches.

One explicit list of WebDataset stages (see `ShardStream.stages`):

1. `epoch_ranges`  shard shuffle (seeded by epoch, identical on every rank), then a split
                   of the shuffled sample sequence into one contiguous range per rank
                   and per DataLoader worker
2. `read_samples`  each shard of a run of ranges read whole, once, from its location (a
                   directory, an http(s) URL or a `pipe:` command, `pipeline.location`; a
                   remote one through the shard cache with `--cache-dir`), checked against
                   the manifest (size and sha256, then its keys in order and their count),
                   then the members of the ranges' samples, each tagged with its sample id
                   (its position in the training shards in manifest order); any member type
                   other than `.npy`, `.cls`, `.json` is an error naming the shard and the member
3. `wds.shuffle`   sample shuffle buffer (training only)
4. `decode`        `.npy` without pickle, `.cls`, `.json`; the label must be the manifest's
5. `batches`       length bucketing and collate: each batch trimmed to its longest sequence

Epoch contract: the manifest's sample counts fix the epoch before any data is read.
Every rank gets `ceil(N / ranks)` training samples (ranks short by one repeat a
sample from the start of the epoch, at most `ranks - 1` repeats in all), hence the same
`ceil(ceil(N / ranks) / batch)` batches: no end-of-epoch hang under DDP. Inside a rank,
workers get whole batches and one of them the remainder, so the batch count does not
depend on the number of workers. The split is per sample, not per shard, so fewer
shards than `workers x ranks` works by design. Validation is not shuffled, not padded,
and yields every sample of the validation folds exactly once across ranks and workers.
Workers must not be persistent: the epoch is read when the loader starts its workers.

Resuming an epoch under another number of ranks or workers (`ShardStream.resume_epoch`): that epoch
is the samples it has not yet trained, split by `train.resplit.rest_of_epoch`, and `len()` is its
remaining batch count; later epochs are split as above.

Data errors (a shard that cannot be read, or that disagrees with the manifest) do not cross
the worker boundary as exceptions, whose message torch buries in a worker traceback: the
stream yields a `DataError` in place of the next batch and stops, and `checked` (or the
trainer's cross-rank version, `train.distributed.agreed_batches`) raises it as a `ShardError`
with its one-line message.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from pipeline.cache import CachedShards
from pipeline.features import MAX_LEN, N_CHANNELS, N_PACKED, pad_features, pad_frames, unpack_missing
from pipeline.landmarks import N_POINTS
from pipeline.location import Location, LocationError
from pipeline.policy import DEFAULT_POLICY, ReadPolicy
from pipeline.procs import die_with_parent
from pipeline.shards import ShardError, as_location, decode_compact, read_manifest, read_shard, shard_samples
from train.batch import Batch
from train.resplit import rest_of_epoch, rest_steps
from train.split import Range, rank_counts, shard_offsets, slot_ranges, worker_counts


@dataclass
class DataError:
    """Stands in the stream for the batch that a data error prevented; the stream ends after it."""

    message: str


@dataclass
class Decoded:
    x: np.ndarray  # (L, 118, 6) float16/float32 real frames
    missing: np.ndarray  # (L, 15) uint8 packed
    label: int
    key: str
    participant: str = ""  # the json member's participant_id (per-participant reports)
    sample_id: int = -1  # its position in the stream's shards in manifest order (`shard_offsets`)


def fold_shards(manifest: dict[str, Any], folds: Iterable[int]) -> list[dict[str, Any]]:
    """Manifest entries of the non-empty shards in the given folds, in manifest order."""
    folds = set(folds)
    known = {f["fold"] for f in manifest["folds"]}
    if not folds <= known:
        raise ShardError(f"folds {sorted(folds - known)} not in the manifest (has {sorted(known)})")
    return [s for s in manifest["shards"] if s["fold"] in folds and s["samples"]]


class ShardStream(wds.DataPipeline):
    """An iterable of `Batch` for one rank; the DataLoader's workers split it further.

    `shards` are manifest entries (name, samples, bytes, sha256, sequence_ids, labels) of shards
    at `location`; `check` is "sha256" (size and digest of every shard read), "size", or "auto"
    (sha256 for a remote location, size for a local directory). Remote reads follow `policy` (time and
    retries) and go through `cache` when given (`pipeline.shards.read_shard`).
    """

    def __init__(
        self,
        location: str | Location,
        shards: list[dict[str, Any]],
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        bucket: bool = True,
        shuffle_buffer: int = 2000,
        bucket_batches: int = 32,
        check: str = "auto",
        policy: ReadPolicy = DEFAULT_POLICY,
        cache: CachedShards | None = None,
    ) -> None:
        self.location = as_location(location)
        self.shards, self.batch_size, self.train = shards, batch_size, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.bucket, self.shuffle_buffer, self.bucket_batches = bucket, shuffle_buffer, bucket_batches
        self.check, self.policy, self.cache = check, policy, cache
        self.entries = {s["name"]: s for s in shards}
        self.offsets = shard_offsets(shards)
        self.rest: tuple[int, np.ndarray] | None = None  # (epoch, its trained-sample mask) of a resumed epoch
        self.epoch = 0
        self.total = sum(s["samples"] for s in shards)
        super().__init__(*self.stages())

    def __iter__(self) -> Iterator[Batch | DataError]:
        try:
            yield from super().__iter__()
        except (ShardError, LocationError) as exc:
            yield DataError(str(exc))

    def stages(self) -> list[Any]:
        shuffle = [self.shuffle_stage] if self.train else []
        return [self.epoch_ranges, self.read_samples, *shuffle, decode, self.batches]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_epoch(self, epoch: int, trained: np.ndarray) -> None:
        """Make epoch `epoch` the samples it has not trained (`trained`: a bool mask over sample ids), split
        over this stream's ranks and workers (`train.resplit.rest_of_epoch`)."""
        if len(trained) != self.total:
            raise ValueError(f"a trained-sample mask of {len(trained)} ids for {self.total} samples")
        self.rest = (epoch, np.asarray(trained, dtype=bool))

    def _resumed(self) -> np.ndarray | None:
        """The trained-sample mask of the current epoch when it is a resumed one."""
        return self.rest[1] if self.rest is not None and self.rest[0] == self.epoch else None

    def samples_per_rank(self) -> int:
        return rank_counts(self.total, self.world_size, pad=self.train)[self.rank]

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (the rest of it, when resumed), whatever the number of
        workers."""
        if (trained := self._resumed()) is not None:
            return rest_steps(int((~trained).sum()), self.world_size, self.batch_size)
        return math.ceil(self.samples_per_rank() / self.batch_size)

    def shard_order(self) -> list[dict[str, Any]]:
        """The current epoch's shards: shuffled by epoch when training (the same order on every rank)."""
        shards = list(self.shards)
        if self.train:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(shards)
        return shards

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def epoch_ranges(self) -> Iterator[Range]:
        """Shard shuffle (same order on every rank), then this rank's and this worker's share of samples."""
        shards = self.shard_order()
        worker, workers = self._slot()
        if (trained := self._resumed()) is not None:
            order = [s["name"] for s in shards]
            share = rest_of_epoch(self.shards, order, trained, self.world_size, workers, self.batch_size)
            yield from share[self.rank][worker].ranges + share[self.rank][worker].fill
            return
        counts = rank_counts(self.total, self.world_size, pad=self.train)
        start = sum(counts[: self.rank])
        per_worker = worker_counts(counts[self.rank], workers, self.batch_size)
        start += sum(per_worker[:worker])
        yield from slot_ranges(shards, start, start + per_worker[worker])

    def read_samples(self, src: Iterable[Range]) -> Iterator[dict[str, Any]]:
        """Members of the samples in each run of ranges of one shard, from that shard read once, whole, and
        checked against the manifest.

        The next run's shard is read (and hashed) in a thread while this one's samples are decoded:
        network waits and hashing overlap the decoding (hashlib and the reads release the GIL). The
        thread is a daemon: Ctrl-C or a data error never waits for a slow read to end.
        """
        runs = [(name, list(group)) for name, group in itertools.groupby(src, key=lambda r: r.name)]
        reads = [_in_thread(self._shard, name) for name, _ in runs[:1]]
        for i, (name, group) in enumerate(runs):
            data = reads[i].result()
            if i + 1 < len(runs):
                reads.append(_in_thread(self._shard, runs[i + 1][0]))
            reads[i] = None  # drop the bytes once used
            yield from self._run_samples(name, group, data)

    def _shard(self, name: str) -> bytes:
        return read_shard(self.location, self.entries[name], self.check, self.policy, self.cache)

    def _run_samples(self, name: str, ranges: list[Range], data: bytes) -> Iterator[dict[str, Any]]:
        """The members of the samples of `ranges` (of shard `name`), in their order, from the shard's bytes (all of
        its samples are parsed and counted: once when the ranges ascend, as every epoch's do but a wrapped one)."""
        entry, source, first = self.entries[name], self.location.url(name), self.offsets[name]
        wanted = np.concatenate([np.arange(r.start, r.stop) for r in ranges])
        passes = [wanted] if (np.diff(wanted) > 0).all() else [np.arange(r.start, r.stop) for r in ranges]
        for positions in passes:
            picked = iter(positions.tolist())
            target = next(picked, None)
            for i, (key, sample) in enumerate(shard_samples(data, entry, source)):
                if i == target:
                    sample["__key__"], sample["__url__"], sample["__label__"] = key, source, entry["labels"][i]
                    sample["__id__"] = first + i
                    target = next(picked, None)
                    yield sample

    def shuffle_stage(self, src: Iterator[Any]) -> Iterator[Any]:
        seed = f"{self.seed}:{self.epoch}:{self.rank}:{self._slot()[0]}"
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed)(src)

    def batches(self, src: Iterator[Decoded]) -> Iterator[Batch]:
        """Length-bucketed batches: sort a pool of `bucket_batches` batches by length, cut, shuffle order."""
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{self._slot()[0]}:batches")
        pool_size = self.batch_size * (self.bucket_batches if self.bucket else 1)
        while pool := list(itertools.islice(src, pool_size)):
            if self.bucket:
                pool.sort(key=lambda s: len(s.x))
            chunks = [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
            if self.train:
                rng.shuffle(chunks)
            for chunk in chunks:
                yield collate(chunk, None if self.bucket else MAX_LEN)


def decode(src: Iterable[dict[str, Any]]) -> Iterator[Decoded]:
    """Decode and validate `.npy` (no pickle), `.cls` and `.json` members: the pipeline's decoder."""
    for s in src:
        source = f"{s['__url__']}:{s['__key__']}"
        x, missing, label = decode_compact(s, source)
        if label != s["__label__"]:  # the manifest's labels are checked against the label map
            raise ShardError(f"{source}: label {label}, manifest says {s['__label__']}")
        participant = str(json.loads(s["json"]).get("participant_id", ""))  # decode_compact checked it is an object
        yield Decoded(x, missing, label, s["__key__"], participant, s.get("__id__", -1))


def _in_thread(fn: Callable[[str], bytes], arg: str) -> Future:
    """`fn(arg)` running in a daemon thread, as a Future (which the process's exit never waits for)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(arg))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the result
            future.set_exception(exc)

    threading.Thread(target=run, name="shard-read", daemon=True).start()
    return future


def checked(loader: Iterable[Batch | DataError]) -> Iterator[Batch]:
    """The loader's batches; a `DataError` from any worker is raised as a ShardError with its message."""
    for item in loader:
        if isinstance(item, DataError):
            raise ShardError(item.message)
        yield item


def collate(samples: list[Decoded], length: int | None = None) -> Batch:
    """Stack samples padded by the pipeline's rule to `length` (default: the longest in the batch)."""
    lengths = np.array([len(s.x) for s in samples])
    t = length or int(lengths.max())
    x = np.empty((len(samples), t, N_POINTS, N_CHANNELS), dtype=samples[0].x.dtype)  # (B, T, 118, 6)
    packed = np.empty((len(samples), t, N_PACKED), dtype=np.uint8)  # (B, T, 15)
    for i, s in enumerate(samples):  # one copy per sample; everything per frame stays vectorized
        pad_features(s.x, t, out=x[i])
        packed[i] = pad_frames(s.missing, t)
    mask = np.arange(t)[None, :] < lengths[:, None]  # (B, T)
    return Batch(
        x=torch.from_numpy(x),
        mask=torch.from_numpy(mask),
        missing=torch.from_numpy(unpack_missing(packed)),
        labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
        keys=tuple(s.key for s in samples),
        participants=tuple(s.participant for s in samples),
        ids=torch.tensor([s.sample_id for s in samples], dtype=torch.int64),
    )


def make_loader(
    location: str | Path | Location,
    folds: Iterable[int],
    batch_size: int,
    train: bool,
    workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    bucket: bool = True,
    pin_memory: bool = False,
    manifest: dict[str, Any] | None = None,
    **stream_options: Any,
) -> DataLoader:
    """A DataLoader over the given folds of a shard location (directory, URL or pipe: template).

    `len(loader)` is the exact batch count of this rank per epoch. Iterate it with `checked` (or
    `train.distributed.agreed_batches`): it yields a `DataError` where a shard failed.
    """
    location = as_location(location)
    manifest = manifest if manifest is not None else read_manifest(location)
    folds = list(folds)
    shards = fold_shards(manifest, folds)
    if not shards:
        raise ShardError(f"{location}: no samples in folds {sorted(folds)}")
    stream = ShardStream(location, shards, batch_size, train, rank, world_size, seed, bucket, **stream_options)
    # Its own generator: creating an iterator must not draw from the global RNG (resume would diverge).
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        worker_init_fn=worker_init,
    )


def worker_init(worker_id: int) -> None:
    """A DataLoader worker ends with the trainer, even a SIGKILLed one (and its `pipe:` commands with it)."""
    die_with_parent()


def train_val_folds(manifest: dict[str, Any], val_folds: Iterable[int]) -> tuple[list[int], list[int]]:
    """The training folds (all others) and the validation folds."""
    val = sorted(set(val_folds))
    return [f["fold"] for f in manifest["folds"] if f["fold"] not in val], val
