"""The checkpoint gate: a file's zip structure and pickle are checked before unpickling, its stored config and
label map before any model is built; crafted files of a few hundred bytes are refused, never worked on."""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner
from demo_data import demo_dataset, demo_shards

import train.checkpoint
from train.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint, scan_pickle
from train.cli import main as train_cli
from train.config import TrainConfig

OLD = Path(__file__).parent / "data" / "checkpoint-format-1.pt"


def _archive(pickle_bytes: bytes, extra: dict[str, bytes] | None = None, compress: int = zipfile.ZIP_STORED) -> bytes:
    """A zip laid out as torch.save lays it out, holding `pickle_bytes` as its data.pkl."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes, compress_type=compress)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def _shared_tuples(levels: int) -> bytes:
    """A dict whose key is t[levels-1], where t[k] = (t[k-1], t[k-1]): 2^levels tuples to hash, in ~20 bytes a level."""
    ops = bytearray(b"\x80\x02}r" + (100_000).to_bytes(4, "little"))  # PROTO 2, EMPTY_DICT, LONG_BINPUT
    ops += b"K\x00)q\x00s"  # d[0] = () as memo 0
    for k in range(1, levels):  # d[k] = (memo k-1, memo k-1) as memo k
        ops += b"K" + bytes([k]) + b"h" + bytes([k - 1]) + b"h" + bytes([k - 1]) + b"\x86q" + bytes([k]) + b"s"
    ops += b"h" + bytes([levels - 1]) + b"K\x01s."  # d[t[levels-1]] = 1: the unpickler hashes the key
    return bytes(ops)


def _tiny_checkpoint(**config_changes) -> dict:
    cfg = TrainConfig(preset="tiny")
    model = build_model(cfg, 3)
    config = {**asdict(cfg), **config_changes}
    return {"model": model.state_dict(), "config": config, "label_map": {"a": 0, "b": 1, "c": 2}}


def _write(tmp_path: Path, data: bytes, name: str = "x.pt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_an_old_checkpoint_and_a_new_one_pass_the_gate(tmp_path: Path) -> None:
    assert load_checkpoint(OLD)["label_map"]
    path = tmp_path / "new.pt"
    save_checkpoint(path, _tiny_checkpoint())
    assert load_checkpoint(path)["label_map"] == {"a": 0, "b": 1, "c": 2}


@pytest.mark.parametrize("levels", [24, 40, 60])
def test_shared_nested_tuples_are_refused_before_unpickling(tmp_path: Path, levels: int) -> None:
    data = _archive(_shared_tuples(levels))
    assert len(data) < 1600  # unpickled, the 40- and 60-level files would hash 2^40 and 2^60 tuples
    with pytest.raises(CheckpointError, match=r"more than 10,000,000 objects \(shared ones counted where used\)"):
        load_checkpoint(_write(tmp_path, data))


def test_a_few_shared_levels_are_only_counted(tmp_path: Path) -> None:
    """Sharing itself is legal (torch.save shares storages and small tuples): 2^12 objects pass the scan."""
    scan_pickle("x", _shared_tuples(12))


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    nested: list = []
    for _ in range(200):
        nested = [nested]
    with pytest.raises(CheckpointError, match="nests deeper than 64"):
        load_checkpoint(_write(tmp_path, _archive(pickle.dumps({"model": nested}, protocol=2))))


@pytest.mark.parametrize(
    "pickle_bytes",
    [
        b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00id\x85R.",  # GLOBAL os.system, called
        b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93X\x02\x00\x00\x00id\x85R.",  # the same by STACK_GLOBAL
        b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.",
    ],
)
def test_globals_outside_the_weights_only_allowlist_are_refused(tmp_path: Path, pickle_bytes: bytes) -> None:
    with pytest.raises(
        CheckpointError, match=r"plain data \((os\.system|builtins\.eval); refused: unpickling them could run code\)$"
    ):
        load_checkpoint(_write(tmp_path, _archive(pickle_bytes)))


def test_a_shared_object_changed_after_sharing_is_refused(tmp_path: Path) -> None:
    # L = [] (memo 0); t = (L, L); then L.append(...) through a memo get: the shape no pickler writes
    ops = b"\x80\x02]q\x00h\x00h\x00\x86q\x01h\x00K\x01a0."
    with pytest.raises(CheckpointError, match="changes an object after sharing it"):
        load_checkpoint(_write(tmp_path, _archive(ops)))


@pytest.mark.parametrize(
    ("extra", "compress", "message"),
    [
        ({"archive/evil.py": b"print(1)"}, zipfile.ZIP_STORED, "a member torch does not write: 'archive/evil.py'"),
        ({"other/data.pkl": b"."}, zipfile.ZIP_STORED, "its members lie in 2 folders, not one"),
        ({}, zipfile.ZIP_DEFLATED, "member 'archive/data.pkl' is compressed or larger than the file"),
    ],
)
def test_zip_layouts_torch_does_not_write_are_refused(tmp_path: Path, extra: dict, compress: int, message: str) -> None:
    data = _archive(pickle.dumps({"model": {}}, protocol=2), extra, compress)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_checkpoint(_write(tmp_path, data))


def test_a_fifo_and_an_oversized_file_are_refused_without_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)  # no writer: opening it for reading would block forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint("/dev/zero")
    monkeypatch.setattr(train.checkpoint, "MAX_CHECKPOINT_BYTES", OLD.stat().st_size - 1)
    with pytest.raises(
        CheckpointError, match=r"not an asl-train checkpoint: file of [0-9.]+ MB is over the [0-9.]+ MB limit$"
    ):
        load_checkpoint(OLD)


@pytest.mark.parametrize(
    ("changes", "label_map", "message"),
    [
        ({"model": {"dim": 40_000}}, None, r"dim 40000 is not an integer in \[1, 4096\]"),
        ({"model": {"dim": 4096, "depth": 32}}, None, "a model of [0-9,]+ parameters, over the limit"),
        ({"model": {"kernel_size": 10**9 + 1}}, None, r"kernel_size 1000000001 is not an integer in \[1, 255\]"),
        ({"preset": "huge"}, None, "wrong type|not one of|unknown model preset"),
        ({"lr": float("nan")}, None, "lr must be a finite number, not nan"),
        ({}, {f"s{i}": i for i in range(200_000)}, r"its label map is not a dict of 1 to 100,000 signs"),
        ({}, {"a": 0, "b": 5}, "its label map does not number its signs 0..n-1"),
    ],
)
def test_stored_configs_outside_sane_bounds_are_refused_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict, label_map: dict | None, message: str
) -> None:
    ckpt = _tiny_checkpoint(**changes)
    if label_map is not None:
        ckpt["label_map"] = label_map
    path = tmp_path / "crafted.pt"
    save_checkpoint(path, ckpt)

    def never(*args, **kwargs):
        raise AssertionError("a model was built from a config that the gate must refuse")

    monkeypatch.setattr(train.checkpoint, "SignModel", never)
    with pytest.raises(CheckpointError, match=f"^{path}: not an asl-train checkpoint: .*({message})"):
        load_checkpoint(path)


def test_commands_refuse_a_crafted_checkpoint_in_one_line(tmp_path: Path) -> None:
    shards = demo_shards(
        tmp_path, demo_dataset(tmp_path, sequences=300, signs=5, participants=6), shard_size=40, folds=3
    )
    path = tmp_path / "huge.pt"
    save_checkpoint(path, _tiny_checkpoint(model={"dim": 40_000}))
    bomb = _write(tmp_path, _archive(_shared_tuples(40)), "bomb.pt")
    for checkpoint in (path, bomb):
        run = ["--shards", str(shards), "--preset", "tiny", "--workers", "0", "--device", "cpu", "--out"]
        for args in (
            ["predict", "--checkpoint", str(checkpoint), str(tmp_path / "a.parquet")],
            ["--init-from", str(checkpoint), *run, str(tmp_path / "run")],
        ):
            result = CliRunner().invoke(train_cli, args)
            assert result.exit_code == 1, result.output
            assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
            assert f"{checkpoint}: not an asl-train checkpoint" in result.output


def _marks_after_tuples(tuples: int, pairs: int) -> bytes:
    """`tuples` empty tuples left on the stack, then `pairs` MARK, POP_MARK pairs: quadratic for a scan that
    looks for each mark from the top of a copy of the stack."""
    return b"\x80\x02" + b")" * tuples + b"(1" * pairs + b")."


def test_the_scan_is_linear_in_many_marks_over_a_deep_stack() -> None:
    data = _marks_after_tuples(300_000, 800_000)
    opcodes = 300_000 + 2 * 800_000 + 3
    work = scan_pickle("x", data)  # under the opcode budget: scanned whole
    assert opcodes <= work <= 2 * opcodes


def test_a_million_mark_pairs_are_refused_at_the_opcode_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    pop_to_mark = train.checkpoint._Stack.pop_to_mark
    monkeypatch.setattr(train.checkpoint._Stack, "pop_to_mark", lambda self: calls.append(1) or pop_to_mark(self))
    with pytest.raises(CheckpointError, match=r"its pickle has more than 2,000,000 opcodes"):
        scan_pickle("x", _marks_after_tuples(300_000, 1_000_000))
    # PROTO and the tuples are 300,001 opcodes; the 2,000,001st, refused, is the 850,000th POP_MARK
    assert len(calls) == 849_999


def test_a_zip_with_two_pickles_of_one_name_is_refused(tmp_path: Path) -> None:
    """One reader takes the first, another the last: the scan and the load would see different pickles."""
    good = pickle.dumps({"model": {}}, protocol=2)
    buf = io.BytesIO(_archive(good))
    with zipfile.ZipFile(buf, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("archive/data.pkl", _shared_tuples(40))
    with pytest.raises(CheckpointError, match=r"member 'archive/data\.pkl' appears twice$"):
        load_checkpoint(_write(tmp_path, buf.getvalue()))


def test_torch_loads_the_members_the_gate_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What torch.load receives is an archive rebuilt from the members read and scanned, byte for byte."""
    path = tmp_path / "new.pt"
    save_checkpoint(path, _tiny_checkpoint())
    received = []
    real_load = train.checkpoint.torch.load
    monkeypatch.setattr(
        train.checkpoint.torch, "load", lambda f, **kw: received.append(f.getvalue()) or real_load(f, **kw)
    )
    load_checkpoint(path)
    with zipfile.ZipFile(path) as original, zipfile.ZipFile(io.BytesIO(received[0])) as loaded:
        assert sorted(loaded.namelist()) == sorted(original.namelist())
        assert all(loaded.read(name) == original.read(name) for name in original.namelist())


def test_a_state_dict_of_millions_of_keys_is_refused_before_unpickling(tmp_path: Path) -> None:
    data = _archive(pickle.dumps({"model": dict.fromkeys(range(3_000_000), 0)}, protocol=2))
    with pytest.raises(
        CheckpointError, match=r"x\.pt: not an asl-train checkpoint: its pickle has more than 2,000,000"
    ):
        load_checkpoint(_write(tmp_path, data))


def test_more_tensors_than_the_budget_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "new.pt"
    ckpt = _tiny_checkpoint()
    save_checkpoint(path, ckpt)
    monkeypatch.setattr(train.checkpoint, "MAX_TENSORS", len(ckpt["model"]) - 1)
    with pytest.raises(CheckpointError, match=f"it holds more than {len(ckpt['model']) - 1:,} tensors$"):
        load_checkpoint(path)
    monkeypatch.setattr(train.checkpoint, "MAX_TENSORS", len(ckpt["model"]))
    assert load_checkpoint(path)["label_map"] == ckpt["label_map"]


_STUCK_IN_C = """
import sys, torch, train.checkpoint
from pipeline.location import stop_commands_on_signals
stop_commands_on_signals()  # the Python handlers the command lines install
def load(*args, **kwargs):
    print("loading", flush=True)
    return sum(range(10**13))  # C code that never returns to the interpreter to run a Python handler
torch.load = load
train.checkpoint.load_checkpoint(sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_a_load_at_once(signum: int) -> None:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_IN_C, str(OLD)], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "loading\n"
        proc.send_signal(signum)
        assert proc.wait(timeout=120) == -signum
    finally:
        proc.kill()
        proc.wait()
