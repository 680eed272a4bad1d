"""`asl-pipeline extract` throughput against a minimal single-process Holistic loop, in one run.

    python bench/extract.py [VIDEO ...] [--jobs 1 2]

Default videos: the three labelled recordings in ../shared/videos. Rows, all over every decoded frame:
- the minimal loop: one process, OpenCV reads every frame, one Holistic graph per video (no files written);
- `extract_videos` in this process, for each --jobs (the stage: planning, workers, parquet files);
- `asl-pipeline extract` as a whole process, for each --jobs (interpreter start and imports included).
Prints frames/s and the time against the loop.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[2] / "shared" / "videos"
DEFAULT = [SHARED / name for name in ("HAPPY.mp4", "up.mp4", "TASTE_GOOD.mp4")]


def minimal_loop(videos: list[Path]) -> int:
    """Frames through a plain Holistic loop, as a user would write it."""
    import cv2
    import mediapipe as mp

    frames = 0
    for path in videos:
        capture = cv2.VideoCapture(str(path))
        with mp.solutions.holistic.Holistic() as holistic:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    break
                holistic.process(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                frames += 1
        capture.release()
    return frames


def stage(videos: list[Path], jobs: int) -> int:
    from pipeline.extract import extract_videos

    with tempfile.TemporaryDirectory(prefix="bench-extract-") as out:
        return extract_videos(videos, out, jobs=jobs).frames


def whole_process(videos: list[Path], jobs: int) -> None:
    cli = Path(sys.executable).parent / "asl-pipeline"
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as out:
        cmd = [str(cli), "extract", *map(str, videos), "--out", out, "--jobs", str(jobs)]
        subprocess.run(cmd, check=True, capture_output=True)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="*", type=Path, default=DEFAULT)
    ap.add_argument("--jobs", nargs="+", type=int, default=[1, 2])
    args = ap.parse_args()
    seconds, frames = timed(minimal_loop, args.videos)
    rows = [("minimal Holistic loop (1 process)", seconds)]
    for jobs in args.jobs:
        took, extracted = timed(stage, args.videos, jobs)
        if extracted != frames:
            raise SystemExit(f"extract wrote {extracted} frames, the loop read {frames}")
        rows.append((f"extract_videos --jobs {jobs}", took))
    for jobs in args.jobs:
        rows.append((f"asl-pipeline extract --jobs {jobs} (process)", timed(whole_process, args.videos, jobs)[0]))
    print(f"{len(args.videos)} videos, {frames} frames, every decoded frame")
    print(f"{'method':<42} {'seconds':>8} {'frames/s':>9} {'time vs loop':>13}")
    for name, took in rows:
        print(f"{name:<42} {took:>8.1f} {frames / took:>9.1f} {took / seconds:>12.2f}x")


if __name__ == "__main__":
    main()
