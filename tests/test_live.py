"""`asl-train live`: signing segments from a stream of landmarks, and the command on a real screen recording."""

from __future__ import annotations

import numpy as np

from pipeline.landmarks import N_RAW, TYPE_OFFSETS
from train.live import LiveOptions, segments

RIGHT = TYPE_OFFSETS["right_hand"]


def _frame(hand_x: float | None) -> np.ndarray:
    """Landmarks with the pose found and the right hand at x = hand_x (None: no hand)."""
    xyz = np.full((N_RAW, 3), np.nan)
    xyz[TYPE_OFFSETS["pose"] : TYPE_OFFSETS["pose"] + 33] = 0.5
    if hand_x is not None:
        xyz[RIGHT : RIGHT + 21] = [hand_x, 0.5, 0.0]
    return xyz


def _stream(hands: list[float | None], fps: float = 10) -> list[tuple[float, np.ndarray]]:
    return [(i / fps, _frame(x)) for i, x in enumerate(hands)]


def _spans(hands: list[float | None], **options: float) -> list[tuple[float, float, int]]:
    return [(s.start, s.end, len(s.landmarks)) for s in segments(_stream(hands), LiveOptions(**options))]


def moving(n: int, x0: float = 0.2) -> list[float | None]:
    return [x0 + 0.05 * i for i in range(n)]  # 0.5 frame widths a second at 10 fps


def test_hands_leaving_the_view_end_a_segment() -> None:
    hands = [None] * 5 + moving(8) + [None] * 10 + moving(6) + [None] * 3
    # the first ends 0.5 s after its last hand (t=1.2), the second at the end of the stream
    assert _spans(hands) == [(0.5, 1.2, 8), (2.3, 2.8, 6)]


def test_a_short_gap_does_not_split_a_sign() -> None:
    hands = moving(5) + [None] * 3 + moving(5, 0.6)
    assert _spans(hands) == [(0.0, 1.2, 13)]  # the frames without a hand inside the sign are kept


def test_a_pause_with_still_hands_ends_a_segment_and_motion_starts_the_next() -> None:
    hands = moving(6) + [0.45] * 10 + moving(6, 0.5)
    # the rest starts at t=0.5 (the last moving frame); the next sign starts when the hand moves again
    assert _spans(hands) == [(0.0, 0.5, 6), (1.6, 2.1, 6)]


def test_too_short_segments_are_dropped() -> None:
    assert _spans([None, 0.2, 0.3, None, None, None, None, None, None] + moving(4)) == [(0.9, 1.2, 4)]
