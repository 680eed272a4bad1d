"""The trainer's input pipeline (train/data.py): epoch contract, rank/worker split, validation, shuffles,
refused member types, length bucketing and bit-exact collation against the shard format.

Ranks are simulated in one process (`make_loader(..., rank=r, world_size=2)`); workers > 0 are real
DataLoader worker processes. Samples are identified by their content: a digest of the real frames of
`x` (float32 bytes), mapped to a sequence id through `pipeline.shards.iter_samples`.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import pickle
import re
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from decoded import file_sha256, iter_samples
from demo_data import demo_dataset, demo_shards

from pipeline.features import MAX_LEN
from pipeline.landmarks import N_POINTS
from pipeline.shards import MANIFEST, ShardError, read_manifest
from train.batch import Batch
from train.data import ShardStream, checked, fold_shards, rank_counts, train_val_folds, worker_counts
from train.data import make_loader as _make_loader

RANKS = 2
SEED = 7


def make_loader(*args: Any, **kwargs: Any) -> torch.utils.data.DataLoader:
    """`train.data.make_loader` with a short worker timeout, so that a stuck worker fails instead of hanging."""
    loader = _make_loader(*args, **kwargs)
    if loader.num_workers:
        loader.timeout = 60
    return loader


# ---------------------------------------------------------------- data and sample identity


def digest(array: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()


@dataclass
class Info:
    fold: int
    shard: str
    index: int  # position in the shard
    label: int
    length: int


@dataclass
class Catalog:
    """Every sample of a shard directory, as `iter_samples` decodes it: content digest -> sequence id."""

    shard_dir: Path
    manifest: dict[str, Any]
    info: dict[str, Info] = field(default_factory=dict)
    by_digest: dict[bytes, str] = field(default_factory=dict)

    @classmethod
    def build(cls, shard_dir: Path) -> Catalog:
        cat = cls(shard_dir, read_manifest(shard_dir))
        for entry in cat.manifest["shards"]:
            samples = list(iter_samples(shard_dir / entry["name"]))
            assert [s.meta["sequence_id"] for s in samples] == [str(k) for k in entry["sequence_ids"]]
            for i, s in enumerate(samples):
                n = int(s.mask.sum())
                sid = s.meta["sequence_id"]
                cat.info[sid] = Info(entry["fold"], entry["name"], i, s.label, n)
                cat.by_digest[digest(s.features[:n])] = sid
        # identity by content is only sound if no two sequences have the same features
        assert len(cat.by_digest) == len(cat.info) == cat.manifest["totals"]["samples"]
        return cat

    def folds(self) -> list[int]:
        return [f["fold"] for f in self.manifest["folds"]]

    def ids(self, folds: list[int]) -> list[str]:
        return [sid for sid, i in self.info.items() if i.fold in set(folds)]

    def identify(self, batch: Batch) -> list[str]:
        """Sequence id of every row of a batch, from its real frames (bit for bit)."""
        out = []
        for i, n in enumerate(batch.mask.sum(dim=1).tolist()):
            sid = self.by_digest.get(digest(batch.x[i, :n].numpy()))
            assert sid is not None, f"batch row {i} ({n} real frames) matches no stored sample bit for bit"
            out.append(sid)
        return out

    def fold_set(self, size: int, divisible_by: int, divisible: bool) -> list[int]:
        """Some `size` folds whose sample count is (or is not) divisible by `divisible_by`."""
        counts = {f["fold"]: f["samples"] for f in self.manifest["folds"]}
        for combo in itertools.combinations(sorted(counts), size):
            if (sum(counts[f] for f in combo) % divisible_by == 0) == divisible:
                return list(combo)
        raise AssertionError(
            f"demo data has no {size} folds with a count {'' if divisible else 'not '}divisible "
            f"by {divisible_by}: {counts} (change the demo_dataset arguments)"
        )


def epoch(loader: torch.utils.data.DataLoader, cat: Catalog, at: int | None = None) -> list[list[str]]:
    """One epoch of a loader as sequence ids per batch (after `set_epoch(at)` when given)."""
    if at is not None:
        loader.dataset.set_epoch(at)
    return [cat.identify(batch.to("cpu")) for batch in loader]


def flat(batches: list[list[str]]) -> list[str]:
    return [k for b in batches for k in b]


def assert_documented_repeats(per_rank: list[list[str]], expected: list[str]) -> None:
    """Every sample at least once; ranks padded to ceil(N / ranks) by repeating exactly R*ceil(N/R) - N samples."""
    n, ranks = len(expected), len(per_rank)
    for r, ids in enumerate(per_rank):
        assert len(ids) == math.ceil(n / ranks), f"rank {r}: {len(ids)} samples, expected ceil({n}/{ranks})"
        assert len(set(ids)) == len(ids), f"rank {r} yields a sample twice: {Counter(ids).most_common(2)}"
    counts = Counter(flat(per_rank))
    assert set(counts) == set(expected), "samples missing or foreign to the folds"
    repeats = sorted(k for k, c in counts.items() if c > 1)
    assert max(counts.values()) <= 2
    assert len(repeats) == ranks * math.ceil(n / ranks) - n
    if n % ranks == 0:
        assert all(c == 1 for c in counts.values())


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 241 sequences of 6 participants in 3 folds: fold sizes 80, 81, 80 (both parities for 2 ranks)
    return demo_dataset(tmp_path_factory.mktemp("loader-data"), sequences=241, signs=5, participants=6)


@pytest.fixture(scope="session")
def shard_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loader-shards")


@pytest.fixture(scope="session")
def shards(shard_base: Path, data_dir: Path) -> Path:
    """Several shards per fold (25 samples each plus a short last one)."""
    return demo_shards(shard_base, data_dir, shard_size=25, folds=3)


@pytest.fixture(scope="session")
def cat(shards: Path) -> Catalog:
    return Catalog.build(shards)


@pytest.fixture(scope="session")
def few_shards(shard_base: Path, data_dir: Path) -> Path:
    """One shard per fold: fewer shards than workers x ranks."""
    return demo_shards(shard_base, data_dir, shard_size=1000, folds=3)


@pytest.fixture(scope="session")
def few_cat(few_shards: Path) -> Catalog:
    return Catalog.build(few_shards)


# ---------------------------------------------------------------- the epoch contract: stage level


def test_stages_are_one_explicit_list(shards: Path) -> None:
    train = make_loader(shards, [1, 2], 16, train=True, workers=0).dataset
    val = make_loader(shards, [0], 16, train=False, workers=0).dataset
    names = [getattr(s, "__name__", type(s).__name__) for s in train.stages()]
    assert names == ["epoch_ranges", "read_samples", "shuffle_stage", "decode", "batches"]
    assert [getattr(s, "__name__", "") for s in val.stages()] == [n for n in names if n != "shuffle_stage"]
    assert len(train.pipeline) == len(train.stages())


def _slot_positions(stream: ShardStream, rank: int, worker: int, workers: int) -> list[tuple[str, int]]:
    """(shard, index) of every sample in one rank's worker's ranges."""
    stream.rank = rank
    stream._slot = lambda: (worker, workers)  # what get_worker_info() gives inside a DataLoader worker
    return [(r.name, i) for r in stream.epoch_ranges() for i in range(r.start, r.stop)]


def test_epoch_ranges_split_every_sample_over_ranks_and_workers() -> None:
    """The range stage alone, over many sizes: each slot reads exactly its share, every sample is covered,
    training pads with exactly R*ceil(N/R) - N repeats, validation reads each sample once."""
    rng = np.random.default_rng(0)
    failures = []
    for n, ranks, workers, batch, train in itertools.product(
        range(2, 41), (1, 2, 3, 4), (1, 2, 3, 4), (1, 3, 8, 64), (True, False)
    ):
        if n < ranks:
            continue
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, 4))), replace=False))
        sizes = np.diff(np.concatenate([[0], cuts, [n]])).tolist()
        shards = [{"name": f"s{i}", "samples": k} for i, k in enumerate(sizes)]
        stream = ShardStream("unread", shards, batch, train, world_size=ranks, seed=1)
        seen: Counter[tuple[str, int]] = Counter()
        for rank in range(ranks):
            share = rank_counts(n, ranks, pad=train)[rank]
            for worker, want in enumerate(worker_counts(share, workers, batch)):
                got = _slot_positions(stream, rank, worker, workers)
                if len(got) != want:
                    failures.append(
                        f"N={n} shards={sizes} ranks={ranks} workers={workers} batch={batch} "
                        f"train={train}: rank {rank} worker {worker} reads {len(got)} samples, "
                        f"its share is {want}"
                    )
                seen.update(got)
        everything = {(f"s{i}", j) for i, k in enumerate(sizes) for j in range(k)}
        repeats = ranks * math.ceil(n / ranks) - n if train else 0
        if set(seen) != everything or sum(seen.values()) != n + repeats or max(seen.values()) > 2:
            failures.append(
                f"N={n} shards={sizes} ranks={ranks} workers={workers} batch={batch} train={train}: "
                f"{sum(seen.values())} reads of {len(seen)} distinct samples, expected "
                f"{n} + {repeats} repeats"
            )
    assert not failures, f"{len(failures)} failing configurations, e.g.\n" + "\n".join(failures[:5])


def test_worker_counts_are_whole_batches_and_keep_the_batch_count() -> None:
    for n, workers, batch in itertools.product(range(0, 70), (1, 2, 3, 5), (1, 4, 16)):
        counts = worker_counts(n, workers, batch)
        assert sum(counts) == n and len(counts) == workers
        assert sum(c % batch != 0 for c in counts) <= 1
        assert sum(math.ceil(c / batch) for c in counts) == math.ceil(n / batch)


def test_rank_counts() -> None:
    assert rank_counts(161, 2, pad=True) == [81, 81]
    assert rank_counts(161, 2, pad=False) == [81, 80]
    assert rank_counts(160, 2, pad=True) == rank_counts(160, 2, pad=False) == [80, 80]
    for n, ranks in itertools.product(range(1, 50), range(1, 6)):
        assert sum(rank_counts(n, ranks, pad=False)) == n
        assert 0 <= sum(rank_counts(n, ranks, pad=True)) - n <= ranks - 1


# ---------------------------------------------------------------- training epochs through real loaders


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [16, 128], ids=["several-batches", "one-batch-per-rank"])
@pytest.mark.parametrize("divisible", [True, False], ids=["N-even", "N-odd"])
@pytest.mark.parametrize("workers", [1, 2])
def test_training_epoch_every_sample_once_and_equal_batch_counts(
    cat: Catalog, shards: Path, workers: int, divisible: bool, batch_size: int
) -> None:
    folds = cat.fold_set(2, RANKS, divisible)
    expected = cat.ids(folds)
    assert (len(expected) % RANKS == 0) == divisible
    per_rank, lengths = [], []
    for rank in range(RANKS):
        loader = make_loader(
            shards, folds, batch_size, train=True, workers=workers, rank=rank, world_size=RANKS, seed=SEED
        )
        batches = epoch(loader, cat, at=1)
        ids = flat(batches)
        assert len(batches) == len(loader), (
            f"rank {rank}: {len(batches)} batches ({len(ids)} samples) but len(loader) == {len(loader)} "
            f"(N={len(expected)}, {RANKS} ranks, {workers} workers, batch {batch_size})"
        )
        lengths.append(len(loader))
        per_rank.append(ids)
    assert lengths == [math.ceil(math.ceil(len(expected) / RANKS) / batch_size)] * RANKS
    assert_documented_repeats(per_rank, expected)


@pytest.mark.slow
def test_epoch_length_does_not_depend_on_workers(cat: Catalog, shards: Path) -> None:
    folds = cat.fold_set(2, RANKS, divisible=False)
    counts = {}
    for workers in (0, 1, 2):
        loader = make_loader(shards, folds, 16, train=True, workers=workers, rank=1, world_size=RANKS, seed=SEED)
        batches = epoch(loader, cat, at=0)
        counts[workers] = (len(loader), len(batches), len(flat(batches)))
    n = math.ceil(len(cat.ids(folds)) / RANKS)
    assert set(counts.values()) == {(math.ceil(n / 16), math.ceil(n / 16), n)}, counts


# ---------------------------------------------------------------- validation


@pytest.mark.slow
@pytest.mark.parametrize("divisible", [True, False], ids=["N-even", "N-odd"])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_validation_every_sample_exactly_once_and_deterministic(
    cat: Catalog, shards: Path, workers: int, divisible: bool
) -> None:
    folds = cat.fold_set(1, RANKS, divisible)
    expected = cat.ids(folds)
    everything = []
    for rank in range(RANKS):

        def run(at: int, rank: int = rank) -> list[list[str]]:
            loader = make_loader(
                shards, folds, 16, train=False, workers=workers, rank=rank, world_size=RANKS, seed=SEED
            )
            batches = epoch(loader, cat, at=at)
            assert len(batches) == len(loader)
            return batches

        first = run(0)
        assert run(0) == first, "validation order differs between two runs"
        assert run(5) == first, "validation order depends on the epoch"
        everything += flat(first)
    counts = Counter(everything)
    assert set(counts) == set(expected) and set(counts.values()) == {1}, counts.most_common(3)


@pytest.mark.slow
def test_validation_order_is_the_same_whatever_the_epoch_on_one_loader(cat: Catalog, shards: Path) -> None:
    loader = make_loader(shards, [0], 16, train=False, workers=2)
    assert epoch(loader, cat, at=0) == epoch(loader, cat, at=1) == epoch(loader, cat, at=0)


# ---------------------------------------------------------------- shuffling


def _order(shards: Path, cat: Catalog, at: int, seed: int = SEED, workers: int = 0, **kw: Any) -> list[str]:
    loader = make_loader(shards, [1, 2], 16, train=True, workers=workers, seed=seed, **kw)
    return flat(epoch(loader, cat, at=at))


@pytest.mark.slow
def test_training_order_changes_with_the_epoch_and_repeats_for_the_same_epoch_and_seed(
    cat: Catalog, shards: Path
) -> None:
    e0, e1 = _order(shards, cat, 0), _order(shards, cat, 1)
    assert sorted(e0) == sorted(e1) == sorted(cat.ids([1, 2]))
    assert e0 != e1
    assert _order(shards, cat, 1) == e1
    assert _order(shards, cat, 1, seed=SEED + 1) != e1
    assert _order(shards, cat, 1, workers=2) == _order(shards, cat, 1, workers=2)


def test_the_loaders_workers_die_with_the_trainer(shards: Path) -> None:
    from train.data import worker_init

    assert make_loader(shards, [1], 16, train=True, workers=2).worker_init_fn is worker_init  # die_with_parent


@pytest.mark.slow
def test_set_epoch_reaches_the_workers_of_a_reused_loader(cat: Catalog, shards: Path) -> None:
    """The trainer keeps one loader and calls `set_epoch` on its dataset before each epoch."""
    loader = make_loader(shards, [1, 2], 16, train=True, workers=2, seed=SEED)
    a, b, again = (flat(epoch(loader, cat, at=e)) for e in (0, 1, 0))
    assert a != b
    assert a == again
    assert b == _order(shards, cat, 1, workers=2)


def test_shard_shuffle_depends_on_epoch_and_seed_only(shards: Path, cat: Catalog) -> None:
    manifest_order = [e["name"] for e in cat.manifest["shards"] if e["fold"] in (1, 2)]

    def names(train: bool, at: int, seed: int = SEED) -> list[str]:
        stream = make_loader(shards, [1, 2], 1000, train=train, workers=0, seed=seed).dataset
        stream.set_epoch(at)
        return [r.name for r in stream.epoch_ranges()]  # one rank, one worker: the shard order of the epoch

    orders = [names(True, at) for at in range(4)]
    assert all(sorted(o) == sorted(manifest_order) for o in orders)
    assert len({tuple(o) for o in orders}) > 1, "the shard order does not change with the epoch"
    assert names(True, 2) == orders[2]
    assert names(True, 2, seed=SEED + 1) != orders[2] or names(True, 3, seed=SEED + 1) != orders[3]
    assert all(names(False, at) == manifest_order for at in range(3)), "validation must not shuffle shards"


def test_sample_shuffle_mixes_shards(cat: Catalog, shards: Path) -> None:
    """Without bucketing the batch order is the sample-shuffle order: batches mix shards, stored order is gone."""
    order = _order(shards, cat, 0, bucket=False)
    first_batch = order[:16]
    assert len({cat.info[k].shard for k in first_batch}) > 1, "the first batch comes from one shard"
    stored = sorted(order, key=lambda k: (cat.info[k].shard, cat.info[k].index))
    in_place = sum(a == b for a, b in zip(order, stored, strict=True))
    assert in_place < len(order) // 4


# ---------------------------------------------------------------- fewer shards than workers x ranks


@pytest.mark.slow
@pytest.mark.parametrize("divisible", [True, False], ids=["N-even", "N-odd"])
def test_fewer_shards_than_workers_times_ranks(few_cat: Catalog, few_shards: Path, divisible: bool) -> None:
    folds = few_cat.fold_set(1, RANKS, divisible)
    assert len(fold_shards(few_cat.manifest, folds)) == 1 < 2 * RANKS
    expected = few_cat.ids(folds)
    train, val = [], []
    for rank in range(RANKS):
        common = dict(workers=2, rank=rank, world_size=RANKS, seed=SEED)
        loader = make_loader(few_shards, folds, 8, train=True, **common)
        batches = epoch(loader, few_cat, at=0)
        assert len(batches) == len(loader) == math.ceil(math.ceil(len(expected) / RANKS) / 8)
        train.append(flat(batches))
        val_loader = make_loader(few_shards, folds, 8, train=False, **common)
        val_batches = epoch(val_loader, few_cat)
        assert len(val_batches) == len(val_loader)
        val += flat(val_batches)
    assert_documented_repeats(train, expected)
    assert sorted(val) == sorted(expected)


# ---------------------------------------------------------------- folds


def test_fold_selection(cat: Catalog, shards: Path) -> None:
    from train.config import TrainConfig

    assert TrainConfig().val_folds == [0], "validation defaults to fold 0"
    assert train_val_folds(cat.manifest, [0]) == ([1, 2], [0])
    assert train_val_folds(cat.manifest, [2, 1]) == ([0], [1, 2])
    train_folds, val_folds = train_val_folds(cat.manifest, [1])
    train_ids = flat(epoch(make_loader(shards, train_folds, 32, train=True, workers=0), cat, at=0))
    val_ids = flat(epoch(make_loader(shards, val_folds, 32, train=False, workers=0), cat))
    assert sorted(train_ids) == sorted(cat.ids(train_folds))
    assert sorted(val_ids) == sorted(cat.ids(val_folds))
    assert not set(train_ids) & set(val_ids)
    assert {cat.info[k].fold for k in train_ids} == set(train_folds)
    with pytest.raises(ValueError, match="not in the manifest"):
        make_loader(shards, [7], 32, train=True, workers=0)


# ---------------------------------------------------------------- refused member types, no pickle


def _rewrite_shard(shard_dir: Path, name: str, members: list[tuple[str, bytes]]) -> None:
    """Replace a shard's members, and keep the manifest's size and checksum of it consistent."""
    path = shard_dir / name
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry["bytes"], entry["sha256"] = path.stat().st_size, file_sha256(path)
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))


def epoch_errors(loader: torch.utils.data.DataLoader) -> list[ShardError]:
    """The errors met while reading one whole epoch, as `checked` raises them (one per failed worker)."""
    errors = []
    for item in loader:  # a worker whose shard fails yields a DataError and stops; the others go on
        try:
            list(checked([item]))
        except ShardError as exc:
            errors.append(exc)
    return errors


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("ext,where", [("pyd", "middle"), ("pth", "end")])
def test_shard_with_a_refused_member_is_an_error_naming_shard_and_member(
    tmp_path: Path, shards: Path, ext: str, where: str, workers: int
) -> None:
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    entry = next(e for e in read_manifest(bad)["shards"] if e["fold"] == 0)
    members = _members(bad / entry["name"])
    keys = [str(k) for k in entry["sequence_ids"]]
    if where == "middle":  # a member of the third sample, between its .json and the next sample
        member = f"{keys[2]}.{ext}"
        at = max(i for i, (m, _) in enumerate(members) if m.startswith(keys[2] + ".")) + 1
    else:  # a sample of its own after the last one
        member, at = f"evil.{ext}", len(members)
    members.insert(at, (member, pickle.dumps({"harmless": True})))
    _rewrite_shard(bad, entry["name"], members)

    errors = epoch_errors(make_loader(bad, [0], 8, train=False, workers=workers))
    assert errors and all(isinstance(e, ShardError) for e in errors), errors
    assert any(entry["name"] in str(e) and re.search(re.escape(member), str(e)) for e in errors), errors


def test_pickled_npy_is_refused(tmp_path: Path, shards: Path) -> None:
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    entry = next(e for e in read_manifest(bad)["shards"] if e["fold"] == 0)
    members = _members(bad / entry["name"])
    key = str(entry["sequence_ids"][1])
    buf = io.BytesIO()
    np.save(buf, np.array([{"not": "an array"}], dtype=object), allow_pickle=True)
    members = [(m, buf.getvalue() if m == f"{key}.x.npy" else data) for m, data in members]
    _rewrite_shard(bad, entry["name"], members)
    errors = epoch_errors(make_loader(bad, [0], 8, train=False, workers=0))
    assert len(errors) == 1 and isinstance(errors[0], ShardError), errors
    assert entry["name"] in str(errors[0]) and key in str(errors[0])


# ---------------------------------------------------------------- bucketing and collation


def _assert_batch_layout(batch: Batch, cat: Catalog) -> tuple[list[str], int]:
    """Shapes, dtypes, prefix mask; the lengths are the stored ones. Returns the ids and the real frames."""
    ids = cat.identify(batch)
    bsz, t = batch.x.shape[:2]
    assert batch.x.shape == (bsz, t, N_POINTS, 6) and batch.x.dtype == torch.float32
    assert batch.mask.shape == (bsz, t) and batch.mask.dtype == torch.bool
    assert batch.missing.shape == (bsz, t, N_POINTS) and batch.missing.dtype == torch.bool
    assert batch.labels.tolist() == [cat.info[k].label for k in ids]
    lengths = batch.lengths
    assert lengths.tolist() == [cat.info[k].length for k in ids]
    assert torch.equal(batch.mask, torch.arange(t)[None, :] < lengths[:, None]), "mask is not a prefix"
    assert t <= MAX_LEN
    return ids, int(lengths.sum())


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_bucketing_trims_each_batch_to_its_longest_sequence(cat: Catalog, shards: Path, train: bool) -> None:
    loader = make_loader(shards, [1, 2], 16, train=train, workers=0, seed=SEED)
    seen, processed, real = [], 0, 0
    for batch in epoch_batches(loader):
        ids, n_real = _assert_batch_layout(batch, cat)
        assert batch.x.shape[1] == int(batch.lengths.max()), "batch not trimmed to its longest sequence"
        seen += ids
        processed += batch.mask.numel()
        real += n_real
    assert sorted(seen) == sorted(cat.ids([1, 2]))
    # similar lengths go together: far fewer frames than fixed padding, close to the real ones
    assert processed / real < 1.5 < MAX_LEN * len(seen) / real


def test_bucketing_off_pads_to_384(cat: Catalog, shards: Path) -> None:
    loader = make_loader(shards, [0], 16, train=True, workers=0, bucket=False, seed=SEED)
    seen = []
    for batch in epoch_batches(loader):
        ids, _ = _assert_batch_layout(batch, cat)
        assert batch.x.shape[1] == MAX_LEN
        seen += ids
    assert sorted(seen) == sorted(cat.ids([0]))


def epoch_batches(loader: torch.utils.data.DataLoader, at: int = 0) -> list[Batch]:
    """The epoch's batches as the trainer sees them: moved to the device (here the CPU), x as float32."""
    loader.dataset.set_epoch(at)
    return [batch.to("cpu") for batch in loader]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_batches_travel_in_the_shards_dtype_and_arrive_as_float32(shard_base: Path, data_dir: Path, dtype: str) -> None:
    shard_dir = demo_shards(shard_base, data_dir, shard_size=25, folds=3, dtype=dtype)
    raw = next(iter(make_loader(shard_dir, [0], 8, train=False, workers=0)))
    assert raw.x.dtype == getattr(torch, dtype)  # half the bytes through worker IPC and host-to-device copies
    moved = raw.to("cpu")
    assert moved.x.dtype == torch.float32 and torch.equal(moved.x, raw.x.float())


@pytest.mark.parametrize("bucket", [True, False], ids=["bucketed", "fixed-384"])
@pytest.mark.parametrize("layout,dtype", [("compact", "float16"), ("compact", "float32"), ("padded", "float16")])
def test_collated_x_is_the_pipelines_padded_features_bit_for_bit(
    shard_base: Path, data_dir: Path, layout: str, dtype: str, bucket: bool
) -> None:
    shard_dir = demo_shards(shard_base, data_dir, shard_size=25, folds=3, dtype=dtype, layout=layout)
    fold = 0
    manifest = read_manifest(shard_dir)
    reference = {
        s.meta["sequence_id"]: s
        for e in manifest["shards"]
        if e["fold"] == fold
        for s in iter_samples(shard_dir / e["name"])
    }
    by_digest = {digest(s.features[: int(s.mask.sum())]): k for k, s in reference.items()}
    loader = make_loader(shard_dir, [fold], 16, train=True, workers=0, bucket=bucket, seed=SEED)
    seen = []
    for batch in epoch_batches(loader):
        t = batch.x.shape[1]
        for i in range(len(batch)):
            n = int(batch.mask[i].sum())
            key = by_digest.get(digest(batch.x[i, :n].numpy()))
            if key is None:  # say how far the closest stored sample of that length is
                near = [s for s in reference.values() if int(s.mask.sum()) == n]
                err = min((float(np.abs(s.features[:n] - batch.x[i, :n].numpy()).max()) for s in near), default=None)
                pytest.fail(f"row {i} ({n} frames) is no stored sample bit for bit (closest max |diff| {err})")
            s = reference[key]
            x = batch.x[i].numpy()
            assert np.array_equal(x.view(np.uint32), s.features[:t].view(np.uint32)), f"{key}: x differs"
            assert np.array_equal(batch.missing[i].numpy(), s.missing[:t]), f"{key}: missing differs"
            assert np.array_equal(batch.mask[i].numpy(), s.mask[:t]), f"{key}: mask differs"
            assert int(batch.labels[i]) == s.label
            seen.append(key)
    assert sorted(seen) == sorted(reference)


# ---------------------------------------------------------------- CUDA: pinned memory, non-blocking copies


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_batches_and_non_blocking_copy(shards: Path) -> None:
    loader = make_loader(shards, [0], 16, train=True, workers=1, pin_memory=True)
    batch = next(iter(loader))
    for name in ("x", "mask", "missing", "labels"):
        assert getattr(batch, name).is_pinned(), f"{name} is not pinned"
    gpu = batch.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert gpu.x.is_cuda and torch.equal(gpu.x.cpu(), batch.x) and torch.equal(gpu.mask.cpu(), batch.mask)
