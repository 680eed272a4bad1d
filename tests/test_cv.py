"""Tests for train/cv.py: the out-of-fold report against numpy, its files, fold choice and fold states."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from demo_data import demo_dataset, demo_shards

from pipeline.shards import read_manifest
from train.cv import (
    FINISHED,
    NEW,
    OOF_COLUMNS,
    RESUMABLE,
    cv_folds,
    cv_report,
    fold_state,
    parse_folds,
    predictions_table,
    read_oof,
    shard_samples_table,
    summary_text,
    write_cv,
)
from train.loop import TrainConfig, build_model

SIGNS = ["apple", "bird", "cloud", "dog", "eat", "fish", "go"]
LABEL_MAP = {s: i for i, s in enumerate(SIGNS)}


def _samples(n: int = 400, folds: int = 5, seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    """A random out-of-fold problem: ids, participants (each in one fold), signs; and probabilities that
    favour the true sign for some participants more than others (so top-1 differs between groups)."""
    rng = np.random.default_rng(seed)
    participants = [str(10000 + 7 * p) for p in range(11)]
    fold_of = {p: i % folds for i, p in enumerate(participants)}
    who = rng.choice(participants, n)
    label = rng.integers(0, len(SIGNS), n)
    logits = rng.normal(size=(n, len(SIGNS)))
    skill = np.array([participants.index(p) for p in who]) / 5.0
    logits[np.arange(n), label] += skill
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    samples = pl.DataFrame({
        "sequence_id": [str(1_000_000 + 13 * i) for i in range(n)],
        "participant_id": who.tolist(),
        "fold": [fold_of[p] for p in who],
        "sign": [SIGNS[k] for k in label],
    })  # fmt: skip
    return samples, probs.astype(np.float32)


@pytest.fixture(scope="module")
def oof() -> pl.DataFrame:
    samples, probs = _samples()
    return predictions_table(samples, probs, LABEL_MAP)


def test_cv_report_matches_an_independent_numpy_computation(oof: pl.DataFrame) -> None:
    samples, probs = _samples()
    label = np.array([LABEL_MAP[s] for s in samples["sign"]])
    order = np.argsort(-probs, axis=1)
    hit1, hit5 = order[:, 0] == label, (order[:, :5] == label[:, None]).any(axis=1)
    fold = samples["fold"].to_numpy()
    report = cv_report(oof)
    folds = sorted(set(fold.tolist()))
    top1 = [hit1[fold == f].mean() for f in folds]
    top5 = [hit5[fold == f].mean() for f in folds]
    assert [f["fold"] for f in report["folds"]] == folds
    assert [f["samples"] for f in report["folds"]] == [int((fold == f).sum()) for f in folds]
    assert [f["top1"] for f in report["folds"]] == pytest.approx(top1, rel=1e-12)
    assert [f["top5"] for f in report["folds"]] == pytest.approx(top5, rel=1e-12)
    assert report["top1_mean"] == pytest.approx(np.mean(top1), rel=1e-12)
    assert report["top1_std"] == pytest.approx(np.std(top1, ddof=0), rel=1e-12)  # population std
    assert report["top5_mean"] == pytest.approx(np.mean(top5), rel=1e-12)
    who = samples["participant_id"].to_numpy()
    for p, entry in report["participants"].items():
        assert entry["samples"] == int((who == p).sum())
        assert entry["top1"] == pytest.approx(hit1[who == p].mean(), rel=1e-12)
    assert sum(e["samples"] for e in report["participants"].values()) == len(label)
    assert sum(e["samples"] for e in report["signs"].values()) == len(label)
    assert set(report["participants"]) == set(who.tolist())
    assert set(report["signs"]) == set(SIGNS)
    assert len({e["top1"] for e in report["participants"].values()}) > 1  # the groups really differ


def test_predictions_table_ranks_by_probability_ties_to_the_lower_label(oof: pl.DataFrame) -> None:
    samples, probs = _samples(n=3)
    probs[0] = [0.1, 0.3, 0.3, 0.05, 0.05, 0.1, 0.1]
    table = predictions_table(samples, probs, LABEL_MAP)
    assert table.columns == list(OOF_COLUMNS)
    assert table.row(0, named=True)["pred_1"] == "bird" and table.row(0, named=True)["pred_2"] == "cloud"
    assert table["p_1"][0] == pytest.approx(0.3) and table["pred_3"][0] == "apple"  # 0.1 tie: lowest index first
    assert oof["pred_1"].to_list() == [SIGNS[i] for i in np.argmax(_samples()[1], axis=1)]


def test_fewer_signs_than_five_leave_null_columns_and_still_count() -> None:
    samples = pl.DataFrame({"sequence_id": ["a", "b"], "participant_id": ["1", "2"], "fold": [0, 1],
                            "sign": ["x", "y"]})  # fmt: skip
    table = predictions_table(samples, np.array([[0.9, 0.1], [0.8, 0.2]]), {"x": 0, "y": 1})
    assert table["pred_3"].null_count() == 2
    report = cv_report(table)
    assert [(f["top1"], f["top5"]) for f in report["folds"]] == [(1.0, 1.0), (0.0, 1.0)]


def test_write_cv_writes_both_files_which_round_trip(oof: pl.DataFrame, tmp_path: Path) -> None:
    report = write_cv(tmp_path, oof.reverse())  # any row order in; sorted out
    assert json.loads((tmp_path / "cv.json").read_text()) == json.loads(json.dumps(report))
    with open(tmp_path / "oof.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == oof.height and list(rows[0]) == list(OOF_COLUMNS)
    back = read_oof(tmp_path / "oof.csv")
    assert back.equals(oof.sort("fold", "sequence_id"))
    assert cv_report(back) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv.json", "oof.csv"]  # no temporary left


def test_bad_tables_get_one_line(oof: pl.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"holds sequence \d+ twice"):
        cv_report(pl.concat([oof, oof.head(1)]))
    with pytest.raises(ValueError, match="lacks column"):
        cv_report(oof.drop("participant_id"))
    (tmp_path / "oof.csv").write_text("sequence_id,fold\n1,0\n")
    with pytest.raises(ValueError, match="oof.csv: not an out-of-fold table"):
        read_oof(tmp_path / "oof.csv")


def test_summary_fits_a_screen_and_names_the_worst(oof: pl.DataFrame) -> None:
    report = cv_report(oof)
    text = summary_text(report)
    assert len(text.splitlines()) <= 24 and max(map(len, text.splitlines())) <= 200
    worst = min(report["participants"].items(), key=lambda kv: (kv[1]["top1"], kv[0]))[0]
    assert f"worst participants: {worst} " in text
    assert f"{report['top1_mean']:.4f} ± {report['top1_std']:.4f}" in text


@pytest.mark.parametrize(("text", "folds"), [("0,2", [0, 2]), (" 3 , 1", [3, 1]), ("4", [4])])
def test_parse_folds(text: str, folds: list[int]) -> None:
    assert parse_folds(text) == folds


@pytest.mark.parametrize(("text", "message"), [("0,,2", "expected fold numbers"), ("a", "expected fold numbers"),
                                               ("-1", "expected fold numbers"), ("1,1", "named twice")])  # fmt: skip
def test_parse_folds_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_folds(text)


def _manifest(*samples: int) -> dict:
    return {"folds": [{"fold": i, "samples": n} for i, n in enumerate(samples)]}


def test_cv_folds_checks_the_manifest() -> None:
    assert cv_folds(_manifest(5, 6, 7), "S") == [0, 1, 2]
    assert cv_folds(_manifest(5, 6, 7), "S", [2, 0]) == [2, 0]
    one = r"^S: cross-validation needs 2 or more folds, its manifest has one fold \(0\); rebuild"
    with pytest.raises(ValueError, match=one):
        cv_folds(_manifest(9), "S")
    with pytest.raises(ValueError, match="has one fold"):
        cv_folds(_manifest(9, 0), "S")  # an empty fold does not count
    with pytest.raises(ValueError, match="--folds 3: not in the manifest of S, which has folds 0,1"):
        cv_folds(_manifest(5, 6), "S", [0, 3])


def _checkpoint(path: Path, epoch: int, step: int, batch_in_epoch: int = 0) -> None:
    cfg = TrainConfig(preset="tiny")
    model = build_model(cfg, 3)
    torch.save({"model": model.state_dict(), "config": asdict(cfg), "label_map": {"a": 0, "b": 1, "c": 2},
                "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch}, path)  # fmt: skip


def test_fold_state_from_the_checkpoint_not_the_metrics(tmp_path: Path) -> None:
    run = tmp_path / "fold0"
    assert fold_state(run, epochs=3) == NEW  # no directory yet
    run.mkdir()
    (run / "best.pt").write_bytes(b"")  # a kill before the first last.pt
    assert fold_state(run, epochs=3) == NEW
    _checkpoint(run / "best.pt", 2, 20)
    _checkpoint(run / "last.pt", 2, 20)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
    assert fold_state(run, epochs=3) == RESUMABLE  # epoch 3's line, but a kill before its last.pt
    _checkpoint(run / "last.pt", 2, 25, batch_in_epoch=5)
    assert fold_state(run, epochs=3) == RESUMABLE  # mid-epoch
    _checkpoint(run / "last.pt", 3, 30)
    assert fold_state(run, epochs=3) == FINISHED
    assert fold_state(run, epochs=4) == RESUMABLE  # a longer run continues it
    _checkpoint(run / "last.pt", 2, 25, batch_in_epoch=5)
    assert fold_state(run, epochs=3, max_steps=25) == FINISHED
    (run / "best.pt").unlink()
    with pytest.raises(ValueError, match="fold0: last.pt has finished .* but best.pt is missing"):
        fold_state(run, epochs=2, max_steps=25)
    (run / "last.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="last.pt: not an asl-train checkpoint"):
        fold_state(run, epochs=3)


def test_shard_samples_table_reads_participants_from_the_shards(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("cv")
    data = demo_dataset(base, sequences=90, signs=3, participants=6)
    shards = demo_shards(base, data, shard_size=10, folds=3)
    manifest = read_manifest(shards)
    table = shard_samples_table(shards, manifest, [0, 2])
    with open(data / "train.csv", newline="") as f:
        truth = {r["sequence_id"]: (r["participant_id"], r["sign"]) for r in csv.DictReader(f)}
    folds = {f["fold"]: f for f in manifest["folds"]}
    assert table.height == folds[0]["samples"] + folds[2]["samples"]
    assert table["sequence_id"].n_unique() == table.height
    for row in table.iter_rows(named=True):
        assert (row["participant_id"], row["sign"]) == truth[row["sequence_id"]]
    for k in (0, 2):
        got = set(table.filter(pl.col("fold") == k)["participant_id"].to_list())
        assert got == set(map(str, folds[k]["participants"]))
