"""build-shards end to end: round trip, folds, manifest, rejects, resume after a kill, determinism, verify, stats."""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from decoded import file_sha256, iter_samples
from demo_data import demo_dataset, demo_shards

from pipeline import build as build_mod
from pipeline import cli as cli_mod
from pipeline import shards as shards_mod
from pipeline.build import BuildError, BuildOptions, BuildResult, assign_folds, build_shards
from pipeline.cli import main
from pipeline.demo import sequence_table
from pipeline.features import FEATURES_VERSION, MAX_LEN, compact_features, preprocess
from pipeline.landmarks import N_RAW, POINT_LANDMARKS, TYPE_OFFSETS
from pipeline.read import read_landmarks
from pipeline.shards import iter_members, verify_shards
from pipeline.tario import load_npy

GOOD_REAL = "train_landmark_files/22343/239181.parquet"  # 30 frames, sign "hello"

KILL_OPTS = BuildOptions(shard_size=10, folds=3)  # the cached shards that the kill and --jobs tests compare with


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="session")
def demo_dir(base: Path) -> Path:
    """300 demo sequences, 6 participants, 5 signs (two of them longer than 384 frames)."""
    return demo_dataset(base, sequences=300, signs=5, participants=6)


@pytest.fixture(scope="session")
def compact_shards(base: Path, demo_dir: Path) -> Path:
    """float16 compact shards of demo_dir, 10 a shard, 3 folds, built with jobs=1 (read-only)."""
    return demo_shards(base, demo_dir, shard_size=KILL_OPTS.shard_size, folds=KILL_OPTS.folds)


@pytest.fixture(scope="session")
def tiny_dir(base: Path) -> Path:
    return demo_dataset(base, sequences=40, signs=4, participants=4, seed=1)


@pytest.fixture(scope="session")
def padded_shards(base: Path, tiny_dir: Path) -> Path:
    return demo_shards(base, tiny_dir, shard_size=16, folds=2, dtype="float32", layout="padded")


def csv_rows(data_dir: Path) -> list[dict[str, str]]:
    with open(data_dir / "train.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_csv(data_dir: Path, rows: list[dict[str, str]], columns=("path", "participant_id", "sequence_id", "sign")):
    with open(data_dir / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """name -> (size, mtime_ns, sha256) of every file in a directory."""
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def tar_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def without_created(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


def expected_sample(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Direct preprocessing of one parquet file: features, mask, missing (384, 118), raw frames."""
    xyz = read_landmarks(path)
    features, mask = preprocess(xyz)
    frames = len(xyz)
    length = min(frames, MAX_LEN)
    missing = np.isnan(xyz[:length, list(POINT_LANDMARKS), :2]).any(axis=-1)
    missing = missing[np.minimum(np.arange(MAX_LEN), length - 1)]  # padding repeats the last real frame
    return features, mask, missing, frames


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def negate_x(path: Path) -> None:
    """Rewrite a landmark file with x negated: the same layout, other content (the features' x changes sign)."""
    table = pq.read_table(path)
    path.unlink()  # never write through a hard link into a cached dataset
    pq.write_table(table.set_column(table.schema.get_field_index("x"), "x", pc.negate(table.column("x"))), path)


def entry_of(manifest: dict, sequence_id: str) -> dict:
    """The manifest entry of the shard holding `sequence_id`."""
    return next(e for e in manifest["shards"] if sequence_id in e["sequence_ids"])


def check_round_trip(data_dir: Path, shard_dir: Path, dtype: str, layout: str) -> None:
    """Every sample of every shard against direct preprocessing of its parquet file."""
    rows = {r["sequence_id"]: r for r in csv_rows(data_dir)}
    label_map = json.loads((data_dir / "sign_to_prediction_index_map.json").read_text())
    seen: list[str] = []
    for tar in sorted(shard_dir.glob("*.tar")):
        fold = int(tar.name.split("-")[0].removeprefix("fold"))
        raw = dict(iter_members(tar))
        for sample in iter_samples(tar):
            key = sample.meta["sequence_id"]
            row = rows[key]
            want, want_mask, want_missing, frames = expected_sample(data_dir / row["path"])
            length = min(frames, MAX_LEN)
            assert sample.features.dtype == np.float32 and sample.features.shape == (MAX_LEN, 118, 6)
            if dtype == "float32":
                assert sample.features.tobytes() == want.tobytes(), key  # bit-exact
            else:
                assert sample.features.tobytes() == want.astype(np.float16).astype(np.float32).tobytes(), key
            assert np.array_equal(sample.mask, want_mask) and sample.mask.sum() == length
            assert np.array_equal(sample.missing, want_missing), key
            assert sample.label == label_map[row["sign"]]
            assert sample.meta == {
                "sequence_id": key,
                "participant_id": row["participant_id"],
                "sign": row["sign"],
                "label": label_map[row["sign"]],
                "frames": frames,
                "length": length,
                "fold": fold,
            }
            # what is stored on disk: the layout and dtype asked for
            x = load_npy(raw[key]["x.npy"])
            assert x.dtype == np.dtype(dtype)
            if layout == "compact":
                assert x.shape == (length, 118, 6) and "mask.npy" not in raw[key]
                assert load_npy(raw[key]["missing.npy"]).shape == (length, 15)
            else:
                assert x.shape == (MAX_LEN, 118, 6)
                assert np.array_equal(load_npy(raw[key]["mask.npy"]), want_mask.astype(np.uint8))
                assert load_npy(raw[key]["missing.npy"]).shape == (MAX_LEN, 15)
            assert set(raw[key]) <= {"x.npy", "missing.npy", "mask.npy", "cls", "json"}
            seen.append(key)
    assert sorted(seen) == sorted(rows), "every sequence exactly once"


# ---------------------------------------------------------------- round trip


def test_round_trip_compact_float16(demo_dir: Path, compact_shards: Path):
    check_round_trip(demo_dir, compact_shards, "float16", "compact")
    # the demo set exercises truncation to 384 frames
    assert manifest_of(compact_shards)["lengths"]["truncated"] >= 1


def test_round_trip_padded_float32(tiny_dir: Path, padded_shards: Path):
    check_round_trip(tiny_dir, padded_shards, "float32", "padded")


def test_manifest_matches_files_and_inputs(demo_dir: Path, compact_shards: Path):
    manifest = manifest_of(compact_shards)
    rows = csv_rows(demo_dir)
    label_map = json.loads((demo_dir / "sign_to_prediction_index_map.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["label_map"] == label_map == manifest["config"]["label_map"]
    config = manifest["config"]
    assert (config["dtype"], config["layout"], config["shard_size"], config["folds"]) == ("float16", "compact", 10, 3)
    assert (config["features_version"], config["reference_fallback"], config["reference_landmark"]) == (1, 0.5, 17)
    assert FEATURES_VERSION == 1
    assert config["normalization"] == (
        "(xy - origin) / scale; origin = nanmean of raw 17 over frames (0.5 if all NaN); "
        "scale = nanstd per axis over frames and points (correction=1; 1 where 0 or undefined)"
    )

    tars = sorted(p.name for p in compact_shards.glob("*.tar"))
    assert [s["name"] for s in manifest["shards"]] == tars
    frames_of = {}
    for r in rows:
        frames_of[r["sequence_id"]] = pq.ParquetFile(demo_dir / r["path"]).metadata.num_rows // 543
    for entry in manifest["shards"]:
        path = compact_shards / entry["name"]
        data = path.read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)
        assert entry["fold"] == int(entry["name"][4 : entry["name"].index("-")])
        keys = [k for k, _ in iter_members(path)]
        assert entry["sequence_ids"] == keys and entry["samples"] == len(keys)
        metas = [json.loads(m["json"]) for _, m in iter_members(path)]
        assert entry["labels"] == [m["label"] for m in metas]
        assert entry["lengths"] == [min(frames_of[k], MAX_LEN) for k in keys]
        assert len(keys) <= 10
    totals = manifest["totals"]
    assert totals["samples"] == len(rows) == 300
    assert totals["shards"] == len(tars)
    assert totals["bytes"] == sum((compact_shards / t).stat().st_size for t in tars)
    assert totals["rejected"] == 0 and manifest["rejects"] == []
    assert (compact_shards / "rejects.jsonl").read_text() == ""
    frames = np.array(sorted(frames_of.values()))
    stats = manifest["lengths"]
    assert stats["count"] == 300 and stats["min"] == frames.min() and stats["max"] == frames.max()
    assert stats["truncated"] == int((frames > MAX_LEN).sum())
    assert totals["real_frames"] == int(np.minimum(frames, MAX_LEN).sum())


# ---------------------------------------------------------------- folds


def test_folds_group_participants_and_shards_hold_one_fold(demo_dir: Path, compact_shards: Path):
    manifest = manifest_of(compact_shards)
    rows = {r["sequence_id"]: r for r in csv_rows(demo_dir)}
    fold_of_participant = {}
    for fold in manifest["folds"]:
        for p in fold["participants"]:
            assert p not in fold_of_participant, f"participant {p} in two folds"
            fold_of_participant[p] = fold["fold"]
    assert set(fold_of_participant) == {r["participant_id"] for r in rows.values()}
    per_fold = {f: 0 for f in range(3)}
    for entry in manifest["shards"]:
        assert entry["name"].startswith(f"fold{entry['fold']}-")
        for key in entry["sequence_ids"]:
            assert fold_of_participant[rows[key]["participant_id"]] == entry["fold"]
            per_fold[entry["fold"]] += 1
    assert [f["samples"] for f in manifest["folds"]] == [per_fold[f] for f in range(3)]
    # greedy largest-first: the spread between folds is at most the largest participant
    counts: dict[str, int] = {}
    for r in rows.values():
        counts[r["participant_id"]] = counts.get(r["participant_id"], 0) + 1
    assert max(per_fold.values()) - min(per_fold.values()) <= max(counts.values())
    assert fold_of_participant == reference_folds(counts, 3)
    # shard names: fold{f}-{i:06d}.tar numbered from 0 within each fold
    for f in range(3):
        names = sorted(e["name"] for e in manifest["shards"] if e["fold"] == f)
        assert names == [f"fold{f}-{i:06d}.tar" for i in range(len(names))]


def reference_folds(counts: dict[str, int], folds: int) -> dict[str, int]:
    """Independent greedy: largest participant first (ties by id) into the lightest fold (ties by index)."""
    heap = [(0, f) for f in range(folds)]
    out = {}
    for participant, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        total, f = heapq.heappop(heap)
        out[participant] = f
        heapq.heappush(heap, (total + n, f))
    return out


def test_assign_folds_made_up_counts():
    assert assign_folds({"a": 10, "b": 9, "c": 8, "d": 1, "e": 1}, 2) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}
    # ties broken by participant id, whatever the insertion order
    assert assign_folds({"p3": 5, "p1": 5, "p2": 5}, 3) == {"p1": 0, "p2": 1, "p3": 2}
    assert assign_folds({"p2": 5, "p3": 5, "p1": 5}, 3) == {"p1": 0, "p2": 1, "p3": 2}
    # more folds than participants: the extra folds stay empty
    assert assign_folds({"x": 3, "y": 7}, 4) == {"y": 0, "x": 1}
    assert assign_folds({}, 3) == {}


@pytest.mark.parametrize("seed", range(5))
def test_assign_folds_random_counts(seed: int):
    rng = random.Random(seed)
    counts = {str(rng.randrange(10000, 65536)): rng.randrange(1, 5000) for _ in range(21)}
    folds = 5
    got = assign_folds(counts, folds)
    assert got == reference_folds(counts, folds)
    shuffled = dict(rng.sample(sorted(counts.items()), len(counts)))
    assert assign_folds(shuffled, folds) == got
    totals = [sum(n for p, n in counts.items() if got[p] == f) for f in range(folds)]
    assert max(totals) - min(totals) <= max(counts.values())


def test_label_map_from_file_not_row_order(tmp_path: Path, tiny_dir: Path):
    """Labels come from sign_to_prediction_index_map.json, even when it is not the sorted order."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data, copy_function=os.link)
    (data / "sign_to_prediction_index_map.json").unlink()  # a hard link to the cached file: replace, never edit
    signs = sorted({r["sign"] for r in csv_rows(tiny_dir)})
    label_map = {s: 1 + i for i, s in enumerate(reversed(signs))}  # reversed: not the sorted order
    label_map["never_used"] = 0
    (data / "sign_to_prediction_index_map.json").write_text(json.dumps(label_map))
    result = build_shards(data, tmp_path / "out", BuildOptions(shard_size=50, folds=2), jobs=1)
    assert result.manifest["label_map"] == label_map
    rows = {r["sequence_id"]: r for r in csv_rows(data)}
    n = 0
    for tar in (tmp_path / "out").glob("*.tar"):
        for sample in iter_samples(tar):
            assert sample.label == label_map[rows[sample.meta["sequence_id"]]["sign"]]
            n += 1
    assert n == len(rows)


def _bad_label_maps(signs: list[str]) -> dict[str, tuple[str, str]]:
    """Case -> (label map file text, the problem BuildError names)."""
    perm = f"indices must be 0..{len(signs) - 1} without gaps or repeats"
    return {
        "gap": (json.dumps({s: 2 * i for i, s in enumerate(signs)}), perm),
        "repeat": (json.dumps({s: min(i, 1) for i, s in enumerate(signs)}), perm),
        "from-1": (json.dumps({s: i + 1 for i, s in enumerate(signs)}), perm),
        "negative": (json.dumps({s: -i for i, s in enumerate(signs)}), perm),
        "string": (json.dumps({signs[0]: "0"}), f"index of {signs[0]!r} is '0', expected an integer"),
        "float": (json.dumps({signs[0]: 0.0}), f"index of {signs[0]!r} is 0.0, expected an integer"),
        "bool": (json.dumps({signs[0]: False}), f"index of {signs[0]!r} is False, expected an integer"),
        "list": (json.dumps(signs), "expected a non-empty JSON object of sign -> index"),
        "empty": ("{}", "expected a non-empty JSON object of sign -> index"),
    }


@pytest.mark.parametrize("case", ["gap", "repeat", "from-1", "negative", "string", "float", "bool", "list", "empty"])
def test_bad_label_map_fails_before_any_work(tmp_path: Path, tiny_dir: Path, case: str):
    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data, copy_function=os.link)
    label_path = data / "sign_to_prediction_index_map.json"
    label_path.unlink()  # a hard link to the cached file: replace, never edit
    text, problem = _bad_label_maps(sorted({r["sign"] for r in csv_rows(tiny_dir)}))[case]
    label_path.write_text(text)
    out = tmp_path / "out"
    result = cli("build-shards", "--data-dir", data, "--out", out, "--jobs", "1")
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: {label_path}: {problem}\n"
    assert not out.exists(), "a refused build wrote into --out"
    with pytest.raises(BuildError) as info:
        build_shards(data, out, BuildOptions(), jobs=1)
    assert str(info.value) == f"{label_path}: {problem}"


def test_label_map_not_json_fails(tmp_path: Path, tiny_dir: Path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data, copy_function=os.link)
    (data / "sign_to_prediction_index_map.json").unlink()
    (data / "sign_to_prediction_index_map.json").write_text('{"a": 0,')
    result = cli("build-shards", "--data-dir", data, "--out", tmp_path / "out", "--jobs", "1")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {data / 'sign_to_prediction_index_map.json'}: not valid JSON (")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad inputs


@pytest.fixture
def bad_data(tmp_path: Path, sample_data: Path, bad_dir: Path) -> tuple[Path, dict[str, str], list[str]]:
    """A data dir of the three real sample files plus one row per kind of bad input.

    Returns (data dir, {bad path: expected reason phrase}, good sequence ids).
    """
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    good_rows = csv_rows(sample_data)
    good_file = sample_data / GOOD_REAL
    good_bytes = good_file.read_bytes()
    table = pq.read_table(good_file)
    bad_files = data / "train_landmark_files" / "11111"
    bad_files.mkdir()

    def rel(name: str) -> str:
        return f"train_landmark_files/11111/{name}"

    def with_x(value: float) -> pa.Table:
        x = table.column("x").to_numpy().copy()
        x[600] = value
        return table.set_column(table.schema.get_field_index("x"), "x", pa.array(x))

    (bad_files / "corrupt.parquet").write_bytes(np.random.default_rng(0).bytes(20_000))
    (bad_files / "truncated.parquet").write_bytes(good_bytes[: len(good_bytes) // 2])
    shutil.copyfile(bad_dir / "webcam_no_row_id.parquet", bad_files / "no_row_id.parquet")
    shutil.copyfile(bad_dir / "webcam_wrong_types_and_order.parquet", bad_files / "wrong_types.parquet")
    pq.write_table(table.slice(0, 0), bad_files / "zero.parquet")
    pq.write_table(with_x(float("inf")), bad_files / "inf.parquet")
    pq.write_table(with_x(-float("inf")), bad_files / "neginf.parquet")
    pq.write_table(with_x(1e300), bad_files / "overflow.parquet")  # finite float64, beyond float32
    for name in ("unknown_sign.parquet", "duplicate.parquet", "bad_id.parquet"):
        shutil.copyfile(good_file, bad_files / name)
    shutil.copyfile(good_file, tmp_path / "outside.parquet")  # a readable file, but outside the data dir

    expected = {
        rel("missing.parquet"): "file not found",
        rel("corrupt.parquet"): "not a readable parquet file",
        rel("truncated.parquet"): "not a readable parquet file",
        rel("no_row_id.parquet"): "missing column 'row_id'",
        rel("wrong_types.parquet"): "unknown landmark type",
        rel("zero.parquet"): "zero frames",
        rel("inf.parquet"): "infinite coordinate values",
        rel("neginf.parquet"): "infinite coordinate values",
        rel("overflow.parquet"): "infinite coordinate values",
        rel("unknown_sign.parquet"): "unknown sign 'not_a_sign'",
        rel("duplicate.parquet"): "duplicate sequence_id",
        rel("bad_id.parquet"): "is not a non-negative integer",
        "../outside.parquet": "escapes the data directory",
        str(tmp_path / "outside.parquet"): "escapes the data directory",
        "train_landmark_files/../../outside.parquet": "escapes the data directory",
    }
    rows = list(good_rows)
    for i, path in enumerate(expected):
        row = {"path": path, "participant_id": "11111", "sequence_id": str(5000 + i), "sign": "hello"}
        if "unknown_sign" in path:
            row["sign"] = "not_a_sign"
        if "duplicate" in path:
            row["sequence_id"] = good_rows[0]["sequence_id"]
        if "bad_id" in path:
            row["sequence_id"] = "12a"
        rows.insert(1 + i, row)  # interleaved with the good rows
    write_csv(data, rows)
    return data, expected, [r["sequence_id"] for r in good_rows]


def test_bad_inputs_rejected_with_reasons_and_good_files_written(tmp_path: Path, bad_data, sample_data: Path):
    data, expected, good_ids = bad_data
    out = tmp_path / "out"
    result = cli("build-shards", "--data-dir", data, "--out", out, "--jobs", "1", "--shard-size", "2", "--folds", "2")
    assert result.exit_code == 3, result.output
    assert f"rejected {len(expected)}" in result.output
    assert "3 samples" in result.output

    manifest = manifest_of(out)
    rejects = manifest["rejects"]
    lines = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert lines == rejects
    assert manifest["totals"]["rejected"] == len(expected) == len(rejects)
    by_path = {r["path"]: r for r in rejects}
    assert set(by_path) == set(expected)
    for path, phrase in expected.items():
        assert phrase in by_path[path]["reason"], (path, by_path[path])
    assert by_path["train_landmark_files/11111/duplicate.parquet"]["sequence_id"] == good_ids[0]

    # every good file is written, exactly once, and decodes to its direct preprocessing
    assert manifest["totals"]["samples"] == 3
    label_map = json.loads((data / "sign_to_prediction_index_map.json").read_text())
    rows = {r["sequence_id"]: r for r in csv_rows(sample_data)}
    seen = []
    for tar in sorted(out.glob("*.tar")):
        for sample in iter_samples(tar):
            key = sample.meta["sequence_id"]
            want, mask, _, frames = expected_sample(data / rows[key]["path"])
            assert sample.features.tobytes() == want.astype(np.float16).astype(np.float32).tobytes()
            assert np.array_equal(sample.mask, mask)
            assert sample.label == label_map[rows[key]["sign"]]
            assert sample.meta["frames"] == frames
            seen.append(key)
    assert sorted(seen) == sorted(good_ids)
    assert verify_shards(out) == []

    # a rerun reports the same rejects and exit status without doing any work
    again = cli("build-shards", "--data-dir", data, "--out", out, "--jobs", "1", "--shard-size", "2", "--folds", "2")
    assert again.exit_code == 3, again.output
    assert "nothing to do" in again.output
    assert manifest_of(out)["rejects"] == rejects


@pytest.mark.parametrize("column", ["path", "participant_id", "sequence_id", "sign"])
def test_train_csv_missing_column_fails_before_any_work(tmp_path: Path, tiny_dir: Path, column: str):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(tiny_dir / "sign_to_prediction_index_map.json", data / "sign_to_prediction_index_map.json")
    os.symlink(tiny_dir / "train_landmark_files", data / "train_landmark_files")
    columns = [c for c in ("path", "participant_id", "sequence_id", "sign") if c != column]
    write_csv(data, csv_rows(tiny_dir), columns)
    out = tmp_path / "out"
    result = cli("build-shards", "--data-dir", data, "--out", out, "--jobs", "1")
    assert result.exit_code == 1, result.output
    assert "missing column" in result.output and column in result.output
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(BuildError, match=column):
        build_shards(data, out, BuildOptions(), jobs=1)
    assert not out.exists() or not any(out.glob("*.tar"))


def test_train_csv_absent_fails(tmp_path: Path):
    (tmp_path / "data").mkdir()
    result = cli("build-shards", "--data-dir", tmp_path / "data", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "train.csv" in result.output


# ---------------------------------------------------------------- rerun, changed options, resume


def test_idempotent_rerun_does_no_work(tmp_path: Path, demo_dir: Path, compact_shards: Path):
    out = tmp_path / "out"
    shutil.copytree(compact_shards, out)
    before = snapshot(out)
    result = build_shards(demo_dir, out, KILL_OPTS, jobs=1)
    assert result.built == 0 and result.skipped == len(result.manifest["shards"]) > 0
    assert not result.manifest_written
    after = snapshot(out)
    for name, stamp in before.items():
        if name != "plan.json":
            assert after[name] == stamp, f"{name} was rewritten"
    assert without_created(manifest_of(out)) == without_created(manifest_of(compact_shards))

    runner = cli(
        "build-shards", "--data-dir", demo_dir, "--out", out, "--jobs", "1", "--shard-size", "10", "--folds", "3"
    )
    assert runner.exit_code == 0, runner.output
    assert "nothing to do" in runner.output
    assert {n: s for n, s in snapshot(out).items() if n.endswith(".tar")} == {
        n: s for n, s in before.items() if n.endswith(".tar")
    }


def test_touched_input_file_rebuilds_only_its_shard(tmp_path: Path, tiny_dir: Path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data)
    out = tmp_path / "out"
    opts = BuildOptions(shard_size=5, folds=2)
    first = build_shards(data, out, opts, jobs=1)
    assert first.built == len(first.manifest["shards"]) > 2
    target = data / csv_rows(data)[0]["path"]
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second = build_shards(data, out, opts, jobs=1)
    assert (second.built, second.skipped) == (1, first.built - 1)
    # same content: the rebuilt shard has the same bytes, so the manifest stays as it was
    assert without_created(second.manifest) == without_created(first.manifest)
    assert second.manifest == first.manifest and not second.manifest_written


def built_then_changed(tmp_path: Path, tiny_dir: Path) -> tuple[Path, Path, BuildOptions, BuildResult, dict]:
    """A build of a private copy of `tiny_dir`, then the content of its first file changed (x negated)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data, copy_function=os.link)
    out = tmp_path / "out"
    opts = BuildOptions(shard_size=5, folds=2)
    first = build_shards(data, out, opts, jobs=1)
    row = csv_rows(data)[0]
    negate_x(data / row["path"])
    return data, out, opts, first, row


def test_changed_input_file_rebuilds_only_its_shard(tmp_path: Path, tiny_dir: Path):
    data, out, opts, first, row = built_then_changed(tmp_path, tiny_dir)
    second = build_shards(data, out, opts, jobs=1)
    assert (second.built, second.skipped, second.manifest_written) == (1, first.built - 1, True)
    name = entry_of(first.manifest, row["sequence_id"])["name"]
    changed = [a["name"] for a, b in zip(first.manifest["shards"], second.manifest["shards"], strict=True) if a != b]
    assert changed == [name]
    assert entry_of(second.manifest, row["sequence_id"])["sha256"] == file_sha256(out / name)
    assert manifest_of(out) == second.manifest and verify_shards(out) == []
    check_new_content(data, out / name, row["sequence_id"])


def check_new_content(data: Path, shard: Path, sequence_id: str) -> None:
    """The sample in `shard` is the preprocessing of the file as it is now (its x negated)."""
    sample = next(s for s in iter_samples(shard) if s.meta["sequence_id"] == sequence_id)
    path = data / next(r["path"] for r in csv_rows(data) if r["sequence_id"] == sequence_id)
    want, *_ = expected_sample(path)
    assert sample.features.tobytes() == want.astype(np.float16).astype(np.float32).tobytes()
    assert np.abs(want[..., 0]).max() > 0  # so a negated x is really another content


def test_crash_before_the_manifest_then_rerun_writes_it(tmp_path: Path, tiny_dir: Path, monkeypatch):
    """Shards rebuilt by a run that died before its manifest: the next run, with nothing to build, still rewrites it."""
    data, out, opts, first, row = built_then_changed(tmp_path, tiny_dir)

    def crash(*args: object) -> None:
        raise RuntimeError("killed before the manifest")

    with monkeypatch.context() as patch:
        patch.setattr(build_mod, "_manifest", crash)
        with pytest.raises(RuntimeError, match="killed before the manifest"):
            build_shards(data, out, opts, jobs=1)
    name = entry_of(first.manifest, row["sequence_id"])["name"]
    assert manifest_of(out) == first.manifest, "the crash changed the manifest"
    assert verify_shards(out) == [f"{out / name}: sha256 differs from the manifest"]  # its shard was rebuilt

    third = build_shards(data, out, opts, jobs=1)
    assert (third.built, third.skipped, third.manifest_written) == (0, len(first.manifest["shards"]), True)
    assert manifest_of(out) == third.manifest
    assert verify_shards(out) == []
    entry = entry_of(third.manifest, row["sequence_id"])
    assert (entry["bytes"], entry["sha256"]) == ((out / name).stat().st_size, file_sha256(out / name))
    check_new_content(data, out / name, row["sequence_id"])

    # and now there is nothing to do: nothing is written
    before = {n: v for n, v in snapshot(out).items() if n != "plan.json"}
    fourth = build_shards(data, out, opts, jobs=1)
    assert (fourth.built, fourth.manifest_written) == (0, False) and fourth.manifest == third.manifest
    assert {n: v for n, v in snapshot(out).items() if n != "plan.json"} == before


CHANGES = {
    "shard-size": (["--shard-size", "7"], {"shard_size": 7}),
    "dtype": (["--dtype", "float32"], {"dtype": "float32"}),
    "layout": (["--layout", "padded"], {"layout": "padded"}),
    "folds": (["--folds", "3"], {"folds": 3}),
    "limit": (["--limit", "20"], {"limit": 20}),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_changed_options_refused_then_force_rebuilds(tmp_path: Path, tiny_dir: Path, change: str):
    out = tmp_path / "out"
    common = ["build-shards", "--data-dir", tiny_dir, "--out", out, "--jobs", "1"]
    first = cli(*common, "--shard-size", "16", "--folds", "2")
    assert first.exit_code == 0, first.output
    before = snapshot(out)

    flags, fields = CHANGES[change]
    base_flags = {"--shard-size": "16", "--folds": "2"}
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        base_flags[flag] = value
    new_flags = [x for kv in base_flags.items() for x in kv]
    refused = cli(*common, *new_flags)
    assert refused.exit_code == 1, refused.output
    assert "--force" in refused.output and "other options" in refused.output
    assert snapshot(out) == before, "a refused build changed the output directory"
    with pytest.raises(BuildError, match="--force"):
        build_shards(tiny_dir, out, BuildOptions(**{"shard_size": 16, "folds": 2, **fields}), jobs=1)
    assert snapshot(out) == before

    forced = cli(*common, *new_flags, "--force")
    assert forced.exit_code == 0, forced.output
    manifest = manifest_of(out)
    for key, value in {"shard_size": 16, "folds": 2, **fields}.items():
        assert manifest["config"][key] == value
    # exactly what a build into an empty directory gives: nothing of the old build is left
    clean = tmp_path / "clean"
    assert cli(*common[:-4], "--out", clean, "--jobs", "1", *new_flags).exit_code == 0
    assert tar_bytes(out) == tar_bytes(clean)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    assert without_created(manifest) == without_created(manifest_of(clean))


def test_force_removes_only_what_the_build_wrote(tmp_path: Path, tiny_dir: Path):
    """--force clears old shards, sidecars and manifest, never a user's other files in --out."""
    out = tmp_path / "out"
    out.mkdir()
    user_files = {"notes.json": b'{"mine": 1}\n', "results.jsonl": b"{}\n", "README.md": b"# shards\n"}
    for name, data in user_files.items():
        (out / name).write_bytes(data)
    build_shards(tiny_dir, out, BuildOptions(shard_size=16, folds=2), jobs=1)
    build_shards(tiny_dir, out, BuildOptions(shard_size=16, folds=3), jobs=1, force=True)
    assert manifest_of(out)["config"]["folds"] == 3
    for name, data in user_files.items():
        assert (out / name).exists() and (out / name).read_bytes() == data, f"--force deleted the user's {name}"


def test_unknown_directory_with_tars_refused(tmp_path: Path, tiny_dir: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "fold0-000000.tar").write_bytes(b"not ours")
    with pytest.raises(BuildError, match="--force"):
        build_shards(tiny_dir, out, BuildOptions(shard_size=16, folds=2), jobs=1)
    assert (out / "fold0-000000.tar").read_bytes() == b"not ours"


@pytest.mark.slow
def test_killed_build_resumes_to_the_full_set(tmp_path: Path, demo_dir: Path, compact_shards: Path):
    out = tmp_path / "out"
    log = tmp_path / "build.log"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "build-shards",
        "--data-dir",
        str(demo_dir),
        "--out",
        str(out),
        "--jobs",
        "1",
        "--shard-size",
        str(KILL_OPTS.shard_size),
        "--folds",
        str(KILL_OPTS.folds),
    ]
    total = len(manifest_of(compact_shards)["shards"])
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if len(list(out.glob("fold*.json"))) >= 3:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.005)
            else:
                proc.kill()
                proc.wait()
                pytest.fail(
                    f"build exited (rc {proc.returncode}) or stalled before 3 shards were complete; "
                    f"use a larger dataset or smaller --shard-size. Log:\n{log.read_text()}"
                )
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if (out / "manifest.json").exists():
        pytest.fail("the build finished before it was killed: use a larger dataset or smaller --shard-size")
    done = sorted(out.glob("fold*.json"))
    assert 3 <= len(done) < total, "kill did not land part-way"
    kept = {d.name.removesuffix(".json") + ".tar" for d in done}
    partial = {name: stamp for name, stamp in snapshot(out).items() if name in kept}
    assert len(partial) == len(done), "a sidecar without its shard"

    result = build_shards(demo_dir, out, KILL_OPTS, jobs=1)
    assert result.skipped == len(done) and result.built == total - len(done)
    after = snapshot(out)
    for name, stamp in partial.items():  # completed shards are kept as they were, not rebuilt
        assert after[name] == stamp, name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*tmp")), "temporary files left behind"
    assert tar_bytes(out) == tar_bytes(compact_shards)  # identical to an uninterrupted build
    assert without_created(manifest_of(out)) == without_created(manifest_of(compact_shards))
    keys = [k for tar in sorted(out.glob("*.tar")) for k, _ in iter_members(tar)]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(r["sequence_id"] for r in csv_rows(demo_dir))
    assert verify_shards(out) == []
    verified = cli("verify", out)
    assert verified.exit_code == 0 and "OK" in verified.output


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (from /proc)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return children


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux only")
def test_a_killed_build_leaves_no_worker_running(tmp_path: Path, demo_dir: Path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.cli", "build-shards", "--data-dir", str(demo_dir), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--jobs", "2", "--shard-size", "5"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("fold*.json"))) < 2:
            time.sleep(0.01)
        workers = _children(proc.pid)
        assert proc.poll() is None and len(workers) >= 2, "the build ended before its workers were seen"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.05)
    left = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    for pid in left:  # never leave them to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} of the build's {len(workers)} child processes outlived it"


@pytest.mark.slow
def test_jobs_1_and_2_give_identical_bytes(tmp_path: Path, demo_dir: Path, compact_shards: Path):
    out = tmp_path / "out"
    build_shards(demo_dir, out, KILL_OPTS, jobs=2)  # compact_shards was built with jobs=1
    assert tar_bytes(out) == tar_bytes(compact_shards)
    assert len(tar_bytes(out)) == len(manifest_of(out)["shards"]) > 1
    assert without_created(manifest_of(out)) == without_created(manifest_of(compact_shards))
    assert (out / "rejects.jsonl").read_bytes() == (compact_shards / "rejects.jsonl").read_bytes()


# ---------------------------------------------------------------- verify and stats


@pytest.fixture
def shard_copy(tmp_path: Path, compact_shards: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(compact_shards, out)
    return out


def test_verify_passes_on_a_good_build(shard_copy: Path):
    assert verify_shards(shard_copy) == []
    result = cli("verify", shard_copy)
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def _verify_fails(shard_dir: Path, name: str, phrase: str) -> None:
    problems = verify_shards(shard_dir)
    assert any(name in p and phrase in p for p in problems), problems
    result = cli("verify", shard_dir)
    assert result.exit_code != 0
    assert name in result.output and phrase in result.output, result.output


def test_verify_catches_truncated_shard(shard_copy: Path):
    victim = sorted(shard_copy.glob("*.tar"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    _verify_fails(shard_copy, victim.name, "bytes, manifest says")


def test_verify_catches_one_byte_changed(shard_copy: Path):
    victim = sorted(shard_copy.glob("*.tar"))[2]
    with tarfile.open(victim) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".x.npy"))
        offset = member.offset_data + 200  # inside the array data: the shard still decodes
    data = bytearray(victim.read_bytes())
    data[offset] ^= 0x01
    victim.write_bytes(bytes(data))
    assert victim.stat().st_size == len(data)
    _verify_fails(shard_copy, victim.name, "sha256")


def test_verify_catches_edited_label(shard_copy: Path):
    """A hand edit that keeps the tar valid and the size equal: the label digit of one sample."""
    victim = sorted(shard_copy.glob("*.tar"))[0]
    with tarfile.open(victim) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".cls"))
        offset = member.offset_data
    data = bytearray(victim.read_bytes())
    old = chr(data[offset])
    new = "9" if old != "9" else "8"
    data[offset] = ord(new)
    victim.write_bytes(bytes(data))
    _verify_fails(shard_copy, victim.name, "sha256")
    key = member.name.split(".")[0]
    assert f"{victim}:{key}: json label {old} does not match cls {new}" in verify_shards(shard_copy)


def test_verify_reads_the_manifest_once(shard_copy: Path, monkeypatch):
    reads: list[Path] = []
    real = shards_mod.read_manifest

    def counting(shard_dir: Path, *args: float) -> dict:
        reads.append(shard_dir)
        return real(shard_dir, *args)

    monkeypatch.setattr(shards_mod, "read_manifest", counting)
    monkeypatch.setattr(cli_mod, "read_manifest", counting)
    result = cli("verify", shard_copy)
    assert result.exit_code == 0, result.output
    assert [str(r) for r in reads] == [str(shard_copy)]


def test_verify_catches_deleted_shard(shard_copy: Path):
    victim = sorted(shard_copy.glob("*.tar"))[-1]
    victim.unlink()
    _verify_fails(shard_copy, victim.name, "file not found")


def test_verify_catches_extra_shard(shard_copy: Path):
    extra = shard_copy / "fold0-999999.tar"
    shutil.copyfile(sorted(shard_copy.glob("*.tar"))[0], extra)
    _verify_fails(shard_copy, extra.name, "not in the manifest")


def test_verify_without_manifest_fails(shard_copy: Path):
    (shard_copy / "manifest.json").unlink()
    result = cli("verify", shard_copy)
    assert result.exit_code != 0 and "manifest" in result.output


def test_stats_prints_counts_per_fold_and_sign(compact_shards: Path):
    manifest = manifest_of(compact_shards)
    result = cli("stats", compact_shards)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"{manifest['totals']['samples']} samples" in lines[0]
    header = lines.index("fold  samples  shards  participants")
    table = [tuple(int(v) for v in line.split()) for line in lines[header + 1 : header + 1 + len(manifest["folds"])]]
    assert table == [(f["fold"], f["samples"], f["shards"], len(f["participants"])) for f in manifest["folds"]]
    per_sign: dict[int, int] = {}
    for entry in manifest["shards"]:
        for label in entry["labels"]:
            per_sign[label] = per_sign.get(label, 0) + 1
    names = {v: k for k, v in manifest["label_map"].items()}
    for label, count in per_sign.items():
        assert f"{names[label]} {count}" in result.output
    assert f"median {manifest['lengths']['median']}" in result.output
    assert f"truncated to 384: {manifest['lengths']['truncated']}" in result.output
    stored = [n for e in manifest["shards"] for n in e["lengths"]]
    bins = [(1, 16), (16, 32), (32, 64), (64, 128), (128, 256), (256, 384), (384, 385)]
    histogram = ", ".join(f"[{a},{b}) {sum(a <= n < b for n in stored)}" for a, b in bins)
    assert lines[-1] == f"stored length histogram: {histogram}"


def test_verify_names_the_shard_of_an_undecodable_mask(tmp_path: Path, padded_shards: Path):
    """A hand-edited padded shard whose mask.npy is a pickled object array: reported, never unpickled."""
    out = tmp_path / "shards"
    shutil.copytree(padded_shards, out)
    victim = sorted(out.glob("*.tar"))[0]
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    np.save(buf, np.array([Trap()], dtype=object), allow_pickle=True)
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_mask = next(m for m, _ in members if m.name.endswith(".mask.npy"))
    with tarfile.open(victim, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            data = buf.getvalue() if info is first_mask else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    problems = verify_shards(out)
    assert any(victim.name in p and ("sha256" in p or "bytes" in p) for p in problems), problems
    assert any(victim.name in p and first_mask.name.split(".")[0] in p for p in problems), problems
    result = cli("verify", out)
    assert result.exit_code != 0 and victim.name in result.output, result.output
    assert not marker.exists()


# ---------------------------------------------------------------- features beyond float16, durable writes


def _write_sequence(data: Path, rel: str, xyz: np.ndarray) -> None:
    path = data / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(sequence_table(np.arange(len(xyz), dtype=np.int16) + 10, xyz), path)


def test_features_beyond_float16_rejected_with_a_reason(tmp_path: Path):
    """Nearly constant hands and no face (origin 0.5): a tiny std puts the features far past 65504."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    extreme = np.full((4, N_RAW, 3), np.nan, dtype=np.float32)
    extreme[:, TYPE_OFFSETS["pose"] : TYPE_OFFSETS["pose"] + 33] = 0.5  # pose is never missing
    for hand in ("left_hand", "right_hand"):
        block = slice(TYPE_OFFSETS[hand], TYPE_OFFSETS[hand] + 21)
        extreme[:, block] = 0.1 + rng.normal(0, 1e-6, (4, 21, 3))
    normal = rng.uniform(0, 1, (5, N_RAW, 3)).astype(np.float32)
    rows = [
        ("train_landmark_files/1/100.parquet", "1", "100", "a", extreme),
        ("train_landmark_files/2/200.parquet", "2", "200", "b", normal),
    ]
    for rel, *_, xyz in rows:
        _write_sequence(data, rel, xyz)
    write_csv(data, [dict(zip(("path", "participant_id", "sequence_id", "sign"), r[:4], strict=True)) for r in rows])
    (data / "sign_to_prediction_index_map.json").write_text('{"a": 0, "b": 1}')

    compact, _ = compact_features(read_landmarks(data / rows[0][0], coords="xy"))
    peak = float(np.abs(compact).max())
    assert 65504 < peak < 1e7 and np.isfinite(compact).all()  # the construction really leaves float16's range
    reason = f"features exceed the float16 range (max |value| {peak:.6g}); rebuild with --dtype float32"

    half = cli("build-shards", "--data-dir", data, "--out", tmp_path / "f16", "--jobs", "1", "--folds", "2")
    assert half.exit_code == 3, half.output
    assert f"rejected {rows[0][0]}: {reason}" in half.output
    manifest = manifest_of(tmp_path / "f16")
    assert manifest["rejects"] == [{"sequence_id": "100", "path": rows[0][0], "reason": reason}]
    assert [i for e in manifest["shards"] for i in e["sequence_ids"]] == ["200"]
    assert verify_shards(tmp_path / "f16") == []

    full = cli(
        "build-shards",
        "--data-dir",
        data,
        "--out",
        tmp_path / "f32",
        "--jobs",
        "1",
        "--folds",
        "2",
        "--dtype",
        "float32",
    )
    assert full.exit_code == 0, full.output
    sample = next(
        s for tar in (tmp_path / "f32").glob("*.tar") for s in iter_samples(tar) if s.meta["sequence_id"] == "100"
    )
    assert float(np.abs(sample.features).max()) == peak


def test_build_fsyncs_every_file_it_renames_into_place(tmp_path: Path, tiny_dir: Path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    build_shards(tiny_dir, out, BuildOptions(shard_size=16, folds=2), jobs=1)  # jobs=1: all in this process
    written = sorted(p.name for p in out.iterdir())
    assert {"manifest.json", "rejects.jsonl", "plan.json"} < set(written)
    assert sorted(synced) == sorted(name + ".tmp" for name in written)
