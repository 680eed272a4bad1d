"""Videos as inputs of `asl-train predict`: landmarks extracted in-process by the code path of `extract`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.read import read_landmarks
from pipeline.video import is_video


def read_sequence(path: str | Path) -> tuple[np.ndarray, dict[str, Any] | None]:
    """(T, 543, 3) float32 landmarks of a parquet file or a video, and for a video what a person checking it
    wants to know: `frames` read and `hand_share`, the share of frames with a hand found.

    A bad video raises pipeline.video.VideoError with its reason, as `extract` rejects it.
    """
    if not is_video(path):
        return read_landmarks(path), None
    from pipeline.extract import extract_landmarks

    found = extract_landmarks(path)
    return found.landmarks.astype(np.float32), {"frames": found.frames, "hand_share": found.hand_share}


def require_video_support(files: Sequence[str | Path]) -> None:
    """HolisticError (one line: how to install) when `files` holds a video and mediapipe is not installed."""
    if any(is_video(f) for f in files):
        from pipeline.holistic import require_mediapipe

        require_mediapipe()
