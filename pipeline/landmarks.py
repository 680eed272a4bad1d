"""The MediaPipe 543-point layout, the 118 selected points and their mirror permutation.

The single definition of these facts: every other module imports them from here.
"""

from __future__ import annotations

import numpy as np

# Rows of every frame, in file order (types sorted alphabetically), with their sizes.
TYPES: tuple[str, ...] = ("face", "left_hand", "pose", "right_hand")
TYPE_SIZES: dict[str, int] = {"face": 468, "left_hand": 21, "pose": 33, "right_hand": 21}
# Raw index of each type's first row: the sizes of the types before it.
TYPE_OFFSETS: dict[str, int] = {t: sum(TYPE_SIZES[u] for u in TYPES[:i]) for i, t in enumerate(TYPES)}
N_RAW = sum(TYPE_SIZES.values())  # rows per frame: 543

# Per row of a frame (543): the code of its type (an index into TYPES) and its landmark_index within the type.
ROW_TYPES: np.ndarray = np.repeat(np.arange(len(TYPES), dtype=np.int8), [TYPE_SIZES[t] for t in TYPES])
ROW_INDEX: np.ndarray = np.concatenate([np.arange(TYPE_SIZES[t], dtype=np.int16) for t in TYPES])
ROW_TYPES.setflags(write=False)
ROW_INDEX.setflags(write=False)


def _rows_of(landmark_type: str) -> tuple[int, ...]:
    """Raw indices of every landmark of one type."""
    return tuple(range(TYPE_OFFSETS[landmark_type], TYPE_OFFSETS[landmark_type] + TYPE_SIZES[landmark_type]))


# Lip points that mirror each other pairwise (left i <-> right i, by MediaPipe's face mesh); the four centre points
# map to themselves.
_LEFT_LIP = (37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191)
_RIGHT_LIP = (267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415)
LIP: tuple[int, ...] = (0, 13, 14, 17) + _LEFT_LIP + _RIGHT_LIP
LHAND: tuple[int, ...] = _rows_of("left_hand")
RHAND: tuple[int, ...] = _rows_of("right_hand")
NOSE: tuple[int, ...] = (1, 2, 98, 327)
REYE: tuple[int, ...] = (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246)
LEYE: tuple[int, ...] = (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466)

POINT_LANDMARKS: tuple[int, ...] = LIP + LHAND + RHAND + NOSE + REYE + LEYE
N_POINTS = len(POINT_LANDMARKS)  # 118

# Raw landmark whose mean over frames is the per-sequence origin (lower-lip centre).
REFERENCE_LANDMARK = 17

# Where each group sits inside the 118 selected points.
GROUP_SLICES: dict[str, slice] = {}
_start = 0
for _name, _group in (("lip", LIP), ("lhand", LHAND), ("rhand", RHAND), ("nose", NOSE), ("reye", REYE), ("leye", LEYE)):
    GROUP_SLICES[_name] = slice(_start, _start + len(_group))
    _start += len(_group)

# Raw mirror pairs; every selected point not listed maps to itself (0 13 14 17 1 2).
MIRROR_PAIRS: tuple[tuple[int, int], ...] = (
    *zip(LHAND, RHAND, strict=True),
    *zip(_LEFT_LIP, _RIGHT_LIP, strict=True),
    *zip(REYE, LEYE, strict=True),
    (98, 327),
)


def flip_permutation() -> np.ndarray:
    """Index array `p` over the 118 points: a mirrored sequence takes point `i` from point `p[i]`."""
    mirror = {a: b for a, b in MIRROR_PAIRS} | {b: a for a, b in MIRROR_PAIRS}
    position = {raw: i for i, raw in enumerate(POINT_LANDMARKS)}
    return np.array([position[mirror.get(raw, raw)] for raw in POINT_LANDMARKS], dtype=np.int64)


FLIP_PERMUTATION: np.ndarray = flip_permutation()
FLIP_PERMUTATION.setflags(write=False)
