"""Decode a video into the RGB frames to extract: OpenCV's decoder, timestamps for resampling and trimming, caps.

Frame rates and frame counts in container headers are not trusted (real files claim 90,000 and 1000 fps):
resampling and trimming use each decoded frame's own timestamp, and the length limit counts decoded frames.
cv2 (opencv-contrib-python, which comes with mediapipe) is imported on first use only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import AslError
from pipeline.read import MB, file_problem

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")
MAX_VIDEO_MB = 4096  # a file larger than this is refused before it is opened
MAX_PIXELS = 7680 * 4320  # 8K UHD: a larger frame is an absurd resolution for sign video
# Frames of one extracted sequence: the competition's longest is 537; a landmark file of this many frames stays
# inside pipeline.read's 64 MB limit (about 15 kB a frame on disk).
MAX_FRAMES = 3000


class VideoError(AslError, ValueError):
    """A video that cannot be used; `reason` says why (one line)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class VideoOptions:
    """Which decoded frames become frames of the sequence.

    Default: every decoded frame, in order. `fps` keeps the first frame at or after each tick of
    1/fps seconds (it never invents frames); `start`/`end` trim by timestamp (seconds);
    `max_frames`/`max_seconds` cut the sequence short; `mirror` flips frames left-right first
    (for a selfie camera's mirrored picture).
    """

    fps: float | None = None
    start: float = 0.0
    end: float | None = None
    max_frames: int | None = None
    max_seconds: float | None = None
    mirror: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_cv2() -> Any:
    """The `cv2` module, or VideoError saying how to install it."""
    try:
        import cv2
    except ImportError as exc:
        from pipeline.holistic import INSTALL_HINT

        raise VideoError("cv2", f"video input needs OpenCV ({exc}); install it with {INSTALL_HINT}") from None
    return cv2


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def check_file(path: str | Path) -> None:
    """VideoError unless `path` is a non-empty regular file of at most MAX_VIDEO_MB (checked before decoding)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoError(path, "file not found") from None
    except OSError as exc:
        raise VideoError(path, f"cannot open ({exc.strerror or exc})") from None
    problem = file_problem(st, MAX_VIDEO_MB * MB)
    if problem:
        raise VideoError(path, problem)
    if st.st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")


def frames(path: str | Path, opts: VideoOptions = VideoOptions()) -> Iterator[np.ndarray]:
    """The RGB frames (H, W, 3) uint8 of the sequence, in order; VideoError when the file is not a usable video.

    Raises before the first frame when the file does not open or no frame decodes, and partway when the
    sequence would pass MAX_FRAMES frames without a cap.
    """
    cv2 = require_cv2()
    check_file(path)
    capture = _open(cv2, path)
    try:
        yield from _selected(cv2, capture, path, opts)
    finally:
        capture.release()


def source_frames(source: str | int) -> Iterator[tuple[float | None, np.ndarray]]:
    """(seconds, RGB frame) of a camera index, file or URL as OpenCV reads them, without selection (live input).

    Seconds are the frame's timestamp from a file or stream, None from a camera (whose clock is the caller's).
    """
    cv2 = require_cv2()
    if isinstance(source, str) and os.path.exists(source):
        check_file(source)
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise VideoError(str(source), "OpenCV cannot open this source (a camera index, video file or stream URL)")
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            stamp = None if isinstance(source, int) else capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
            yield stamp, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def _open(cv2: Any, path: str | Path) -> Any:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise VideoError(path, "not a video OpenCV can open (unknown container or codec)")
    width, height = capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
    if width * height > MAX_PIXELS:
        capture.release()
        raise VideoError(path, f"{width:.0f}x{height:.0f} frames are over the 8K limit ({MAX_PIXELS} pixels)")
    return capture


def _selected(cv2: Any, capture: Any, path: str | Path, opts: VideoOptions) -> Iterator[np.ndarray]:
    kept, decoded = 0, 0
    origin, tick = None, 0.0  # resampling: ticks at origin + k / fps, origin the first frame kept
    limit = opts.max_frames if opts.max_frames is not None else MAX_FRAMES
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        decoded += 1
        seconds = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
        if seconds < opts.start:
            continue
        if (opts.end is not None and seconds >= opts.end) or (
            opts.max_seconds is not None and seconds >= opts.start + opts.max_seconds
        ):
            break
        if opts.fps is not None:
            origin, tick = (seconds, seconds) if origin is None else (origin, tick)
            if seconds < tick:
                continue
            tick = origin + (int((seconds - origin) * opts.fps) + 1) / opts.fps  # the first tick after this frame
        if kept == limit:
            if opts.max_frames is not None:
                break
            raise VideoError(path, f"more than {MAX_FRAMES} frames (cap it with --max-frames, --max-seconds or --end)")
        if bgr.shape[0] * bgr.shape[1] > MAX_PIXELS:
            raise VideoError(path, f"a {bgr.shape[1]}x{bgr.shape[0]} frame is over the 8K limit ({MAX_PIXELS} pixels)")
        kept += 1
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        yield cv2.flip(rgb, 1) if opts.mirror else rgb
    if decoded == 0:
        claimed = capture.get(cv2.CAP_PROP_FRAME_COUNT), capture.get(cv2.CAP_PROP_FPS)
        raise VideoError(path, f"no frame decodes (the header claims {claimed[0]:.0f} frames at {claimed[1]:g} fps)")
