"""preprocess / compact_features / pad_features / features_from_positions against REFERENCE.md §2.

`reference_features` below is a plain, independent transcription of REFERENCE.md §2 (float64,
exact-rational mean and std from `statistics`, explicit per-frame loops); the pipeline is compared
with it on the real sample files, on random sequences and on edge cases.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.features import (
    N_PACKED,
    compact_features,
    features_from_positions,
    normalized_positions,
    pack_missing,
    pad_features,
    pad_frames,
    padded_index,
    preprocess,
    unpack_missing,
)
from pipeline.landmarks import POINT_LANDMARKS  # pinned against REFERENCE.md literals in test_landmarks.py
from pipeline.read import read_landmarks

MAX_LEN = 384
POINTS = list(POINT_LANDMARKS)
LHAND_RAW = list(range(468, 489))
RHAND_RAW = list(range(522, 543))
ATOL = RTOL = 1e-5


def reference_features(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """REFERENCE.md §2, steps 1-7, for one (T, 543, 3) sequence -> (384, 118, 6) float64, (384,) bool."""
    xyz = np.asarray(xyz, dtype=np.float64)
    T = len(xyz)
    pts = xyz[:, POINTS, :2]  # 1. x, y of the 118 points
    origin, scale = [], []
    for axis in range(2):
        # 2. mean over frames of raw landmark 17 ignoring NaN; 0.5 if entirely NaN
        ref = [float(v) for v in xyz[:, 17, axis] if not math.isnan(v)]
        origin.append(statistics.mean(ref) if ref else 0.5)
        # 3. std (correction=1) over all frames and points ignoring NaN; 1.0 where 0 or undefined
        vals = [float(v) for v in pts[:, :, axis].ravel() if not math.isnan(v)]
        s = statistics.stdev(vals) if len(vals) >= 2 else math.nan
        scale.append(s if math.isfinite(s) and s > 0 else 1.0)
    norm = (pts - np.array(origin)) / np.array(scale)  # 4. whole-sequence statistics
    length = min(T, MAX_LEN)
    padded = np.empty((MAX_LEN, len(POINTS), 2))  # 5. truncate, or repeat the last frame
    for t in range(MAX_LEN):
        padded[t] = norm[t] if t < length else norm[length - 1]
    out = np.zeros((MAX_LEN, len(POINTS), 6))
    for t in range(MAX_LEN):  # 6. motion after padding, zero past the end
        out[t, :, 0:2] = padded[t]
        if t + 1 < MAX_LEN:
            out[t, :, 2:4] = padded[t + 1] - padded[t]
        if t + 2 < MAX_LEN:
            out[t, :, 4:6] = padded[t + 2] - padded[t]
    out[np.isnan(out)] = 0.0  # 7.
    mask = np.array([t < length for t in range(MAX_LEN)])
    return out, mask


# ---------------------------------------------------------------- inputs


def random_sequence(T: int, seed: int, hand_missing: float = 0.6, face_missing: float = 0.05) -> np.ndarray:
    """Random (T, 543, 3) float32 landmarks: per-frame jitter around a random pose, hands/face NaN by frame."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-0.2, 1.3, size=(543, 3))
    xyz = base + rng.normal(0.0, 0.05, size=(T, 543, 3)).cumsum(axis=0) * 0.3
    xyz = xyz.astype(np.float32)
    for t in range(T):
        if rng.random() < hand_missing:
            xyz[t, LHAND_RAW] = np.nan
        if rng.random() < hand_missing:
            xyz[t, RHAND_RAW] = np.nan
        if rng.random() < face_missing:
            xyz[t, :468] = np.nan
    return xyz


def hands_missing() -> np.ndarray:
    xyz = random_sequence(40, seed=11, hand_missing=0.0)
    xyz[:, LHAND_RAW + RHAND_RAW] = np.nan
    return xyz


def face_missing() -> np.ndarray:
    xyz = random_sequence(20, seed=12, hand_missing=0.0, face_missing=0.0)
    xyz[:, :468] = np.nan
    return xyz


def identical_points() -> np.ndarray:
    xyz = np.empty((25, 543, 3), dtype=np.float32)
    xyz[..., 0], xyz[..., 1], xyz[..., 2] = 0.3, 0.7, -0.1
    return xyz


def single_point() -> np.ndarray:
    xyz = np.full((10, 543, 3), np.nan, dtype=np.float32)
    xyz[9, 470] = (0.8, 1.6, 0.0)  # one left-hand point in the last frame; landmark 17 never present
    return xyz


def all_nan() -> np.ndarray:
    return np.full((6, 543, 3), np.nan, dtype=np.float32)


def x_or_y_only_missing() -> np.ndarray:
    """Points where only x or only y is NaN: such a point is still missing."""
    xyz = random_sequence(20, seed=14, hand_missing=0.0, face_missing=0.0)
    xyz[2, 470, 0] = np.nan
    xyz[3, 0, 1] = np.nan
    xyz[5, 522:530, 0] = np.nan
    xyz[19, 17, 1] = np.nan  # the reference landmark too, in the last frame (repeated into the padding)
    return xyz


def late_shift(T: int = 500) -> np.ndarray:
    """Frames past 384 moved far away, so statistics over the whole sequence differ from the first 384."""
    xyz = random_sequence(T, seed=13)
    xyz[MAX_LEN:, :, 0] += 1.0
    xyz[MAX_LEN:, :, 1] -= 2.0
    return xyz


CASES = {
    **{f"T{T}": (lambda T=T: random_sequence(T, seed=T)) for T in (1, 2, 3, 7, 50, 383, 384, 385, 500)},
    "random_few_hands": lambda: random_sequence(60, seed=1, hand_missing=0.95, face_missing=0.3),
    "random_all_present": lambda: random_sequence(33, seed=2, hand_missing=0.0, face_missing=0.0),
    "hands_missing": hands_missing,
    "face_missing": face_missing,
    "identical_points": identical_points,
    "single_point": single_point,
    "all_nan": all_nan,
    "x_or_y_only_missing": x_or_y_only_missing,
    "late_shift_500": late_shift,
}


def check_against_reference(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats, mask = preprocess(xyz)
    assert feats.shape == (MAX_LEN, 118, 6)
    assert feats.dtype == np.float32
    assert mask.shape == (MAX_LEN,)
    assert mask.dtype == np.bool_
    assert np.isfinite(feats).all()
    expected, expected_mask = reference_features(xyz)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(feats, expected, atol=ATOL, rtol=RTOL)
    return feats, mask


def check_compact(xyz: np.ndarray) -> None:
    feats, mask = preprocess(xyz)
    L = min(len(xyz), MAX_LEN)
    compact, missing = compact_features(xyz)
    assert compact.shape == (L, 118, 6)
    assert compact.dtype == np.float32
    assert np.array_equal(compact, feats[:L])
    padded, padded_mask = pad_features(compact)
    assert padded.dtype == np.float32
    assert np.array_equal(padded, feats)
    assert np.array_equal(padded_mask, mask)
    raw = xyz[:L][:, POINTS]
    assert missing.shape == (L, 118)
    assert missing.dtype == np.bool_
    np.testing.assert_array_equal(missing, np.isnan(raw[..., 0]) | np.isnan(raw[..., 1]))
    np.testing.assert_array_equal(unpack_missing(pack_missing(missing)), missing)


# ---------------------------------------------------------------- preprocess vs the reference


def test_real_files_match_reference(sample_file):
    path, frames = sample_file
    xyz = read_landmarks(path)
    assert len(xyz) == frames
    feats, mask = check_against_reference(xyz)
    assert mask.sum() == frames
    check_compact(xyz)


@pytest.mark.parametrize("name", list(CASES))
def test_cases_match_reference(name):
    xyz = CASES[name]()
    check_against_reference(xyz)
    check_compact(xyz)


def test_linear_walk_exact_values():
    # A linear walk: exact motion values, and padding that repeats the last frame with zero motion.
    T = 5
    xyz = np.zeros((T, 543, 3), dtype=np.float32)
    xyz[..., 0] = np.arange(T, dtype=np.float32)[:, None] * 0.25
    xyz[..., 1] = 0.5
    xyz[:, 470, 1] = 0.75  # make the y std non-zero
    feats, mask = preprocess(xyz)
    sx = np.std(np.repeat(np.arange(T) * 0.25, 118), ddof=1)
    # origin x is the mean of landmark 17's x over frames: (0 + 0.25 + ... + 1.0) / 5 = 0.5
    np.testing.assert_allclose(feats[:T, 0, 0], (np.arange(T) * 0.25 - 0.5) / sx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(feats[: T - 1, 5, 2], 0.25 / sx, rtol=1e-6)  # dx
    np.testing.assert_allclose(feats[: T - 2, 5, 4], 0.5 / sx, rtol=1e-6)  # dx2
    assert feats[T - 1, 5, 2] == 0 and feats[T - 1, 5, 4] == 0  # next frame is the repeated last one
    np.testing.assert_allclose(feats[T - 2, 5, 4], 0.25 / sx, rtol=1e-6)  # t+2 lands on padding
    np.testing.assert_array_equal(feats[T:, :, :2], np.broadcast_to(feats[T - 1, :, :2], (MAX_LEN - T, 118, 2)))
    assert not feats[T:, :, 2:].any()
    np.testing.assert_array_equal(mask, np.arange(MAX_LEN) < T)


@pytest.mark.parametrize("T", [384, 385, 500])
def test_long_sequences_truncate_with_zero_motion_at_end(T):
    xyz = random_sequence(T, seed=T, hand_missing=0.0, face_missing=0.0)
    feats, mask = preprocess(xyz)
    assert mask.all()
    assert not feats[383, :, 2:].any()  # dx, dx2 at 383
    assert not feats[382, :, 4:].any()  # dx2 at 382
    assert feats[382, :, 2:4].any()  # dx at 382 is real motion
    assert feats[381, :, 4:6].any()


def test_statistics_use_whole_sequence_before_truncation():
    xyz = late_shift()
    full, _ = preprocess(xyz)
    first, _ = preprocess(xyz[:MAX_LEN])
    assert np.abs(full - first).max() > 0.1  # the late frames moved the origin and scale
    np.testing.assert_allclose(full, reference_features(xyz)[0], atol=ATOL, rtol=RTOL)


def test_face_missing_origin_falls_back_to_half():
    xyz = face_missing()
    feats, _ = preprocess(xyz)
    hands = xyz[:, LHAND_RAW + RHAND_RAW, :2].astype(np.float64)
    sx, sy = np.nanstd(hands[..., 0], ddof=1), np.nanstd(hands[..., 1], ddof=1)
    k = POINTS.index(470)
    np.testing.assert_allclose(feats[:20, k, 0], (xyz[:, 470, 0] - 0.5) / sx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats[:20, k, 1], (xyz[:, 470, 1] - 0.5) / sy, rtol=1e-5, atol=1e-6)
    lip = POINTS.index(17)
    assert not feats[:, lip].any()  # missing face points become 0


def test_hands_missing_are_zero():
    feats, _ = preprocess(hands_missing())
    idx = [POINTS.index(i) for i in LHAND_RAW + RHAND_RAW]
    assert not feats[:, idx].any()
    assert feats[:40, POINTS.index(0), :2].any()


def test_identical_points_zero_std_gives_zeros():
    feats, mask = preprocess(identical_points())
    assert mask.sum() == 25
    assert not feats.any()  # x - origin is 0 everywhere; std guarded to 1, not divided by 0


def test_single_point_undefined_std():
    xyz = single_point()
    feats, _ = preprocess(xyz)
    k = POINTS.index(470)
    # origin 0.5 (landmark 17 never present), std 1 (one value): x' = x - 0.5, from frame 9 through the padding
    np.testing.assert_allclose(feats[9:, k, 0], np.float32(0.8) - 0.5, rtol=1e-6)
    np.testing.assert_allclose(feats[9:, k, 1], np.float32(1.6) - 0.5, rtol=1e-6)
    assert not feats[:9].any()
    assert not feats[:, :, 2:].any()  # every difference touches a NaN or the repeated frame
    others = np.delete(np.arange(118), k)
    assert not feats[:, others].any()


def test_all_nan_is_all_zero():
    feats, mask = preprocess(all_nan())
    assert not feats.any()
    assert mask.sum() == 6


def test_z_is_ignored():
    xyz = random_sequence(30, seed=5)
    other = xyz.copy()
    other[..., 2] = np.nan
    np.testing.assert_array_equal(preprocess(other)[0], preprocess(xyz)[0])
    np.testing.assert_array_equal(compact_features(other)[1], compact_features(xyz)[1])


def test_missing_marks_x_or_y_nan():
    xyz = x_or_y_only_missing()
    _, missing = compact_features(xyz)
    expected = np.zeros((20, 118), dtype=bool)
    expected[2, POINTS.index(470)] = expected[3, POINTS.index(0)] = expected[19, POINTS.index(17)] = True
    expected[5, [POINTS.index(i) for i in range(522, 530)]] = True
    np.testing.assert_array_equal(missing, expected)


# ---------------------------------------------------------------- missing-bit packing


@pytest.mark.parametrize("L", [1, 7, 384])
def test_pack_missing_round_trip_and_bit_order(L):
    rng = np.random.default_rng(L)
    missing = rng.random((L, 118)) < 0.4
    packed = pack_missing(missing)
    assert packed.shape == (L, 15)
    assert packed.dtype == np.uint8
    # Independent big-endian packing: bit 7 of byte j is point 8j.
    expected = np.zeros((L, 15), dtype=np.uint8)
    for i in range(L):
        for p in range(118):
            if missing[i, p]:
                expected[i, p // 8] |= 1 << (7 - p % 8)
    np.testing.assert_array_equal(packed, expected)
    unpacked = unpack_missing(packed)
    assert unpacked.dtype == np.bool_
    np.testing.assert_array_equal(unpacked, missing)


def test_n_packed_is_bytes_per_frame_of_118_bits():
    assert N_PACKED == 15
    assert pack_missing(np.zeros((2, 118), dtype=bool)).shape == (2, N_PACKED)


# ---------------------------------------------------------------- the padding rule


def test_padded_index_repeats_the_last_real_frame():
    np.testing.assert_array_equal(padded_index(3, 6), [0, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(padded_index(1, 3), [0, 0, 0])
    np.testing.assert_array_equal(padded_index(5, 3), [0, 1, 2])  # longer than out_len: truncated


def test_pad_frames_repeats_the_last_frame():
    a = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.uint8)
    padded = pad_frames(a, 5)
    np.testing.assert_array_equal(padded, [[1, 2], [3, 4], [5, 6], [5, 6], [5, 6]])
    assert padded.dtype == np.uint8
    np.testing.assert_array_equal(pad_frames(a, 2), [[1, 2], [3, 4]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("L", [1, 5, MAX_LEN])
def test_pad_features_into_out_equals_without(dtype, L):
    compact = np.random.default_rng(L).normal(0, 1, (L, 118, 6)).astype(dtype)
    want, want_mask = pad_features(compact.astype(np.float32))
    out = np.full((MAX_LEN, 118, 6), np.nan, dtype=np.float32)  # junk everywhere: every element must be written
    got, mask = pad_features(compact, out=out)
    assert got is out
    assert got.tobytes() == want.tobytes()
    np.testing.assert_array_equal(mask, want_mask)
    assert mask.sum() == L


def test_pad_features_fills_one_row_of_a_batch():
    a = np.random.default_rng(0).normal(0, 1, (3, 118, 6)).astype(np.float32)
    batch = np.full((2, 5, 118, 6), np.nan, dtype=np.float32)
    pad_features(a, 5, out=batch[1])
    assert batch[1].tobytes() == pad_features(a, 5)[0].tobytes()
    np.testing.assert_array_equal(batch[1, 3:, :, :2], np.broadcast_to(a[2, :, :2], (2, 118, 2)))
    np.testing.assert_array_equal(batch[1, 3:, :, 2:], 0.0)
    assert np.isnan(batch[0]).all()


def test_pad_features_refuses_out_of_another_shape():
    with pytest.raises(ValueError, match=r"^out has shape \(4, 118, 6\), expected \(5, 118, 6\)$"):
        pad_features(np.zeros((3, 118, 6), np.float32), 5, out=np.zeros((4, 118, 6), np.float32))


# ---------------------------------------------------------------- batched features_from_positions


def _batch(xyzs: list[np.ndarray], T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of several sequences padded to T frames with junk past each length, and the lengths."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(1e3, 1e4, size=(len(xyzs), T, 118, 2)).astype(np.float32)  # junk
    pos[:, ::3, ::5] = np.nan  # junk NaN too
    lengths = []
    for i, xyz in enumerate(xyzs):
        p = normalized_positions(xyz)
        n = min(len(p), T)
        pos[i, :n] = p[:n]
        lengths.append(len(xyz))
    return pos, np.array(lengths)


@pytest.mark.parametrize(("lengths", "T"), [((1, 2, 3, 30, 105), 105), ((450, 7, 384, 385), 460)])
def test_features_from_positions_torch_batch(lengths, T):
    xyzs = [random_sequence(n, seed=100 + n) for n in lengths]
    pos, lens = _batch(xyzs, T, seed=T)
    out = features_from_positions(torch.from_numpy(pos), torch.from_numpy(lens), out_len=MAX_LEN)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (len(lengths), MAX_LEN, 118, 6)
    assert out.dtype == torch.float32
    out = out.numpy()
    assert np.isfinite(out).all()
    same_numpy = features_from_positions(pos, lens, out_len=MAX_LEN)  # numpy batch path
    np.testing.assert_array_equal(same_numpy, out)
    for i, (xyz, n) in enumerate(zip(xyzs, lengths, strict=True)):
        feats, mask = preprocess(xyz)
        np.testing.assert_array_equal(out[i], feats)  # same as the per-sequence numpy result
        L = min(n, MAX_LEN)
        # padding rule past the real frames: last real position repeated, zero motion
        np.testing.assert_array_equal(out[i, L:, :, :2], np.broadcast_to(out[i, L - 1, :, :2], (MAX_LEN - L, 118, 2)))
        assert not out[i, L:, :, 2:].any()
        np.testing.assert_array_equal(mask, np.arange(MAX_LEN) < L)
        np.testing.assert_allclose(out[i], reference_features(xyz)[0], atol=ATOL, rtol=RTOL)


def test_features_from_positions_real_files_in_torch_batch(shared_dir):
    root = shared_dir / "gislr-sample" / "train_landmark_files"
    xyzs = [read_landmarks(p) for p in sorted(root.glob("*/*.parquet"))]
    assert sorted(len(x) for x in xyzs) == [3, 30, 105]
    pos, lens = _batch(xyzs, 120, seed=0)
    out = features_from_positions(torch.from_numpy(pos), torch.from_numpy(lens), out_len=MAX_LEN).numpy()
    for i, xyz in enumerate(xyzs):
        np.testing.assert_array_equal(out[i], preprocess(xyz)[0])


def test_features_from_positions_default_out_len_is_input_length():
    xyz = random_sequence(12, seed=3)
    pos = normalized_positions(xyz)
    out = features_from_positions(pos, len(pos))
    assert out.shape == (12, 118, 6)
    np.testing.assert_array_equal(out, preprocess(xyz)[0][:12])


# ---------------------------------------------------------------- on torch tensors (the exported graph)


@pytest.mark.parametrize("name", list(CASES))
def test_compact_features_on_torch_equal_numpy(name):
    xyz = CASES[name]()
    feats, missing = compact_features(xyz)
    t_feats, t_missing = compact_features(torch.from_numpy(xyz))
    assert isinstance(t_feats, torch.Tensor) and t_feats.dtype == torch.float32 and t_missing.dtype == torch.bool
    assert t_feats.numpy().tobytes() == feats.tobytes()  # bit for bit, so the exported graph computes the same
    np.testing.assert_array_equal(t_missing.numpy(), missing)
    pos = normalized_positions(torch.from_numpy(xyz))
    assert pos.dtype == torch.float32
    assert pos.numpy().tobytes() == normalized_positions(xyz).tobytes()


def test_compact_features_on_torch_real_files(sample_file):
    xyz = read_landmarks(sample_file[0])
    assert compact_features(torch.from_numpy(xyz))[0].numpy().tobytes() == compact_features(xyz)[0].tobytes()


def test_features_from_positions_torch_int_length():
    # One sequence with a plain int length, the form the exported graph uses (a symbolic int there).
    pos = normalized_positions(CASES["T500"]())[:MAX_LEN]
    out = features_from_positions(torch.from_numpy(pos), MAX_LEN)
    np.testing.assert_array_equal(out.numpy(), features_from_positions(pos, MAX_LEN))
    assert not out[MAX_LEN - 2 :, :, 4:].any() and out[MAX_LEN - 3, :, 4:].any()  # dx2 zero where t+2 reaches 384


@pytest.mark.slow
def test_numpy_features_do_not_import_torch():
    # The pipeline's workers compute features without torch: the torch branches import it lazily.
    code = (
        "import sys, numpy as np\n"
        "from pipeline.features import compact_features\n"
        "compact_features(np.zeros((3, 543, 3), np.float32))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
