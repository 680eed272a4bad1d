"""Benchmark `asl-pipeline build-shards` against the bare read rate and the per-sample baseline, in one run.

Measures, on the same demo files (generated once, or `--data-dir` to reuse a Kaggle-layout directory):

(a) bare read: `pyarrow.parquet.read_table(path, columns=["x", "y", "z"])` on every file, one process;
(b) baseline: what users do today, one file at a time in one process: `pandas.read_parquet(path)`,
    `df[["x", "y", "z"]].values.reshape(-1, 543, 3)`, then `pipeline.features.preprocess`;
(c) `asl-pipeline build-shards` (the CLI, in a subprocess, fresh output directory, `--force`) at each
    `--jobs`: the whole process as a user runs it (start-up included), and beside it the build's own timer
    (interpreter start-up and imports excluded).

Then bytes on disk per sample against `L x 118 x 6 x 2` (float16 compact), and the peak RSS of the build
(`getrusage(RUSAGE_CHILDREN).ru_maxrss` of a wrapper process around each build: the largest single process
of the build tree, joblib's loky workers included) at N files and at `--scale` x N rows: a train.csv
listing `--scale` hard links to each of the N parquet files under distinct sequence_ids, so no extra
data needs generating. Every file is read once before timing, so all measurements see a warm page cache.

(d) with `--compare-code DIR` (another checkout, e.g. `git worktree add /tmp/base main`): each checkout's
whole `build-shards` process (`python -m pipeline.cli` run from that checkout, start-up included) and one
`build_shards` call of its own `pipeline` (timed around the call), alternating with this one `--rounds`
times, so that the cost of a code change is a ratio of medians measured in one run.

(e) start-up: `asl-pipeline --help` (each checkout's) against a bare `python -c "import pyarrow.parquet"`,
best of `--rounds`.

    python bench/build.py                      # 2,000 sequences, --jobs 1 and 2
    python bench/build.py --quick              # 300-sequence smoke run
    python bench/build.py --data-dir demo/data --jobs-list 1,2,4
    python bench/build.py --compare-code /tmp/base --rounds 5

Numbers depend on the machine and on whatever else runs on it: read them as ratios measured in one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BYTES_PER_FRAME = 118 * 6 * 2  # float16 compact: L x 118 x 6 x 2 bytes a sample
TARGET_VS_READ = 1.5
TARGET_VS_BASELINE = 10.0
TARGET_BYTES = 0.15
TARGET_MEMORY = 1.25  # "the same": peak at scale x N files within 25% of the peak at N

# Runs one command and prints its exit status, wall time and the peak RSS of its process tree (kB).
_WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "wall = time.perf_counter() - t\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'rc': p.returncode, 'wall': wall, 'maxrss_kb': u.ru_maxrss, 'stdout': p.stdout,"
    " 'stderr': p.stderr[-4000:]}))\n"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=2000, help="demo sequences to generate (default 2000)")
    ap.add_argument("--quick", action="store_true", help="a 300-sequence smoke run")
    ap.add_argument("--jobs-list", default="1,2", help="comma-separated --jobs values to build with (default 1,2)")
    ap.add_argument("--data-dir", type=Path, help="reuse this Kaggle-layout directory instead of generating one")
    ap.add_argument("--work-dir", type=Path, help="where to put generated data and shards (default: a temp dir)")
    ap.add_argument("--scale", type=int, default=10, help="rows multiplier for the peak-memory build (default 10)")
    ap.add_argument(
        "--shard-size",
        type=int,
        default=100,
        help="build-shards --shard-size (default 100: 20 shards for 2,000 files, so that every worker "
        "stays busy; the CLI's default 500 gives 2,000 files only 5 shards)",
    )
    ap.add_argument("--signs", type=int, default=25)
    ap.add_argument("--participants", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--compare-code",
        type=Path,
        help="another checkout of this project: time its build-shards against this one's, alternating",
    )
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the --compare-code builds (default 3)")
    ap.add_argument(
        "--compare-jobs",
        default="1,2",
        help="comma-separated --jobs values for the --compare-code builds (default 1,2)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.sequences = 300
    args.jobs = [int(j) for j in args.jobs_list.split(",") if j.strip()]
    args.compare_jobs = [int(j) for j in args.compare_jobs.split(",") if j.strip()]
    if args.compare_code and not (args.compare_code / "pipeline" / "cli.py").exists():
        ap.error(f"--compare-code {args.compare_code}: no pipeline/cli.py there")
    return args


def read_rows(data_dir: Path) -> list[dict[str, str]]:
    with open(data_dir / "train.csv", newline="") as f:
        return list(csv.DictReader(f))


def ensure_data(args: argparse.Namespace, work: Path) -> Path:
    if args.data_dir:
        return args.data_dir
    from pipeline.demo import write_demo_dataset

    data = work / f"data-{args.sequences}"
    if (data / "train.csv").exists() and len(read_rows(data)) == args.sequences:
        print(f"reusing {data}")
        return data
    start = time.perf_counter()
    write_demo_dataset(
        data,
        sequences=args.sequences,
        signs=args.signs,
        participants=args.participants,
        seed=0,
        jobs=os.cpu_count() or 1,
    )
    print(f"generated {args.sequences} demo sequences in {time.perf_counter() - start:.1f}s -> {data}")
    return data


def scaled_data(data: Path, rows: list[dict[str, str]], scale: int, out: Path) -> Path:
    """A data dir whose train.csv lists `scale` names of each parquet file under distinct sequence ids.

    The names are hard links (copies where links fail): the build refuses a file named twice in
    train.csv and symlinks that resolve outside the data directory, while hard links are distinct files.
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("sign_to_prediction_index_map.json",):
        if (data / name).exists():
            shutil.copyfile(data / name, out / name)
    offset = 10 ** max(len(r["sequence_id"]) for r in rows)
    with open(out / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "participant_id", "sequence_id", "sign"], extrasaction="ignore")
        writer.writeheader()
        for k in range(scale):
            for r in rows:
                path = r["path"].removesuffix(".parquet") + f"-{k}.parquet"
                dst = out / path
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(data / r["path"], dst)
                except OSError:
                    shutil.copyfile(data / r["path"], dst)
                writer.writerow({**r, "path": path, "sequence_id": str(int(r["sequence_id"]) + k * offset)})
    return out


def bare_read(paths: list[Path]) -> float:
    import pyarrow.parquet as pq

    start = time.perf_counter()
    for p in paths:
        pq.read_table(p, columns=["x", "y", "z"])
    return time.perf_counter() - start


def baseline(paths: list[Path]) -> float:
    import pandas as pd

    from pipeline.features import preprocess

    start = time.perf_counter()
    for p in paths:
        df = pd.read_parquet(p)
        xyz = df[["x", "y", "z"]].values.reshape(-1, 543, 3)
        preprocess(xyz)
    return time.perf_counter() - start


def run_build(data: Path, out: Path, jobs: int, shard_size: int) -> dict:
    """build-shards in a wrapper process; returns rc, wall, build seconds (its own timer), peak RSS, manifest."""
    if out.exists():
        shutil.rmtree(out)
    options = ["--jobs", str(jobs), "--shard-size", str(shard_size), "--dtype", "float16", "--layout", "compact"]
    cmd = [sys.executable, "-m", "pipeline.cli", "build-shards", "--data-dir", str(data), "--out", str(out)]
    cmd += [*options, "--force"]
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    if result["rc"] not in (0, 3):
        raise SystemExit(f"build-shards failed (rc {result['rc']}):\n{result['stdout']}\n{result['stderr']}")
    match = re.search(r"rejected (\d+), ([\d.]+)s", result["stdout"])
    result["seconds"] = float(match.group(2)) if match else result["wall"]
    result["manifest"] = json.loads((out / "manifest.json").read_text())
    return result


# Times `build_shards` of the checkout in sys.argv[1] (its own API, in its own process; imports excluded).
_TIMED_BUILD = (
    "import sys, time\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from pipeline.build import BuildOptions, build_shards\n"
    "data, out, jobs, shard_size = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])\n"
    "t = time.perf_counter()\n"
    "build_shards(data, out, BuildOptions(shard_size=shard_size), jobs=jobs, force=True)\n"
    "print(time.perf_counter() - t)\n"
)


def timed_build(code: Path, data: Path, out: Path, jobs: int, shard_size: int) -> float:
    """Seconds of one fresh build_shards call of the checkout `code` into `out`."""
    if out.exists():
        shutil.rmtree(out)
    argv = [sys.executable, "-c", _TIMED_BUILD, str(code), str(data), str(out), str(jobs), str(shard_size)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=code)
    if proc.returncode:
        raise SystemExit(f"build_shards of {code} failed:\n{proc.stderr[-4000:]}")
    return float(proc.stdout.split()[-1])


def whole_build(code: Path, data: Path, out: Path, jobs: int, shard_size: int) -> float:
    """Wall seconds of one fresh `build-shards` process of the checkout `code`, start-up included."""
    if out.exists():
        shutil.rmtree(out)
    argv = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "build-shards",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--jobs",
        str(jobs),
        "--shard-size",
        str(shard_size),
        "--force",
    ]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=code, env=_env(code))
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise SystemExit(f"build-shards of {code} failed:\n{proc.stderr[-4000:]}")
    return seconds


def _env(code: Path) -> dict[str, str]:
    """The environment that makes `python -m pipeline.cli` import the checkout `code`'s package (before any other)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}


def compare_code(data: Path, work: Path, args: argparse.Namespace) -> dict[tuple[str, int], dict[str, list[float]]]:
    """Seconds of this checkout and of `--compare-code`, alternating the order each round, per (measure, --jobs).

    The measures: "whole" (a `build-shards` process, start-up included) and "call" (`build_shards` alone).
    """
    times: dict[tuple[str, int], dict[str, list[float]]] = {}
    for jobs in args.compare_jobs:
        for measure, fn in (("whole", whole_build), ("call", timed_build)):
            times[measure, jobs] = {"this": [], "other": []}
            for r in range(args.rounds):
                for who in ("this", "other") if r % 2 == 0 else ("other", "this"):
                    code = ROOT if who == "this" else args.compare_code.resolve()
                    seconds = fn(code, data, work / f"compare-{who}", jobs, args.shard_size)
                    times[measure, jobs][who].append(seconds)
    for who in ("this", "other"):
        shutil.rmtree(work / f"compare-{who}", ignore_errors=True)
    return times


def startup_seconds(commands: dict[str, tuple[list[str], Path]], rounds: int) -> dict[str, float]:
    """Best wall seconds of each command (argv, run from a checkout), interleaved over `rounds`."""
    best = dict.fromkeys(commands, float("inf"))
    for _ in range(rounds):
        for name, (argv, code) in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True, cwd=code, env=_env(code))
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def plan_seconds(data: Path) -> tuple[int, float]:
    """Rows and seconds of this checkout's plan stage (train.csv and label map gates, then the file system gate)."""
    from pipeline.build import read_index, resolve_sources
    from pipeline.read import MAX_FILE_MB, MB

    start = time.perf_counter()
    index = read_index(data)
    resolve_sources(index.rows, data, MAX_FILE_MB * MB)
    return len(index.rows), time.perf_counter() - start


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="asl-bench-build-"))
    work.mkdir(parents=True, exist_ok=True)
    total_start = time.perf_counter()
    try:
        data = ensure_data(args, work)
        rows = read_rows(data)
        paths = [data / r["path"] for r in rows]
        n = len(paths)
        for p in paths:  # warm the page cache so that every measurement reads from memory
            p.read_bytes()

        t_read = bare_read(paths)
        t_base = baseline(paths)
        read_rate, base_rate = n / t_read, n / t_base

        builds = {}
        for jobs in args.jobs:
            builds[jobs] = run_build(data, work / f"shards-j{jobs}", jobs, args.shard_size)
        shas = {j: [s["sha256"] for s in b["manifest"]["shards"]] for j, b in builds.items()}
        identical = len({tuple(v) for v in shas.values()}) == 1

        ref_jobs = 2 if 2 in builds else max(builds)
        manifest = builds[ref_jobs]["manifest"]
        totals = manifest["totals"]
        samples = totals["samples"]
        ideal = totals["real_frames"] * BYTES_PER_FRAME
        bytes_ratio = totals["bytes"] / ideal
        for jobs in builds:  # keep one build's shards for inspection only
            if jobs != ref_jobs:
                shutil.rmtree(work / f"shards-j{jobs}", ignore_errors=True)

        scaled = scaled_data(data, rows, args.scale, work / f"data-x{args.scale}")
        big = run_build(scaled, work / f"shards-x{args.scale}", ref_jobs, args.shard_size)
        shutil.rmtree(work / f"shards-x{args.scale}", ignore_errors=True)
        small_rss, big_rss = builds[ref_jobs]["maxrss_kb"] / 1024, big["maxrss_kb"] / 1024
        rss_ratio = big_rss / small_rss
        big_samples = big["manifest"]["totals"]["samples"]

        print()
        print(
            f"build-shards benchmark: {n} files ({samples} written, {totals['rejected']} rejected), "
            f"mean stored length {totals['real_frames'] / max(samples, 1):.1f} frames, "
            f"{os.cpu_count()} CPUs, shard size {args.shard_size}"
        )
        print(f"{'measure':<46}{'seconds':>9}{'files/s':>10}{'x bare read':>13}{'x baseline':>12}{'peak RSS':>11}")

        def line(name: str, seconds: float, rate: float, rss: str = "") -> None:
            print(f"{name:<46}{seconds:>9.2f}{rate:>10.0f}{rate / read_rate:>13.2f}{rate / base_rate:>12.2f}{rss:>11}")

        line("(a) bare read: pyarrow x,y,z, 1 process", t_read, read_rate)
        line("(b) baseline: pandas + reshape + preprocess", t_base, base_rate)
        for jobs, b in builds.items():
            rss = f"{b['maxrss_kb'] / 1024:.0f} MB"
            line(f"(c) build-shards --jobs {jobs}, whole process", b["wall"], n / b["wall"], rss)
            line("    the same, in-process (the build's own timer)", b["seconds"], n / b["seconds"])
        line(
            f"    build-shards --jobs {ref_jobs}, {big_samples} rows (x{args.scale}), whole",
            big["wall"],
            big_samples / big["wall"],
            f"{big_rss:.0f} MB",
        )
        line("    the same, in-process", big["seconds"], big_samples / big["seconds"])
        rows_planned, t_plan = plan_seconds(scaled)
        print(
            f"    plan stage (train.csv, label map and file checks), {rows_planned} rows, 1 process: "
            f"{t_plan:.2f}s = {t_plan / rows_planned * 1e6:.1f} us a row"
        )
        if args.compare_code:
            compared = compare_code(data, work, args)
            for (measure, jobs), t in compared.items():
                this, other = statistics.median(t["this"]), statistics.median(t["other"])
                what = "whole process" if measure == "whole" else "build_shards call"
                line(f"(d) --compare-code, --jobs {jobs}, {what}", other, n / other)
                line(f"    this checkout, --jobs {jobs}, {what}", this, n / this)
                ratios = sorted(a / b for a, b in zip(t["this"], t["other"], strict=True))
                print(
                    f"    this / --compare-code, {what}, --jobs {jobs}: {this / other:.3f} (medians of "
                    f"{args.rounds}); per round {', '.join(f'{x:.3f}' for x in ratios)}"
                )
        commands = {
            'python -c "import pyarrow.parquet"': ([sys.executable, "-c", "import pyarrow.parquet"], ROOT),
            "asl-pipeline --help": ([sys.executable, "-m", "pipeline.cli", "--help"], ROOT),
        }
        if args.compare_code:
            commands["asl-pipeline --help, --compare-code"] = (
                commands["asl-pipeline --help"][0],
                args.compare_code.resolve(),
            )
        started = startup_seconds(commands, max(args.rounds, 3))
        bare = started['python -c "import pyarrow.parquet"']
        for name, seconds in started.items():
            print(f"(e) start-up, {name:<45}{seconds:>7.2f}s  {seconds / bare:.2f}x the bare import")
        print(f"shards identical across --jobs {','.join(map(str, builds))}: {identical}")
        print(
            f"bytes on disk: {totals['bytes'] / samples / 1e3:.1f} kB a sample vs L*118*6*2 = "
            f"{ideal / samples / 1e3:.1f} kB ({(bytes_ratio - 1) * 100:+.1f}%)"
        )

        ref_rate = n / builds[ref_jobs]["seconds"]
        print()
        print("targets:")
        checks = [
            (
                f"--jobs {ref_jobs} >= {TARGET_VS_READ}x the 1-process bare read rate",
                f"{ref_rate / read_rate:.2f}x",
                ref_rate / read_rate >= TARGET_VS_READ,
            ),
            (
                f"--jobs {ref_jobs} >= {TARGET_VS_BASELINE:.0f}x the per-sample baseline",
                f"{ref_rate / base_rate:.2f}x",
                ref_rate / base_rate >= TARGET_VS_BASELINE,
            ),
            (
                f"bytes a sample within {TARGET_BYTES:.0%} of L*118*6*2 (float16 compact)",
                f"{(bytes_ratio - 1) * 100:+.1f}%",
                abs(bytes_ratio - 1) <= TARGET_BYTES,
            ),
            (
                f"peak RSS flat: {n} vs {big_samples} rows within {TARGET_MEMORY:.2f}x",
                f"{small_rss:.0f} -> {big_rss:.0f} MB ({rss_ratio:.2f}x)",
                rss_ratio <= TARGET_MEMORY,
            ),
            ("shards byte-identical whatever --jobs", str(identical), identical),
        ]
        for name, value, ok in checks:
            print(f"  {verdict(ok)}  {name:<58} {value}")
        print(f"\ntotal benchmark time {time.perf_counter() - total_start:.0f}s; work dir {work}")
        return 0
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
