"""The 118-point selection, its group slices and the horizontal-flip permutation (REFERENCE.md §2)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import landmarks

# Written out again from REFERENCE.md §2: the independent source the module is checked against.
LIP = [
    0,
    13,
    14,
    17,
    37,
    39,
    40,
    61,
    78,
    80,
    81,
    82,
    84,
    87,
    88,
    91,
    95,
    146,
    178,
    181,
    185,
    191,
    267,
    269,
    270,
    291,
    308,
    310,
    311,
    312,
    314,
    317,
    318,
    321,
    324,
    375,
    402,
    405,
    409,
    415,
]
LHAND = list(range(468, 489))
RHAND = list(range(522, 543))
NOSE = [1, 2, 98, 327]
REYE = [7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246]
LEYE = [249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466]
POINTS = LIP + LHAND + RHAND + NOSE + REYE + LEYE
LEFT_LIP = [37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191]
RIGHT_LIP = [267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415]
SELF_MIRRORED = [0, 13, 14, 17, 1, 2]


def pos(raw: int) -> int:
    """Position of raw landmark `raw` among the 118 selected points (by the literal list)."""
    return POINTS.index(raw)


def test_literal_lists_are_consistent():
    # Guards the test's own transcription of REFERENCE.md.
    assert [len(g) for g in (LIP, LHAND, RHAND, NOSE, REYE, LEYE)] == [40, 21, 21, 4, 16, 16]
    assert LIP == [0, 13, 14, 17] + LEFT_LIP + RIGHT_LIP
    assert len(POINTS) == len(set(POINTS)) == 118


def test_point_landmarks_exact_order():
    assert list(landmarks.POINT_LANDMARKS) == POINTS
    assert landmarks.N_POINTS == 118
    assert len(set(landmarks.POINT_LANDMARKS)) == 118
    assert all(0 <= i < 543 for i in landmarks.POINT_LANDMARKS)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("LIP", LIP), ("LHAND", LHAND), ("RHAND", RHAND), ("NOSE", NOSE), ("REYE", REYE), ("LEYE", LEYE)],
)
def test_groups(name, expected):
    assert list(getattr(landmarks, name)) == expected


def test_raw_layout():
    assert landmarks.N_RAW == 543
    assert landmarks.TYPES == ("face", "left_hand", "pose", "right_hand")
    assert landmarks.TYPE_SIZES == {"face": 468, "left_hand": 21, "pose": 33, "right_hand": 21}
    assert landmarks.TYPE_OFFSETS == {"face": 0, "left_hand": 468, "pose": 489, "right_hand": 522}
    assert landmarks.REFERENCE_LANDMARK == 17


def test_group_slices_contiguous_with_sizes():
    slices = landmarks.GROUP_SLICES
    assert list(slices) == ["lip", "lhand", "rhand", "nose", "reye", "leye"]
    expected = {"lip": LIP, "lhand": LHAND, "rhand": RHAND, "nose": NOSE, "reye": REYE, "leye": LEYE}
    start = 0
    for name, group in expected.items():
        s = slices[name]
        assert (s.start, s.stop, s.step) == (start, start + len(group), None), name
        assert POINTS[s] == group, name
        start += len(group)
    assert start == 118
    covered = np.concatenate([np.arange(118)[s] for s in slices.values()])
    np.testing.assert_array_equal(covered, np.arange(118))


def test_flip_permutation_shape_and_involution():
    p = np.asarray(landmarks.FLIP_PERMUTATION)
    assert p.shape == (118,)
    assert np.issubdtype(p.dtype, np.integer)
    np.testing.assert_array_equal(np.sort(p), np.arange(118))  # a permutation
    np.testing.assert_array_equal(p[p], np.arange(118))  # its own inverse
    assert not p.flags.writeable


def test_flip_permutation_pairs():
    p = landmarks.FLIP_PERMUTATION
    pairs = (
        list(zip(LHAND, RHAND, strict=True))
        + list(zip(LEFT_LIP, RIGHT_LIP, strict=True))
        + list(zip(REYE, LEYE, strict=True))
        + [(98, 327)]
    )
    assert len(pairs) == 21 + 18 + 16 + 1
    for a, b in pairs:
        assert p[pos(a)] == pos(b), (a, b)
        assert p[pos(b)] == pos(a), (b, a)
    for raw in SELF_MIRRORED:
        assert p[pos(raw)] == pos(raw), raw
    # Every one of the 118 points is either in a pair or self-mirrored.
    assert len({x for pair in pairs for x in pair} | set(SELF_MIRRORED)) == 118


def test_flip_permutation_expected_array():
    # The whole permutation built independently from the literal pairs.
    mirror = dict(zip(LHAND + LEFT_LIP + REYE + [98], RHAND + RIGHT_LIP + LEYE + [327], strict=True))
    mirror |= {b: a for a, b in mirror.items()}
    expected = [pos(mirror.get(raw, raw)) for raw in POINTS]
    np.testing.assert_array_equal(landmarks.FLIP_PERMUTATION, expected)
    np.testing.assert_array_equal(landmarks.flip_permutation(), expected)


def test_flip_moves_left_hand_data_to_right_hand_slot():
    # Applying the permutation to per-point data swaps hand blocks as whole, ordered blocks.
    data = np.arange(118)
    flipped = data[landmarks.FLIP_PERMUTATION]
    s = landmarks.GROUP_SLICES
    np.testing.assert_array_equal(flipped[s["lhand"]], data[s["rhand"]])
    np.testing.assert_array_equal(flipped[s["rhand"]], data[s["lhand"]])
    np.testing.assert_array_equal(flipped[s["reye"]], data[s["leye"]])
    np.testing.assert_array_equal(flipped[s["leye"]], data[s["reye"]])
    np.testing.assert_array_equal(flipped[s["nose"]], data[s["nose"]][[0, 1, 3, 2]])
    np.testing.assert_array_equal(
        flipped[s["lip"]], data[s["lip"]][list(range(4)) + list(range(22, 40)) + list(range(4, 22))]
    )


def test_rows_of_a_frame():
    # Kaggle order: face 0..467, left_hand 0..20, pose 0..32, right_hand 0..20 (REFERENCE.md §1).
    types = [0] * 468 + [1] * 21 + [2] * 33 + [3] * 21
    index = list(range(468)) + list(range(21)) + list(range(33)) + list(range(21))
    assert landmarks.ROW_TYPES.tolist() == types
    assert landmarks.ROW_INDEX.tolist() == index
    assert not landmarks.ROW_TYPES.flags.writeable and not landmarks.ROW_INDEX.flags.writeable
    # a raw landmark k of a frame is row k: its type and index put it back at TYPE_OFFSETS + index
    offsets = np.array([landmarks.TYPE_OFFSETS[t] for t in landmarks.TYPES])
    np.testing.assert_array_equal(offsets[landmarks.ROW_TYPES] + landmarks.ROW_INDEX, np.arange(543))
