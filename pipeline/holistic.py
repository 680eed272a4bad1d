"""MediaPipe Holistic: one graph per worker thread, and its landmarks as the competition's 543 rows of a frame.

The competition's landmarks were made with MediaPipe Holistic; its `left_hand` is Holistic's
`left_hand_landmarks` (the person's left hand, found from the pose's left wrist), unmirrored. Rows of
a part not found are NaN, as in the Kaggle files. mediapipe is imported on first use only.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import AslError
from pipeline.landmarks import N_RAW, TYPE_OFFSETS, TYPE_SIZES, TYPES

# Holistic's output field of each landmark type of the competition's layout.
_FIELDS = {
    "face": "face_landmarks",
    "left_hand": "left_hand_landmarks",
    "pose": "pose_landmarks",
    "right_hand": "right_hand_landmarks",
}
# The pose model of each complexity; only the wheel's own files are used (mediapipe would download the others).
POSE_MODELS = {0: "pose_landmark_lite.tflite", 1: "pose_landmark_full.tflite", 2: "pose_landmark_heavy.tflite"}
INSTALL_HINT = "pip install -e '.[video]' (make setup-video)"


class HolisticError(AslError, RuntimeError):
    """MediaPipe is missing, or cannot run with the options asked for."""


@dataclass(frozen=True)
class HolisticOptions:
    """Holistic's settings; the defaults are MediaPipe's own (video mode, complexity 1, no face refinement:
    468 face points as in the competition data)."""

    model_complexity: int = 1
    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    smooth_landmarks: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_local = threading.local()


def require_mediapipe() -> Any:
    """The `mediapipe` module, or HolisticError saying how to install it."""
    try:
        import mediapipe
    except ImportError as exc:
        raise HolisticError(f"video input needs mediapipe ({exc}); install it with {INSTALL_HINT}") from None
    return mediapipe


def mediapipe_version() -> str:
    return require_mediapipe().__version__


def holistic_graph(opts: HolisticOptions) -> Any:
    """This thread's Holistic graph for `opts`, reset for a new video (no tracking state carried over).

    Built once per thread and reused: starting a graph costs far more than one frame, and a graph
    must never run in two threads at once.
    """
    graphs = _local.__dict__.setdefault("graphs", {})
    graph = graphs.get(opts)
    if graph is None:
        graph = graphs[opts] = _new_graph(opts)
    else:
        graph.reset()
    return graph


def check_options(opts: HolisticOptions) -> None:
    """HolisticError (one line) when mediapipe is missing or the options need a model its wheel does not ship."""
    mp = require_mediapipe()
    model = POSE_MODELS.get(opts.model_complexity)
    if model is None:
        raise HolisticError(f"model complexity {opts.model_complexity}: choose 0, 1 or 2")
    path = Path(mp.__file__).parent / "modules" / "pose_landmark" / model
    if not path.is_file():  # mediapipe would fetch it from the internet: never at run time
        shipped = sorted(c for c, m in POSE_MODELS.items() if (path.parent / m).is_file())
        raise HolisticError(
            f"model complexity {opts.model_complexity}: its pose model {model} is not in the installed mediapipe "
            f"{mp.__version__} (available: {', '.join(map(str, shipped)) or 'none'})"
        )


def _new_graph(opts: HolisticOptions) -> Any:
    check_options(opts)
    mp = require_mediapipe()
    return mp.solutions.holistic.Holistic(
        static_image_mode=False,
        model_complexity=opts.model_complexity,
        smooth_landmarks=opts.smooth_landmarks,
        refine_face_landmarks=False,
        min_detection_confidence=opts.min_detection_confidence,
        min_tracking_confidence=opts.min_tracking_confidence,
    )


def frame_landmarks(results: Any) -> np.ndarray:
    """(543, 3) float64 x, y, z of one frame's Holistic results in the competition's row order, NaN where a part
    was not found (MediaPipe's float32 values, widened exactly as in the Kaggle files)."""
    out = np.full((N_RAW, 3), np.nan, dtype=np.float64)
    for kind in TYPES:
        found = getattr(results, _FIELDS[kind])
        if found is None:
            continue
        points = np.array([(p.x, p.y, p.z) for p in found.landmark], dtype=np.float32)
        if len(points) != TYPE_SIZES[kind]:
            raise HolisticError(f"Holistic gave {len(points)} {kind} landmarks, expected {TYPE_SIZES[kind]}")
        out[TYPE_OFFSETS[kind] : TYPE_OFFSETS[kind] + TYPE_SIZES[kind]] = points
    return out


def landmarks_of(graph: Any, rgb: np.ndarray) -> np.ndarray:
    """(543, 3) landmarks of one RGB frame, the next frame of the video the graph is on."""
    return frame_landmarks(graph.process(rgb))
