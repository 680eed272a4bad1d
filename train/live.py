"""`asl-train live`: signs from a camera, video file or stream, one line each as a signing segment ends.

Frames come from OpenCV, landmarks from the same Holistic wrapper as `asl-pipeline extract`. A segment
starts when a hand comes into view and ends when the hands leave the view for `gap` seconds, or stay still
for `pause` seconds (a signer's rest between signs); its frames up to that moment are scored as one sequence.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.holistic import HolisticOptions, holistic_graph, landmarks_of
from pipeline.landmarks import TYPE_OFFSETS
from pipeline.video import source_frames
from train.predict import Scorer

_HANDS = np.r_[
    TYPE_OFFSETS["left_hand"] : TYPE_OFFSETS["left_hand"] + 21,
    TYPE_OFFSETS["right_hand"] : TYPE_OFFSETS["right_hand"] + 21,
]


@dataclass(frozen=True)
class LiveOptions:
    gap: float = 0.5  # seconds without a hand that end a segment
    pause: float = 0.6  # seconds of still hands that end a segment
    still: float = 0.01  # hand speed (frame widths a second, mean over the points found) below which hands rest
    min_frames: int = 3  # shorter segments are noise, not signs
    max_seconds: float | None = None  # stop reading the source after this many seconds of it


@dataclass
class Segment:
    start: float  # seconds into the source
    end: float
    landmarks: np.ndarray  # (T, 543, 3)


def _speed(a: np.ndarray, b: np.ndarray, dt: float) -> float | None:
    """Mean hand speed between two frames (x, y per second), over the hand points found in both; None without any."""
    both = np.isfinite(a[_HANDS, 0]) & np.isfinite(b[_HANDS, 0])
    if not both.any() or dt <= 0:
        return None
    step = np.linalg.norm(b[_HANDS][both, :2] - a[_HANDS][both, :2], axis=1)
    return float(step.mean() / dt)


def segments(stream: Iterable[tuple[float, np.ndarray]], opts: LiveOptions = LiveOptions()) -> Iterator[Segment]:
    """Signing segments of a stream of (seconds, (543, 3) landmarks), each yielded as soon as it has ended."""
    current: list[tuple[float, np.ndarray]] = []
    prev: tuple[float, np.ndarray] | None = None
    last_hand = 0.0
    still_since: float | None = None
    resting = False  # after a pause ended a segment: until the hands move again or leave
    for t, xyz in stream:
        hand = bool(np.isfinite(xyz[_HANDS, 0]).any())
        speed = _speed(prev[1], xyz, t - prev[0]) if prev is not None and hand else None
        prev = (t, xyz)
        moving = speed is None or speed >= opts.still
        if not current:
            resting = resting and hand and not moving
            if hand and not resting:
                current, last_hand, still_since = [(t, xyz)], t, None
            continue
        current.append((t, xyz))
        if hand:
            last_hand = t
            still_since = None if moving else (still_since if still_since is not None else current[-2][0])
        if not hand and t - last_hand >= opts.gap:
            yield from _closed(current, last_hand, opts)
            current = []
        elif still_since is not None and t - still_since >= opts.pause:
            yield from _closed(current, still_since, opts)
            current, resting = [], True
    if current:
        yield from _closed(current, last_hand, opts)


def _closed(frames: list[tuple[float, np.ndarray]], until: float, opts: LiveOptions) -> Iterator[Segment]:
    kept = [(t, xyz) for t, xyz in frames if t <= until]
    if len(kept) >= opts.min_frames:
        yield Segment(kept[0][0], kept[-1][0], np.stack([xyz for _, xyz in kept]).astype(np.float32))


def landmark_stream(
    source: str | int, opts: LiveOptions = LiveOptions(), holistic: HolisticOptions | None = None
) -> Iterator[tuple[float, np.ndarray]]:
    """(seconds, landmarks) of each frame of an OpenCV source: a file's own timestamps, a camera's clock."""
    graph = holistic_graph(holistic or HolisticOptions())
    start = time.monotonic()
    for stamp, rgb in source_frames(source):
        seconds = stamp if stamp is not None else time.monotonic() - start
        if opts.max_seconds is not None and seconds > opts.max_seconds:
            return
        yield seconds, landmarks_of(graph, rgb)


def live_predictions(
    source: str | int, scorer: Scorer, opts: LiveOptions = LiveOptions(), k: int = 5
) -> Iterator[tuple[Segment, list[tuple[str, float]]]]:
    """Each signing segment of `source` as it ends, with the top-k signs `scorer` gives it."""
    names = {v: s for s, v in scorer.label_map.items()}
    for segment in segments(landmark_stream(source, opts), opts):
        p = scorer.probabilities([segment.landmarks])[0]
        best = np.argsort(-p, kind="stable")[:k]
        yield segment, [(names[int(j)], float(p[j])) for j in best]


def format_segment(segment: Segment, top: list[tuple[str, float]]) -> str:
    """One line: `start-end s (T frames): sign p, ...`."""
    signs = ", ".join(f"{s} {q:.3f}" for s, q in top)
    return f"{segment.start:.2f}-{segment.end:.2f}s ({len(segment.landmarks)} frames): {signs}"
