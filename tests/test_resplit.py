"""Resuming an epoch under another world size (`train.resplit`): simulated runs cut at random steps, by sample id."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from demo_data import demo_dataset, demo_shards

from pipeline.shards import read_manifest
from train.data import Range, rank_counts, slot_ranges, worker_counts
from train.resplit import pack_trained, rest_of_epoch, rest_steps, shard_offsets, share_ids, unpack_trained


def manifest_shards(rng: random.Random) -> list[dict]:
    return [
        {"name": f"fold{rng.randrange(3)}-{i:06d}.tar", "samples": rng.randint(1, 30)} for i in range(rng.randint(1, 8))
    ]


def ids_of(ranges: list[Range], offsets: dict[str, int]) -> list[int]:
    return [offsets[r.name] + i for r in ranges for i in range(r.start, r.stop)]


def normal_slots(order: list[dict], ranks: int, workers: int, batch: int, offsets: dict[str, int]) -> list[list[list]]:
    """Each rank's and worker's sample ids in a normal epoch, by train.data's own functions (as epoch_ranges)."""
    total = sum(s["samples"] for s in order)
    counts = rank_counts(total, ranks, pad=True)
    out = []
    for r in range(ranks):
        start, row = sum(counts[:r]), []
        for n in worker_counts(counts[r], workers, batch):
            row.append(ids_of(slot_ranges(order, start, start + n), offsets))
            start += n
        out.append(row)
    return out


def trained_batches(slots: list[list[list]], batch: int, steps: int, rng: random.Random) -> list[list[list]]:
    """Per rank, the first `steps` batches the DataLoader yields: each worker's samples reordered (the shuffle
    buffer and bucketing), cut into batches, taken from the workers in turn (an exhausted worker is passed)."""
    out = []
    for row in slots:
        queues = []
        for ids in row:
            ids = list(ids)
            rng.shuffle(ids)
            queues.append([ids[i : i + batch] for i in range(0, len(ids), batch)])
        yielded = []
        while any(queues) and len(yielded) < steps:
            for q in queues:
                if q and len(yielded) < steps:
                    yielded.append(q.pop(0))
        out.append(yielded)
    return out


def check_rest(shards, order, trained, ranks, workers, batch) -> list[list[list]]:  # noqa: ANN001
    """The rest's shares, checked: untrained ids exactly once, fill already trained and at most ranks - 1,
    equal batch counts per rank, whole batches per worker; returns each share's ids (untrained then fill)."""
    offsets = shard_offsets(shards)
    epoch_ids = [i for s in order for i in range(offsets[s["name"]], offsets[s["name"]] + s["samples"])]
    shares = rest_of_epoch(shards, [s["name"] for s in order], trained, ranks, workers, batch)
    assert len(shares) == ranks and all(len(row) == workers for row in shares)
    rest = [i for i in epoch_ids if not trained[i]]
    real, fill, slots = [], [], []
    for row in shares:
        count = sum(share.samples() for share in row)
        assert count == rank_counts(len(rest), ranks, pad=True)[0] if rest else count == 0
        assert [share.samples() for share in row] == worker_counts(count, workers, batch)
        assert -(-count // batch) == rest_steps(len(rest), ranks, batch)
        slot_row = []
        for share in row:
            mine, pad = share_ids(share, offsets)
            position = [epoch_ids.index(i) for i in mine]
            assert position == sorted(position)  # the epoch's order kept
            real += mine.tolist()
            fill += pad.tolist()
            slot_row.append(mine.tolist() + pad.tolist())
        slots.append(slot_row)
    assert sorted(real) == sorted(rest)  # every untrained sample once, none twice
    assert len(fill) == (ranks * -(-len(rest) // ranks) - len(rest) if rest else 0) and len(fill) < ranks
    if trained.any():
        assert all(trained[i] for i in fill)  # padding repeats trained samples, never one still to come
    return slots


@pytest.mark.parametrize("case", range(300))
def test_the_rest_of_an_epoch_is_trained_exactly_once_under_any_world_size(case: int) -> None:
    rng = random.Random(case)
    shards = manifest_shards(rng)
    order = shards[:]
    rng.shuffle(order)
    offsets = shard_offsets(shards)
    total = sum(s["samples"] for s in shards)
    batch, ranks, workers = rng.randint(1, 8), rng.randint(1, 4), rng.randint(1, 3)
    slots = normal_slots(order, ranks, workers, batch, offsets)
    steps = -(-rank_counts(total, ranks, pad=True)[0] // batch)
    padding = ranks * -(-total // ranks) - total  # the normal epoch's repeats
    trained = np.zeros(total, dtype=bool)
    trained_count = np.zeros(total, dtype=int)  # what the interrupted runs trained, by id
    for _ in range(rng.randint(1, 3)):  # interrupted, resumed with another split, maybe interrupted again
        cut = rng.randrange(steps + 1)
        for rank in trained_batches(slots, batch, cut, rng):
            for b in rank:
                trained[b] = True
                np.add.at(trained_count, b, 1)
        trained = unpack_trained(pack_trained(trained), total)  # through the checkpoint's form
        ranks, workers = rng.randint(1, 4), rng.randint(1, 3)
        slots = check_rest(shards, order, trained, ranks, workers, batch)
        rest = int((~trained).sum())
        steps = rest_steps(rest, ranks, batch)
        padding += ranks * -(-rest // ranks) - rest if rest else 0
    for rank in trained_batches(slots, batch, steps, rng):  # the last split runs to the end of the epoch
        for b in rank:
            np.add.at(trained_count, b, 1)
    assert trained_count.min() >= 1  # every sample of the epoch trained
    # repeats: padding only (at most ranks - 1 per split, as in a normal epoch); check_rest saw each
    # untrained sample go to exactly one share
    assert trained_count.sum() - total <= padding


def test_with_nothing_trained_the_split_is_the_normal_epochs() -> None:
    rng = random.Random(7)
    for _ in range(100):
        shards = manifest_shards(rng)
        order = shards[:]
        rng.shuffle(order)
        offsets = shard_offsets(shards)
        ranks, workers, batch = rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 8)
        total = sum(s["samples"] for s in shards)
        shares = rest_of_epoch(shards, [s["name"] for s in order], np.zeros(total, bool), ranks, workers, batch)
        got = [[sorted(np.concatenate(share_ids(s, offsets)).tolist()) for s in row] for row in shares]
        assert got == [[sorted(ids) for ids in row] for row in normal_slots(order, ranks, workers, batch, offsets)]


def test_ranges_are_runs_of_one_shard() -> None:
    shards = [{"name": "fold0-000000.tar", "samples": 4}, {"name": "fold0-000001.tar", "samples": 3}]
    trained = np.array([0, 1, 0, 0, 0, 0, 1], dtype=bool)
    [[share]] = rest_of_epoch(shards, ["fold0-000001.tar", "fold0-000000.tar"], trained, 1, 1, 2)
    assert share.ranges == [
        Range("fold0-000001.tar", 0, 2),
        Range("fold0-000000.tar", 0, 1),
        Range("fold0-000000.tar", 2, 4),
    ]
    assert share.fill == []
    [[a], [b]] = rest_of_epoch(shards, ["fold0-000000.tar", "fold0-000001.tar"], trained, 2, 1, 2)
    assert (a.ranges, a.fill) == ([Range("fold0-000000.tar", 0, 1), Range("fold0-000000.tar", 2, 4)], [])
    assert (b.ranges, b.fill) == ([Range("fold0-000001.tar", 0, 2)], [Range("fold0-000000.tar", 1, 2)])


def test_a_record_of_another_size_is_refused() -> None:
    packed = pack_trained(np.ones(20, dtype=bool))
    assert unpack_trained(packed, 20).tolist() == [True] * 20
    with pytest.raises(ValueError, match="covers 24 ids, not 30"):
        unpack_trained(packed, 30)


# ---------------------------------------------------------------- whole runs: torchrun 2 -> 1 and 1 -> 2

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("resume")
    return demo_shards(base, demo_dataset(base, sequences=300, signs=5, participants=6), shard_size=40, folds=3)


def _run(world: int, record: Path, cfg: dict, resume: Path | None = None) -> None:
    """resume_check.py with `world` processes (torchrun, gloo on CPU, for more than one)."""
    script = [str(TESTS / "resume_check.py"), str(record), json.dumps(cfg), *([str(resume)] if resume else [])]
    if world > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        script = ["-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={port}", *script]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    proc = subprocess.run([sys.executable, *script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _steps(record: Path) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted(record.parent.glob(record.name + ".rank*.jsonl"))
        for line in p.read_text().splitlines()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_an_epoch_cut_under_one_world_size_is_finished_under_another(
    small_shards: Path, tmp_path: Path, before: int, after: int
) -> None:
    """Cut by --max-steps mid-epoch, resumed with another process count (and worker count): every training sample
    of that epoch is trained once in all (repeats only as the padding of an uneven split), and the next epoch is a
    whole epoch of the new split."""
    manifest = read_manifest(small_shards)
    n = sum(f["samples"] for f in manifest["folds"] if f["fold"] != 0)
    batch, cut = 16, 3
    cfg = {
        "shards": str(small_shards),
        "out": str(tmp_path / "run"),
        "preset": "tiny",
        "epochs": 2,
        "batch_size": batch,
        "device": "cpu",
        "seed": 3,
        "max_steps": cut,
        "workers": before - 1,
    }
    _run(before, tmp_path / "first", cfg)
    first = _steps(tmp_path / "first")
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (ckpt["world"], ckpt["workers"], ckpt["batch_in_epoch"], ckpt["step"]) == (before, before - 1, cut, cut)
    assert len(first) == cut * before and all(s["epoch"] == 0 for s in first)
    trained = np.concatenate([s["ids"] for s in first])
    assert unpack_trained(ckpt["epoch_trained"].numpy(), n).nonzero()[0].tolist() == sorted(set(trained.tolist()))

    _run(after, tmp_path / "second", {**cfg, "max_steps": 10**6, "workers": after}, resume=tmp_path / "run")
    second = _steps(tmp_path / "second")
    rest = np.concatenate([s["ids"] for s in second if s["epoch"] == 0])
    counts = np.bincount(np.concatenate([trained, rest]), minlength=n)
    assert len(counts) == n and counts.min() == 1, "a sample of the cut epoch was never trained"
    assert counts.sum() - n <= (before - 1) + (after - 1), "samples of the cut epoch trained twice beyond padding"
    spe = rest_steps(n, after, batch)
    per_rank = Counter(s["step"] for s in second if s["epoch"] == 0)
    assert sorted(per_rank) == list(range(spe - len(per_rank) + 1, spe + 1))  # the steps of that epoch's end
    assert all(v == after for v in per_rank.values())  # every rank the same batches
    nxt = np.bincount(np.concatenate([s["ids"] for s in second if s["epoch"] == 1]), minlength=n)
    assert nxt.min() == 1 and nxt.sum() - n <= after - 1  # the next epoch: whole, in the new split
    assert {s["step"] for s in second if s["epoch"] == 1} == set(range(spe + 1, 2 * spe + 1))
