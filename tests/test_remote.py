"""Shards from anywhere: http(s) URLs and pipe: templates give the same training, evaluation and verification
as the local directory; shards that arrive short, altered, cut off or stalled stop the run with an error naming
them; two torchrun "nodes" train from an HTTP server.

Servers run on 127.0.0.1 in a thread of the test (tests/shard_server.py) and stop with it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from demo_data import demo_dataset, demo_shards
from shard_server import serve

from pipeline.cli import main as pipeline_cli
from pipeline.location import SCHEMES, Location, LocationError, Scheme
from pipeline.shards import read_manifest, read_shard
from train.cli import main as train_cli
from train.data import make_loader, train_val_folds

BIN = Path(sys.executable).parent
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("remote")
    return demo_shards(base, demo_dataset(base, sequences=300, signs=5, participants=6), shard_size=40, folds=3)


def train_args(location: str, out: Path, *extra: str) -> list[str]:
    return ["--shards", location, "--preset", "tiny", "--epochs", "1", "--batch-size", "32", "--workers", "1",
            "--device", "cpu", "--seed", "5", "--out", str(out), *extra]  # fmt: skip


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the timing column, which no two runs share."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def invoke(cli, args: list[str]):  # noqa: ANN001, ANN201 - click objects
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---------------------------------------------------------------- locations


@pytest.mark.parametrize(
    "spec,kind,url",
    [
        ("shards", "local", "shards/fold0-000000.tar"),
        ("file:///data/shards", "local", "/data/shards/fold0-000000.tar"),
        ("http://host:8000/asl/", "http", "http://host:8000/asl/fold0-000000.tar"),
        ("https://host/asl", "http", "https://host/asl/fold0-000000.tar"),
        ("pipe:aws s3 cp s3://b/asl/{} -", "pipe", "pipe:aws s3 cp s3://b/asl/fold0-000000.tar -"),
    ],
)
def test_location_kinds_and_urls(spec: str, kind: str, url: str) -> None:
    loc = Location.parse(spec)
    assert loc.kind == kind and loc.url("fold0-000000.tar") == url


@pytest.mark.parametrize(
    "spec,phrase",
    [("pipe:aws s3 cp s3://b/asl/x.tar -", "needs {}"), ("s3://bucket/asl", "pipe:aws s3 cp s3://bucket/asl/{} -")],
)
def test_unusable_location_says_what_to_write(spec: str, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase.replace("{}", r"\{\}")):
        Location.parse(spec)


@pytest.mark.parametrize("name", ["../manifest.json", "a;touch x", "sub/fold0.tar", ".hidden", ""])
def test_file_names_that_could_escape_are_refused(name: str) -> None:
    for spec in ("shards", "http://h/asl", "pipe:cat /x/{}"):
        with pytest.raises(ValueError, match="refused file name"):
            Location.parse(spec).url(name)


@pytest.mark.parametrize("command", ["verify", "stats"])
def test_an_unknown_scheme_is_one_line(command: str) -> None:
    result = invoke(pipeline_cli, [command, "s3://bucket/asl"])
    assert result.exit_code == 1
    assert result.output == (
        "Error: s3://bucket/asl: unsupported location scheme 's3'; use a directory or a file:, http:, https: or "
        "pipe: location, e.g. 'pipe:aws s3 cp s3://bucket/asl/{} -'\n"
    )


def test_a_new_scheme_is_one_reader_and_one_table_entry(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `mem://` kind whose reader serves the files of the shard directory: manifest, verify and shard reads work."""
    reads = []

    def read_mem(url: str, max_bytes: int | None, stall_s: float) -> bytes:
        reads.append(url)
        data = (shards / url.rsplit("/", 1)[1]).read_bytes()
        if max_bytes is not None and len(data) > max_bytes:
            raise LocationError(f"{url}: more than the {max_bytes} bytes expected")
        return data

    monkeypatch.setitem(SCHEMES, "mem", Scheme("mem", read_mem))
    loc = Location.parse("mem://store/asl/")
    assert (loc.kind, loc.is_local, loc.url("manifest.json")) == ("mem", False, "mem://store/asl/manifest.json")
    manifest = read_manifest(loc)
    assert manifest == read_manifest(shards)
    entry = manifest["shards"][0]
    assert read_shard(loc, entry) == (shards / entry["name"]).read_bytes()  # remote: size and sha256 checked
    result = invoke(pipeline_cli, ["verify", "mem://store/asl"])
    assert result.exit_code == 0 and f"OK: {len(manifest['shards'])} shards" in result.output, result.output
    assert reads[:2] == ["mem://store/asl/manifest.json", f"mem://store/asl/{entry['name']}"]


@pytest.mark.parametrize("kind", ["dir", "http", "pipe", "file"])
def test_unreadable_location_fails_at_once_naming_it(tmp_path: Path, kind: str) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {"dir": str(tmp_path / "nothing"), "http": f"http://127.0.0.1:{port}/asl",
            "pipe": f"pipe:cat {tmp_path}/nothing/{{}}", "file": f"file://{tmp_path}/nothing"}[kind]  # fmt: skip
    for cli, args in ((pipeline_cli, ["verify", spec]), (pipeline_cli, ["stats", spec]),
                      (train_cli, train_args(spec, tmp_path / "run"))):  # fmt: skip
        result = invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert "manifest.json" in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "run").exists()
    with pytest.raises((LocationError, FileNotFoundError)) as info:
        read_manifest(spec)
    reason = {"dir": "build-shards", "file": "build-shards", "http": "Failed to connect", "pipe": "No such file"}[kind]
    assert reason in str(info.value)


def test_stalled_server_is_abandoned_and_a_cut_connection_retried(shards: Path) -> None:
    name = read_manifest(shards)["shards"][0]["name"]
    entry = read_manifest(shards)["shards"][0]
    with serve(shards) as (url, faults, requests):
        loc = Location.parse(url)
        faults[name] = ("stall", 30)
        start = time.monotonic()
        with pytest.raises(LocationError, match=f"{name}: no data for 0.5 s"):
            read_shard(loc, entry, stall_s=0.5)
        assert time.monotonic() - start < 20, "the stalled read was not abandoned"
        faults[name] = ("drop", 1)  # cut once: the retry reads it whole
        requests.clear()
        assert len(read_shard(loc, entry, retries=1)) == entry["bytes"]
        assert requests == [name, name]
        faults[name] = ("drop", 3)
        with pytest.raises(LocationError, match=f"{name}: curl failed with exit status 18"):
            read_shard(loc, entry, retries=1)


# ---------------------------------------------------------------- same results from every location


@pytest.fixture(scope="module")
def local_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    result = invoke(train_cli, train_args(str(shards), out))
    assert result.exit_code == 0, result.output
    return out


def _evaluate(checkpoint: Path, location: str) -> str:
    result = invoke(train_cli, ["evaluate", "--checkpoint", checkpoint, "--shards", location, "--workers", "1",
                                "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_train_evaluate_verify_from_a_remote_location_equal_local(
    shards: Path, local_run: Path, tmp_path: Path, kind: str
) -> None:
    with serve(shards) as (url, _, requests):
        location = url if kind == "http" else f"pipe:cat {shards}/{{}}"
        out = tmp_path / "run"
        result = invoke(train_cli, train_args(location, out))
        assert result.exit_code == 0, result.output
        assert metrics(out) == metrics(local_run)  # same seed: every loss and accuracy to the last digit
        assert _evaluate(out / "last.pt", location) == _evaluate(local_run / "last.pt", str(shards))
        verified = invoke(pipeline_cli, ["verify", location])
        n = len(read_manifest(shards)["shards"])
        assert verified.exit_code == 0 and f"OK: {n} shards" in verified.output, verified.output
        stats = invoke(pipeline_cli, ["stats", location])
        assert stats.exit_code == 0 and stats.output == invoke(pipeline_cli, ["stats", shards]).output
    if kind == "http":
        assert "manifest.json" in requests and sum(r.endswith(".tar") for r in requests) >= n


# ---------------------------------------------------------------- shards that arrive wrong


def _corrupt(shards: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    """A copy of the shards with one training shard (fold 1) truncated or with one byte of a feature flipped."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    name = next(e["name"] for e in read_manifest(copy)["shards"] if e["fold"] == 1)
    victim = copy / name
    data = bytearray(victim.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        with tarfile.open(victim) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(".x.npy"))
        data[member.offset_data + 300] ^= 0x01  # still a valid tar of valid samples: only the digest tells
    victim.write_bytes(bytes(data))
    return copy, name


@pytest.mark.parametrize("how,reason", [("truncated", "bytes, manifest says"), ("flipped", "sha256 differs")])
def test_corrupt_shard_over_http_stops_training_naming_it(shards: Path, tmp_path: Path, how: str,
                                                           reason: str) -> None:  # fmt: skip
    copy, name = _corrupt(shards, tmp_path, how)
    with serve(copy) as (url, _, requests):
        out = tmp_path / "run"
        result = invoke(train_cli, train_args(url, out, "--io-retries", "1"))
        assert result.exit_code == 1, result.output
        assert f"{url}{name}: " in result.output and reason in result.output, result.output
        assert "Traceback" not in result.output and not (out / "last.pt").exists()
        assert requests.count(name) == 2  # read, then read once more: the wire may have been at fault
        verified = invoke(pipeline_cli, ["verify", url])
        assert verified.exit_code == 1 and name in verified.output and reason in verified.output


def test_local_shards_are_checked_by_size_unless_sha256_is_asked(shards: Path, tmp_path: Path) -> None:
    """auto: a local directory's shards are checked for size, keys, count and labels, not hashed."""
    copy, name = _corrupt(shards, tmp_path, "truncated")
    result = invoke(train_cli, train_args(str(copy), tmp_path / "run"))
    assert result.exit_code == 1 and name in result.output and "bytes, manifest says" in result.output
    copy, name = _corrupt(shards, tmp_path / "flipped", "flipped")
    assert invoke(train_cli, train_args(str(copy), tmp_path / "run2")).exit_code == 0  # same size: not hashed
    result = invoke(train_cli, train_args(str(copy), tmp_path / "run3", "--shard-check", "sha256"))
    assert result.exit_code == 1 and name in result.output and "sha256 differs" in result.output


def test_a_cut_connection_is_retried_and_the_epoch_is_whole(shards: Path, local_run: Path, tmp_path: Path) -> None:
    manifest = read_manifest(shards)
    names = [e["name"] for e in manifest["shards"] if e["fold"] != 0]
    with serve(shards) as (url, faults, requests):
        for name in names[:3]:
            faults[name] = ("drop", 1)
        out = tmp_path / "run"
        result = invoke(train_cli, train_args(url, out, "--io-retries", "1"))
        assert result.exit_code == 0, result.output
        assert all(requests.count(n) >= 2 for n in names[:3])
    assert metrics(out) == metrics(local_run)


# ---------------------------------------------------------------- several machines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_from_http(shards: Path, tmp_path: Path) -> None:
    """torchrun --nnodes=2 run twice on this machine (gloo, CPU), shards served over HTTP on 127.0.0.1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    reports = tmp_path / "reports"
    reports.mkdir()
    with serve(shards) as (url, _, _):
        procs = []
        for node in range(2):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=asl-test",
                   "--local-addr=127.0.0.1", str(TESTS / "ddp_check.py"), url, str(tmp_path / f"out{node}"),
                   str(reports)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = []
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=300)[0])
            finally:
                proc.kill()
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    by_rank = {r["rank"]: r for r in (json.loads((reports / f"ddp_rank{i}.json").read_text()) for i in (0, 1))}
    train_folds, _ = train_val_folds(read_manifest(shards), [0])
    per_rank = len(make_loader(shards, train_folds, 16, train=True, workers=0, rank=0, world_size=2))
    assert [by_rank[r]["batches"] for r in (0, 1)] == [per_rank, per_rank]  # equal batches on both nodes
    assert by_rank[0]["sha256"] == by_rank[1]["sha256"]  # identical weights after training
    rank0_out, rank1_out = Path(by_rank[0]["out"]), Path(by_rank[1]["out"])
    assert (rank0_out / "last.pt").exists() and (rank0_out / "metrics.jsonl").exists()
    assert not rank1_out.exists(), "a rank other than 0 wrote files"


def test_ddp_ranks_stop_together_on_a_corrupt_shard(shards: Path, tmp_path: Path) -> None:
    """Two processes, one of them reading a corrupt shard: both exit 1 with the same one-line error, no hang."""
    copy, name = _corrupt(shards, tmp_path, "flipped")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(BIN / "asl-train"), *train_args(str(copy), tmp_path / "run", "--workers", "0",
                                               "--shard-check", "sha256")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]
    assert name in errors[0] and "sha256 differs" in errors[0]
    for noise in ("train/loop.py", "ProcessGroupGloo", "terminate called"):  # no worker traceback, no abort
        assert noise not in proc.stderr, proc.stderr[-3000:]


def test_ddp_ranks_stop_together_when_rank0_cannot_write_the_run(shards: Path, tmp_path: Path) -> None:
    """Only rank 0 writes; when it cannot (here --out lies under a file), every rank stops with its message."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(BIN / "asl-train"), *train_args(str(shards), blocker / "run", "--workers", "0")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert proc.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]
    assert errors[0].startswith(f"Error: rank 0: {blocker / 'run'}: cannot write the run directory")
