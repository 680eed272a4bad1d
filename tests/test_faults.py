"""Bad bytes and bad files on the reading side, one class per test: malformed tar headers and pax records,
absurd `.npy` shapes, manifests that are edited or lie, labels outside the label map, and checkpoints that are
empty, truncated, foreign or malicious. Each must end in a one-line error naming the file and the reason, never
a hang, a MemoryError, a traceback or an unpickled object.

Every bad input is made in the test from a good shard set or checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from demo_data import demo_dataset, demo_shards

from pipeline.cli import main as pipeline_cli
from pipeline.shards import MANIFEST, ShardError, iter_members, read_manifest
from pipeline.tario import load_npy, ustar_header
from train.checkpoint import CheckpointError, load_checkpoint
from train.cli import main as train_cli
from train.config import TrainConfig
from train.data import checked, make_loader
from train.model import SignModel, model_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("faults")
    return demo_shards(base, demo_dataset(base, sequences=120, signs=4, participants=3), shard_size=30, folds=3)


@pytest.fixture
def copy(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    return out


def run(cli: Any, *args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result: Any, *phrases: str) -> None:
    """Exit status 1, a click error line holding every phrase, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert any(
        line.startswith(("Error: ", "FAIL ")) and all(p in line for p in phrases) for line in result.output.splitlines()
    ), result.output


def bounded(fn: Callable[[], Any], seconds: float = 60) -> Any:
    """`fn()` in a thread; fails the test instead of hanging it when `fn` does not return in time."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} did not return within {seconds} s (a hang)"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def train_args(shards: Path | str, out: Path) -> list[str]:
    return [
        "--shards",
        str(shards),
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


def replace_shard(shard_dir: Path, name: str, data: bytes) -> None:
    """Put `data` in place of shard `name` and make the manifest's size and digest of it agree."""
    (shard_dir / name).write_bytes(data)
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    entry = next(e for e in manifest["shards"] if e["name"] == name)
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))


def member(name: str | bytes, data: bytes, kind: bytes = b"0", size: bytes | None = None) -> bytes:
    """One tar member (header, data, padding) with a valid checksum; `size` overrides the header's size field."""
    header = bytearray(ustar_header("x", len(data)))
    raw = name if isinstance(name, bytes) else name.encode()
    header[:100] = raw.ljust(100, b"\0")
    header[156:157] = kind
    if size is not None:
        header[124:136] = size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + bytes(-len(data) % 512)


def first_training_shard(shard_dir: Path) -> tuple[str, list[tuple[str, bytes]]]:
    name = next(e["name"] for e in read_manifest(shard_dir)["shards"] if e["fold"] == 1)
    with tarfile.open(shard_dir / name) as tar:
        return name, [(m.name, tar.extractfile(m).read()) for m in tar]


# ---------------------------------------------------------------- 1. malformed tar headers: never a hang


MALFORMED = {
    "pax-record-length-0": (member("pax", b"0 path=x\n", b"x"), "malformed pax record"),
    "pax-length-not-a-number": (member("pax", b"ab path=x\n", b"x"), "malformed pax record"),
    "pax-length-past-the-end": (member("pax", b"99 path=x\n", b"x"), "malformed pax record"),
    "pax-record-without-equals": (member("pax", b"9 pathx\n\n", b"x"), "malformed pax record"),
    "size-beyond-the-bound": (member("1.cls", b"1", size=b"77777777777\0"), "over"),
    "size-in-base-256": (member("1.cls", b"1", size=b"\x80" + bytes(10) + b"\x01"), "bad header"),
    "huge-gnu-long-name": (member("././@LongLink", b"n" * 5000, b"L"), "long name"),
    "name-not-utf8": (member(b"\xff\xfe.cls", b"1"), "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_tar_bytes_are_an_error_naming_the_shard(copy: Path, case: str, tmp_path: Path) -> None:
    bad_member, reason = MALFORMED[case]
    name, members = first_training_shard(copy)
    good = b"".join(member(n, d) for n, d in members[:5])
    replace_shard(copy, name, good + bad_member + b"".join(member(n, d) for n, d in members[5:]) + bytes(1024))

    with pytest.raises(ShardError, match=reason) as info:
        bounded(lambda: list(iter_members(copy / name)))
    assert name in str(info.value)
    verify = bounded(lambda: run(pipeline_cli, "verify", copy))
    assert_one_line_error(verify, name, reason)
    errors = bounded(lambda: [str(e) for e in _loader_errors(copy, [1])])
    assert len(errors) == 1 and name in errors[0] and reason in errors[0], errors
    assert_one_line_error(bounded(lambda: run(train_cli, *train_args(copy, tmp_path / "run"))), name, reason)


def _loader_errors(shard_dir: Path, folds: list[int]) -> list[ShardError]:
    errors = []
    for item in make_loader(shard_dir, folds, 16, train=False, workers=0):
        try:
            list(checked([item]))
        except ShardError as exc:
            errors.append(exc)
    return errors


def test_pax_reader_keeps_working_on_real_pax_shards(tmp_path: Path) -> None:
    """Control for the stricter pax parser: what tarfile writes in pax format still reads."""
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("7.cls", b"1"), ("é" * 60 + ".cls", b"2")]:
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), {"comment": "x = y", "mtime": "1.5"}
            tar.addfile(info, io.BytesIO(data))
    assert [(k, m["cls"]) for k, m in iter_members(path)] == [("7", b"1"), ("é" * 60, b"2")]


# ---------------------------------------------------------------- 1b. absurd .npy headers: no MemoryError


def _npy_with_shape(shape: tuple[int, ...]) -> bytes:
    """A `.npy` whose header claims `shape` but which holds the data of a (2, 118, 6) float16 array."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f2", "fortran_order": False, "shape": shape})
    return buf.getvalue() + np.zeros((2, 118, 6), np.float16).tobytes()


@pytest.mark.parametrize("shape", [(999_999_999_999_999, 118, 6), (2, 118, 6, 9_999_999_999), (-1, 118, 6)])
def test_absurd_npy_shape_is_a_clear_error(copy: Path, shape: str) -> None:
    data = _npy_with_shape(shape)
    with pytest.raises(ValueError, match=r"\.npy"):
        load_npy(data)
    name, members = first_training_shard(copy)
    key = members[0][0].split(".")[0]
    members[0] = (members[0][0], data) if members[0][0].endswith(".x.npy") else members[0]
    assert members[0][0] == f"{key}.x.npy"
    replace_shard(copy, name, b"".join(member(n, d) for n, d in members) + bytes(1024))
    assert_one_line_error(run(pipeline_cli, "verify", copy), f"{name}:{key}", ".npy")
    errors = _loader_errors(copy, [1])
    assert len(errors) == 1 and f"{name}:{key}" in str(errors[0])


# ---------------------------------------------------------------- 5. the manifest is the contract


def _edit(manifest: dict, case: str) -> dict | str:
    entry = manifest["shards"][0]
    if case == "missing-shards":
        del manifest["shards"]
    elif case == "missing-label-map":
        del manifest["label_map"]
    elif case == "count-field-changed":
        entry["samples"] += 1
    elif case == "fold-count-changed":
        manifest["folds"][0]["samples"] -= 1
    elif case == "label-past-the-map":
        entry["labels"][3] = len(manifest["label_map"])
    elif case == "label-minus-100":
        entry["labels"][0] = -100
    elif case == "label-a-string":
        entry["labels"][0] = "1"
    elif case == "name-escapes":
        entry["name"] = "../fold0-000000.tar"
    elif case == "key-with-a-slash":
        entry["sequence_ids"][0] = "../../etc"
    elif case == "format-version":
        manifest["format_version"] = 99
    elif case == "label-map-gap":
        manifest["label_map"][next(iter(manifest["label_map"]))] = 100
    elif case == "not-json":
        return "{not json"
    elif case == "deeply-nested":
        return "[" * 200_000 + "]" * 200_000
    return manifest


MANIFEST_CASES = {
    "missing-shards": "missing 'shards'",
    "missing-label-map": "missing 'label_map'",
    "count-field-changed": "one value per sample",
    "fold-count-changed": "fold 0 says",
    "label-past-the-map": "outside the label map",
    "label-minus-100": "label -100 is outside",
    "label-a-string": "label '1' is outside",
    "name-escapes": "name must be",
    "key-with-a-slash": "sequence_ids",
    "format-version": "format version 99",
    "label-map-gap": "label_map must",
    "not-json": "not a JSON manifest",
    "deeply-nested": "not a JSON manifest",
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_a_manifest_that_breaks_the_contract_is_refused_everywhere(copy: Path, tmp_path: Path, case: str) -> None:
    edited = _edit(json.loads((copy / MANIFEST).read_text()), case)
    (copy / MANIFEST).write_text(edited if isinstance(edited, str) else json.dumps(edited))
    phrase = MANIFEST_CASES[case]
    with pytest.raises(ShardError, match=phrase) as info:
        read_manifest(copy)
    assert str(copy / MANIFEST) in str(info.value)
    for args in (("verify", copy), ("stats", copy)):
        assert_one_line_error(run(pipeline_cli, *args), MANIFEST, phrase)
    assert_one_line_error(run(train_cli, *train_args(copy, tmp_path / "run")), MANIFEST, phrase)


def _drop_last_sample(manifest: dict, name: str) -> None:
    """A self-consistent manifest that lists one sample fewer than the shard holds (size and digest unchanged)."""
    entry = next(e for e in manifest["shards"] if e["name"] == name)
    for key in ("sequence_ids", "labels", "lengths"):
        entry[key].pop()
    entry["samples"] -= 1
    next(f for f in manifest["folds"] if f["fold"] == entry["fold"])["samples"] -= 1
    manifest["totals"]["samples"] -= 1


def test_a_shard_with_more_samples_than_its_manifest_entry_is_refused(copy: Path, tmp_path: Path) -> None:
    name, members = first_training_shard(copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    _drop_last_sample(manifest, name)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    read_manifest(copy)  # consistent in itself: only reading the shard tells
    assert_one_line_error(run(pipeline_cli, "verify", copy), name, "the manifest lists only")
    assert_one_line_error(run(train_cli, *train_args(copy, tmp_path / "run")), name, "the manifest lists only")


def test_a_sample_whose_label_is_not_the_manifests_is_refused(copy: Path, tmp_path: Path) -> None:
    name, members = first_training_shard(copy)
    key = members[0][0].split(".")[0]
    old = json.loads(dict(members)[f"{key}.json"])["label"]
    new = (old + 1) % len(read_manifest(copy)["label_map"])
    edited = [
        (
            n,
            str(new).encode()
            if n == f"{key}.cls"
            else json.dumps({**json.loads(d), "label": new}).encode()
            if n == f"{key}.json"
            else d,
        )
        for n, d in members
    ]
    replace_shard(copy, name, b"".join(member(n, d) for n, d in edited) + bytes(1024))
    reason = f"label {new}, manifest says {old}"
    assert_one_line_error(run(pipeline_cli, "verify", copy), f"{name}:{key}", reason)
    assert_one_line_error(run(train_cli, *train_args(copy, tmp_path / "run")), f"{name}:{key}", reason)


# ---------------------------------------------------------------- 6. checkpoints


class _Trap:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _good_checkpoint(n_classes: int = 4) -> dict[str, Any]:
    cfg = TrainConfig(preset="tiny")
    model = SignModel(model_config("tiny", n_classes))
    return {"model": model.state_dict(), "config": asdict(cfg), "label_map": {f"s{i}": i for i in range(n_classes)}}


def _write_checkpoint(path: Path, case: str, marker: Path) -> str:
    """Write the bad checkpoint of `case` at `path`; returns the phrase its error must hold."""
    good = io.BytesIO()
    torch.save(_good_checkpoint(), good)
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    elif case == "text":
        path.write_text("not a checkpoint\n")
    elif case == "foreign-state-dict":
        torch.save(SignModel(model_config("tiny", 4)).state_dict(), path)
        return "expected a dict with model, config, label_map"
    elif case == "malicious":
        torch.save({**_good_checkpoint(), "extra": _Trap(str(marker))}, path)
        return "refused: unpickling them could run code"
    elif case == "other-shapes":
        torch.save({**_good_checkpoint(), "label_map": {f"s{i}": i for i in range(7)}}, path)
        return "weights do not fit"
    elif case == "unknown-preset":
        ckpt = _good_checkpoint()
        torch.save({**ckpt, "config": {**ckpt["config"], "preset": "huge"}}, path)
        return "of preset 'huge': unknown model preset 'huge'"
    return "empty, truncated or not a torch file"


CHECKPOINT_CASES = ["empty", "truncated", "text", "foreign-state-dict", "malicious", "other-shapes", "unknown-preset"]


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_a_bad_checkpoint_is_one_line(shards: Path, tmp_path: Path, case: str) -> None:
    path, marker = tmp_path / "bad.pt", tmp_path / "unpickled"
    phrase = _write_checkpoint(path, case, marker)
    with pytest.raises(CheckpointError, match=phrase):
        load_checkpoint(path)
    result = run(train_cli, "evaluate", "--checkpoint", path, "--shards", shards, "--workers", "0")
    assert_one_line_error(result, str(path), "not an asl-train checkpoint", phrase)
    for args in (
        ("predict", "--checkpoint", path, tmp_path / "none.parquet"),
        ("export", "--checkpoint", path, "--out", tmp_path / "m.onnx"),
    ):
        assert_one_line_error(run(train_cli, *args), str(path), "not an asl-train checkpoint", phrase)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copyfile(path, run_dir / "last.pt")
    assert_one_line_error(run(train_cli, "--resume", run_dir), "last.pt", "not an asl-train checkpoint", phrase)
    assert "weights_only" not in result.output and not marker.exists()


def test_a_checkpoint_without_the_training_state_cannot_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(_good_checkpoint(), run_dir / "last.pt")
    load_checkpoint(run_dir / "last.pt")  # fine for evaluate and predict
    assert_one_line_error(run(train_cli, "--resume", run_dir), "cannot resume without optimizer")


def test_the_good_checkpoint_of_these_tests_loads() -> None:
    """Control: the checkpoint the bad ones are made from is accepted."""
    buf = io.BytesIO()
    torch.save(_good_checkpoint(), buf)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"good-{os.getpid()}.pt"
    try:
        path.write_bytes(buf.getvalue())
        assert set(load_checkpoint(path)) == {"model", "config", "label_map"}
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- special files in a shard directory


@pytest.mark.parametrize("which", ["manifest", "shard"])
def test_a_fifo_or_device_in_place_of_a_file_is_refused_not_read(copy: Path, tmp_path: Path, which: str) -> None:
    """Opening a FIFO for reading blocks until a writer comes, and /dev/zero never ends: both are refused."""
    name = MANIFEST if which == "manifest" else first_training_shard(copy)[0]
    (copy / name).unlink()
    os.mkfifo(copy / name)
    assert_one_line_error(bounded(lambda: run(pipeline_cli, "verify", copy)), name, "not a regular file (a FIFO)")
    (copy / name).unlink()
    (copy / name).symlink_to("/dev/zero")
    phrase = "not a regular file (a character device)"
    assert_one_line_error(bounded(lambda: run(train_cli, *train_args(copy, tmp_path / "run"))), name, phrase)
