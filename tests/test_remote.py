"""Shards from anywhere: http(s) URLs and pipe: templates give the same training, evaluation and verification
as the local directory; shards that arrive short, altered, cut off or stalled stop the run with an error naming
them; two torchrun "nodes" train from an HTTP server.

Servers run on 127.0.0.1 in a thread of the test (tests/shard_server.py) and stop with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner
from demo_data import demo_dataset, demo_shards
from shard_server import serve

from pipeline.cli import main as pipeline_cli
from pipeline.location import SCHEMES, Location, LocationError, Scheme, read_command
from pipeline.policy import ReadPolicy
from pipeline.shards import MANIFEST_MAX_BYTES, manifest_problem, max_shard_bytes, read_manifest, read_shard
from train.cli import main as train_cli
from train.data import make_loader, train_val_folds

BIN = Path(sys.executable).parent
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("remote")
    return demo_shards(base, demo_dataset(base, sequences=300, signs=5, participants=6), shard_size=40, folds=3)


def train_args(location: str, out: Path, *extra: str) -> list[str]:
    return [
        "--shards",
        location,
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--seed",
        "5",
        "--out",
        str(out),
        *extra,
    ]


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

    def read_mem(url: str, max_bytes: int | None, policy: ReadPolicy) -> bytes:
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


@pytest.mark.parametrize("kind", ["dir", "http", pytest.param("pipe", marks=pytest.mark.slow), "file"])
def test_unreadable_location_fails_at_once_naming_it(tmp_path: Path, kind: str) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {
        "dir": str(tmp_path / "nothing"),
        "http": f"http://127.0.0.1:{port}/asl",
        "pipe": f"pipe:cat {tmp_path}/nothing/{{}}",
        "file": f"file://{tmp_path}/nothing",
    }[kind]
    for cli, args in (
        (pipeline_cli, ["verify", spec]),
        (pipeline_cli, ["stats", spec]),
        (train_cli, train_args(spec, tmp_path / "run")),
    ):
        result = invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert "manifest.json" in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "run").exists()
    with pytest.raises((LocationError, FileNotFoundError)) as info:
        read_manifest(spec)
    reason = {"dir": "build-shards", "file": "build-shards", "http": "Connection refused", "pipe": "No such file"}[kind]
    assert reason in str(info.value)


def test_stalled_server_is_abandoned_and_a_cut_connection_retried(shards: Path) -> None:
    name = read_manifest(shards)["shards"][0]["name"]
    entry = read_manifest(shards)["shards"][0]
    with serve(shards) as (url, faults, requests):
        loc = Location.parse(url)
        faults[name] = ("stall", 30)
        start = time.monotonic()
        with pytest.raises(LocationError, match=f"{name}: no data for 0.5 s"):
            read_shard(loc, entry, policy=ReadPolicy(stall_s=0.5, retries=0))
        assert time.monotonic() - start < 20, "the stalled read was not abandoned"
        faults[name] = ("drop", 1)  # cut once: the retry reads it whole
        requests.clear()
        assert len(read_shard(loc, entry, policy=ReadPolicy(retries=1))) == entry["bytes"]
        assert requests == [name, name]
        faults[name] = ("drop", 3)
        with pytest.raises(LocationError, match=f"{name}: Connection broken: IncompleteRead"):
            read_shard(loc, entry, policy=ReadPolicy(retries=1))


# ---------------------------------------------------------------- same results from every location


@pytest.fixture(scope="module")
def local_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    result = invoke(train_cli, train_args(str(shards), out))
    assert result.exit_code == 0, result.output
    return out


def _evaluate(checkpoint: Path, location: str) -> str:
    result = invoke(
        train_cli, ["evaluate", "--checkpoint", checkpoint, "--shards", location, "--workers", "1", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    return "\n".join(line for line in result.output.splitlines() if not line.startswith("checkpoint "))  # its path


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("how,reason", [("truncated", "bytes, manifest says"), ("flipped", "sha256 differs")])
def test_corrupt_shard_over_http_stops_training_naming_it(shards: Path, tmp_path: Path, how: str, reason: str) -> None:
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


@pytest.mark.slow
def test_local_shards_are_checked_by_size_unless_sha256_is_asked(shards: Path, tmp_path: Path) -> None:
    """auto: a local directory's shards are checked for size, keys, count and labels, not hashed."""
    copy, name = _corrupt(shards, tmp_path, "truncated")
    result = invoke(train_cli, train_args(str(copy), tmp_path / "run"))
    assert result.exit_code == 1 and name in result.output and "bytes, manifest says" in result.output
    copy, name = _corrupt(shards, tmp_path / "flipped", "flipped")
    assert invoke(train_cli, train_args(str(copy), tmp_path / "run2")).exit_code == 0  # same size: not hashed
    result = invoke(train_cli, train_args(str(copy), tmp_path / "run3", "--shard-check", "sha256"))
    assert result.exit_code == 1 and name in result.output and "sha256 differs" in result.output


@pytest.mark.slow
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


@pytest.mark.slow
def test_two_nodes_train_from_http(shards: Path, tmp_path: Path) -> None:
    """torchrun --nnodes=2 run twice on this machine (gloo, CPU), shards served over HTTP on 127.0.0.1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    reports = tmp_path / "reports"
    reports.mkdir()
    with serve(shards) as (url, _, _):
        procs = []
        for node in range(2):
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=asl-test",
                "--local-addr=127.0.0.1",
                str(TESTS / "ddp_check.py"),
                url,
                str(tmp_path / f"out{node}"),
                str(reports),
            ]
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


@pytest.mark.slow
def test_ddp_ranks_stop_together_on_a_corrupt_shard(shards: Path, tmp_path: Path) -> None:
    """Two processes, one of them reading a corrupt shard: both exit 1 with the same one-line error, no hang."""
    copy, name = _corrupt(shards, tmp_path, "flipped")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(BIN / "asl-train"),
        *train_args(str(copy), tmp_path / "run", "--workers", "0", "--shard-check", "sha256"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]
    assert name in errors[0] and "sha256 differs" in errors[0]
    for noise in ("train/loop.py", "ProcessGroupGloo", "terminate called"):  # no worker traceback, no abort
        assert noise not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_rank0_cannot_write_the_run(shards: Path, tmp_path: Path) -> None:
    """Only rank 0 writes; when it cannot (here --out lies under a file), every rank stops with its message."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(BIN / "asl-train"),
        *train_args(str(shards), blocker / "run", "--workers", "0"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert proc.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]
    assert errors[0].startswith(f"Error: rank 0: {blocker / 'run'}: cannot "), errors[0]  # write, or create it


# ---------------------------------------------------------------- bounded memory and time for every remote read


def _slow_script(tmp_path: Path, shards: Path, body: str) -> str:
    """A pipe: location whose command serves the manifest from `shards` and runs `body` (sh) for any shard."""
    script = tmp_path / "serve.sh"
    script.write_text(
        f'case "$1" in manifest.json) exec cat {shards}/manifest.json;; esac\necho $$ >> {tmp_path}/pids\n{body}\n'
    )
    return f"pipe:exec sh {script} {{}}"  # exec: no outer shell holding stdout open


def _gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie has: the init of a container may never reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


@pytest.mark.slow
def test_an_endless_manifest_is_refused_at_its_cap(shards: Path) -> None:
    with serve(shards) as (url, faults, _):
        faults["manifest.json"] = ("endless", 0)
        with pytest.raises(LocationError, match=f"more than the {MANIFEST_MAX_BYTES} bytes expected"):
            read_manifest(url)
    with pytest.raises(LocationError, match=f"more than the {MANIFEST_MAX_BYTES} bytes expected"):
        read_manifest("pipe:yes #{}")


def test_a_shard_cannot_declare_more_bytes_than_its_samples_can_take(shards: Path) -> None:
    manifest = read_manifest(shards)
    for entry in manifest["shards"]:  # the real shards lie within the bound, and not far below it
        bound = max_shard_bytes(entry, manifest["config"], max(map(len, manifest["label_map"])))
        assert entry["bytes"] <= bound < 4 * entry["bytes"]
    edited = json.loads(json.dumps(manifest))
    edited["shards"][1]["bytes"] = 10**12
    assert manifest_problem(edited) == (
        f"shards[1] ('{edited['shards'][1]['name']}'): declares 1000000000000 bytes, "
        f"more than its {edited['shards'][1]['samples']} samples can take "
        f"({max_shard_bytes(edited['shards'][1], manifest['config'], 5)})"
    )


@pytest.mark.slow
def test_a_commands_stderr_is_kept_to_its_last_bytes(tmp_path: Path) -> None:
    """50 MB of stderr: memory stays small, and the message is its last line."""
    cmd = "head -c 50000000 /dev/zero | tr '\\0' x >&2; printf '\\nthe last words\\n' >&2; exit 3"
    tracemalloc.start()
    try:
        with pytest.raises(LocationError, match="exit status 3: the last words$"):
            read_command("cmd", cmd, None, ReadPolicy(5, 0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"{peak} bytes held for 50 MB of stderr"


@pytest.mark.slow
def test_a_trickle_is_abandoned_at_the_minimum_rate(shards: Path, tmp_path: Path) -> None:
    """Bytes keep coming, so the stall limit never fires: the average rate does (http and pipe:)."""
    entry = read_manifest(shards)["shards"][0]
    with serve(shards) as (url, faults, _):
        faults[entry["name"]] = ("trickle", 0.05)
        start = time.monotonic()
        with pytest.raises(LocationError, match=r"below the minimum rate of 1000 kB/s \(--io-min-rate\); abandoned"):
            read_shard(Location.parse(url), entry, policy=ReadPolicy(stall_s=1, min_rate=1e6, retries=0))
        assert time.monotonic() - start < 15  # its deadline: 1 s + 1.3 MB / 1 MB/s; at 20 B/s the rest takes 18 h
    loc = Location.parse(_slow_script(tmp_path, shards, "while :; do printf x; sleep 0.1; done"))
    with pytest.raises(LocationError, match="below the minimum rate"):
        read_shard(loc, entry, policy=ReadPolicy(stall_s=1, min_rate=1000, retries=0))
    assert _gone(int((tmp_path / "pids").read_text().split()[0]))


def test_the_manifest_read_has_the_io_timeout(shards: Path) -> None:
    with serve(shards) as (url, faults, _):
        faults["manifest.json"] = ("stall", 30)
        start = time.monotonic()
        result = invoke(train_cli, train_args(url, Path("unused"), "--io-timeout", "0.5"))
        assert result.exit_code == 1 and "manifest.json: no data for 0.5 s" in result.output, result.output
        assert time.monotonic() - start < 15


@pytest.mark.slow
def test_a_command_that_closes_its_output_but_runs_on_is_an_error_and_retried(
    shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = read_manifest(shards)["shards"][0]
    loc = Location.parse(_slow_script(tmp_path, shards, f'cat {shards}/"$1"; exec >&-; exec sleep 60'))
    with pytest.raises(LocationError, match="closed its output but did not exit within 0.5 s; stopped"):
        read_shard(loc, entry, policy=ReadPolicy(stall_s=0.5, retries=1))
    assert "attempt 1 of 2; retrying" in caplog.text
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2 and all(map(_gone, pids))  # each attempt's command killed, none left running


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_slow_read_stops_training_and_its_command_at_once(
    shards: Path, tmp_path: Path, signum: int
) -> None:
    """--workers 0, a shard read that would take a minute: Ctrl-C (or SIGTERM) ends the run within seconds and
    the command (and its children) with it."""
    location = _slow_script(tmp_path, shards, 'sleep 60 & echo $! >> "$(dirname "$0")/pids"; wait')
    cmd = [str(BIN / "asl-train"), *train_args(location, tmp_path / "run", "--workers", "0")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = tmp_path / "pids"
    deadline = time.monotonic() + 120
    while (not pids.exists() or len(pids.read_text().split()) < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids.exists(), proc.communicate()[1][-2000:]
    time.sleep(0.5)
    start = time.monotonic()
    proc.send_signal(signum)
    proc.communicate(timeout=30)
    assert time.monotonic() - start < 5, "the run went on reading"
    time.sleep(0.2)
    assert all(_gone(int(p)) for p in pids.read_text().split()), "the command outlived the run"


@pytest.mark.parametrize("name", ["fold\u0660-000000.tar", "fold0-\uff10\uff10\uff10\uff10\uff10\uff10.tar"])
def test_shard_names_take_ascii_digits_only(shards: Path, name: str) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    assert manifest_problem(manifest).endswith("name must be foldK-NNNNNN.tar, K its fold")


@pytest.mark.parametrize(
    "edit,key",
    [(("totals", "bytes"), "totals"), (("folds", 0, "participants"), "every fold"), (("lengths",), "lengths")],
)
def test_stats_and_verify_on_a_manifest_without_summaries(shards: Path, tmp_path: Path, edit: tuple, key: str) -> None:
    """stats needs them: one line naming the manifest; verify does not (it counts from the shard entries)."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    parent = manifest
    for k in edit[:-1]:
        parent = parent[k]
    del parent[edit[-1]]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    stats = invoke(pipeline_cli, ["stats", copy])
    assert stats.exit_code == 1 and stats.output.startswith(f"Error: {copy / 'manifest.json'}: {key}"), stats.output
    assert len(stats.output.splitlines()) == 1
    verified = invoke(pipeline_cli, ["verify", copy])
    assert verified.exit_code == 0 and f"OK: {len(manifest['shards'])} shards" in verified.output, verified.output


@pytest.mark.slow
def test_remote_text_is_escaped_before_it_is_printed(shards: Path, tmp_path: Path) -> None:
    """A server's reason phrase, a command's stderr and a manifest's sign names never reach the terminal raw."""
    entry = read_manifest(shards)["shards"][0]
    with serve(shards) as (url, faults, _):
        faults[entry["name"]] = ("status", 503)
        with pytest.raises(LocationError) as info:
            read_shard(Location.parse(url), entry, policy=ReadPolicy(retries=0))
    assert str(info.value).endswith("HTTP 503 \\x1b]0;owned\\x07\\x1b[2J busy\\rforged")
    loc = Location.parse(_slow_script(tmp_path, shards, "printf '\\033]0;owned\\007 no\\rsuch file\\n' >&2; exit 2"))
    with pytest.raises(LocationError) as info:
        read_shard(loc, entry, policy=ReadPolicy(retries=0))
    assert str(info.value).endswith("exit status 2: \\x1b]0;owned\\x07 no\\rsuch file")
    manifest = json.loads((shards / "manifest.json").read_text())
    sign = next(iter(manifest["label_map"]))
    manifest["label_map"]["\x1b[2Jevil\nINFO forged"] = manifest["label_map"].pop(sign)
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = invoke(pipeline_cli, ["stats", copy])
    assert result.exit_code == 1 and "\x1b" not in result.output and len(result.output.splitlines()) == 1
    assert "label_map sign '\\x1b[2Jevil\\nINFO forged' is empty or holds control characters" in result.output


# ---------------------------------------------------------------- the shard cache


@pytest.mark.slow
def test_three_epochs_over_http_with_a_cache_fetch_each_shard_once(
    shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Same metrics as the local directory; one request per shard in all; a cached shard altered on disk is
    fetched again (said once), and offline it is refused with its name."""
    local = tmp_path / "local"
    assert invoke(train_cli, train_args(str(shards), local, "--epochs", "3")).exit_code == 0
    cache = tmp_path / "cache"
    names = [e["name"] for e in read_manifest(shards)["shards"] if e["samples"]]
    with serve(shards) as (url, faults, requests):
        result = invoke(train_cli, train_args(url, tmp_path / "a", "--epochs", "3", "--cache-dir", cache))
        assert result.exit_code == 0, result.output
        assert metrics(tmp_path / "a") == metrics(local)
        assert sorted(r for r in requests if r.endswith(".tar")) == sorted(names)  # 3 epochs, one fetch each
        (victim,) = [p for p in cache.glob("*/fold1-*.tar")][:1]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(data)  # same size: its mtime no longer the stored one, so it is hashed
        requests.clear()
        result = invoke(
            train_cli, train_args(url, tmp_path / "b", "--epochs", "3", "--cache-dir", cache, "--workers", "0")
        )  # in this process: its warning is captured (the same batches)
        assert result.exit_code == 0 and metrics(tmp_path / "b") == metrics(local), result.output
        assert [r for r in requests if r.endswith(".tar")] == [victim.name]
        assert caplog.text.count(f"cached copy of {url}{victim.name} differs") == 1
        victim.write_bytes(data)  # altered again, and now the server cannot give it: refused, naming it
        faults[victim.name] = ("status", 404)
        result = invoke(train_cli, train_args(url, tmp_path / "c", "--cache-dir", cache, "--io-retries", "0"))
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"{url}{victim.name}: HTTP 404" in result.output


@pytest.mark.parametrize(
    "setting,message",
    [
        ("file", "the cache directory is a file, not a directory"),
        ("limit", "is smaller than a shard"),
        ("holds the run", "the cache directory holds the run's output directory"),
        ("holds other files", "not a shard cache directory (no .asl-shard-cache file) and not empty"),
    ],
)
def test_an_unusable_cache_setting_is_one_line_before_training(
    shards: Path, tmp_path: Path, setting: str, message: str
) -> None:
    cache = tmp_path / "cache"
    extra = ["--cache-dir", cache, "--cache-limit", "0.00001" if setting == "limit" else "1"]
    if setting == "file":
        cache.write_text("not a directory")
    elif setting == "holds the run":
        extra[1] = tmp_path
    elif setting == "holds other files":
        cache.mkdir()
        (cache / "notes.txt").write_text("mine")
    with serve(shards) as (url, _, requests):
        result = invoke(train_cli, train_args(url, tmp_path / "run", *extra))
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert not any(r.endswith(".tar") for r in requests)
    if setting == "holds other files":
        assert [p.name for p in cache.iterdir()] == ["notes.txt"] and (cache / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_local_directory_is_never_cached(shards: Path, tmp_path: Path) -> None:
    result = invoke(train_cli, train_args(str(shards), tmp_path / "run", "--cache-dir", tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.tar"))


@pytest.mark.slow
def test_evaluate_and_verify_read_through_the_cache(shards: Path, local_run: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with serve(shards) as (url, _, requests):
        verified = invoke(pipeline_cli, ["verify", url, "--cache-dir", cache])
        assert verified.exit_code == 0, verified.output
        fetched = len([r for r in requests if r.endswith(".tar")])
        assert fetched == len(read_manifest(shards)["shards"])
        evaluated = invoke(
            train_cli,
            [
                "evaluate",
                "--checkpoint",
                local_run / "last.pt",
                "--shards",
                url,
                "--workers",
                "1",
                "--device",
                "cpu",
                "--cache-dir",
                cache,
            ],
        )
        assert evaluated.exit_code == 0, evaluated.output
        assert len([r for r in requests if r.endswith(".tar")]) == fetched  # every shard a cache hit
    assert _evaluate(local_run / "last.pt", str(shards)) in evaluated.output
