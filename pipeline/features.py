"""The reference preprocessing: raw (T, 543, 3) landmarks -> normalized (L, 118, 6) features.

Channels are `[x, y, dx, dy, dx2, dy2]`. `features_from_positions` is the one definition
of the motion channels and of the padding rule; it works on numpy arrays for one
sequence and on torch tensors for a batch, so the trainer's augmentations recompute
motion exactly as the pipeline does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.landmarks import N_POINTS, POINT_LANDMARKS, REFERENCE_LANDMARK

MAX_LEN = 384
N_CHANNELS = 6
FEATURE_SHAPE = (MAX_LEN, N_POINTS, N_CHANNELS)
REFERENCE_FALLBACK = 0.5  # origin used when the reference landmark is NaN in every frame

_POINTS = np.array(POINT_LANDMARKS)


def normalized_positions(xyz: np.ndarray) -> np.ndarray:
    """(T, 543, 3) raw landmarks -> (T, 118, 2) float32 positions, NaN where a point is missing.

    Origin: NaN-mean of raw landmark 17 over all frames (0.5 where entirely NaN).
    Scale: NaN-aware std per axis over all frames and the 118 points (correction=1),
    replaced by 1 where it is 0 or undefined. Statistics use the whole sequence.
    """
    xy = xyz[:, :, :2].astype(np.float64)  # (T, 543, 2)
    ref = xy[:, REFERENCE_LANDMARK, :]  # (T, 2)
    present = ~np.isnan(ref)
    count = present.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        origin = np.where(present, ref, 0.0).sum(axis=0) / count
    origin = np.where(count > 0, origin, REFERENCE_FALLBACK)  # (2,)

    pts = xy[:, _POINTS, :]  # (T, 118, 2)
    std = _nan_std(pts.reshape(-1, 2))  # (2,)
    return ((pts - origin) / std).astype(np.float32)


def _nan_std(values: np.ndarray) -> np.ndarray:
    """Per-column std ignoring NaN (correction=1); 1 where it is 0 or undefined."""
    present = ~np.isnan(values)
    n = present.sum(axis=0)
    filled = np.where(present, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=0) / n
        sq = np.where(present, (values - mean) ** 2, 0.0).sum(axis=0)
        std = np.sqrt(sq / (n - 1))
    return np.where((n > 1) & np.isfinite(std) & (std > 0), std, 1.0)


def features_from_positions(pos: Any, lengths: Any, out_len: int | None = None, max_len: int = MAX_LEN) -> Any:
    """Positions (..., T, P, 2) with NaN for missing points -> features (..., out_len, P, 6).

    Works on a numpy array or a torch tensor. `lengths` (shape `...`) counts the real
    frames; frames at or past it are padding: the last real position repeated, motion
    zero. `dx[t] = x[t+1] - x[t]`, `dx2[t] = x[t+2] - x[t]` on the sequence padded to
    `max_len`, zero where `t+1` (`t+2`) reaches `max_len`. NaN becomes 0.
    """
    is_torch = not isinstance(pos, np.ndarray)
    if is_torch:
        import torch

        lengths = torch.as_tensor(lengths, device=pos.device)
        t = torch.arange(out_len or pos.shape[-3], device=pos.device)
        minimum, take = torch.minimum, torch.take_along_dim
    else:
        lengths = np.asarray(lengths)
        t = np.arange(out_len or pos.shape[-3])
        minimum, take = np.minimum, np.take_along_axis

    last = lengths[..., None] - 1  # (..., 1)

    def frames(idx: Any) -> Any:  # (..., out_len, P, 2) positions at frame indices idx
        return take(pos, idx[..., None, None], -3)

    cur = frames(minimum(t, last))
    real = t <= last  # (..., out_len)
    d1 = frames(minimum(t + 1, last)) - cur
    d2 = frames(minimum(t + 2, last)) - cur
    zero = 0.0
    if is_torch:
        d1 = torch.where((real & (t + 1 < max_len))[..., None, None], d1, zero)
        d2 = torch.where((real & (t + 2 < max_len))[..., None, None], d2, zero)
        return torch.nan_to_num(torch.cat([cur, d1, d2], dim=-1), nan=0.0)
    d1 = np.where((real & (t + 1 < max_len))[..., None, None], d1, zero)
    d2 = np.where((real & (t + 2 < max_len))[..., None, None], d2, zero)
    return np.nan_to_num(np.concatenate([cur, d1, d2], axis=-1), nan=0.0).astype(pos.dtype, copy=False)


def compact_features(xyz: np.ndarray, max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
    """(T, 543, 3) -> features (L, 118, 6) float32 of the real frames and missing (L, 118) bool.

    `L = min(T, max_len)`; `missing` marks points whose source x or y was NaN.
    """
    pos = normalized_positions(xyz)[:max_len]  # statistics before truncation
    missing = np.isnan(pos).any(axis=-1)
    return features_from_positions(pos, len(pos), max_len=max_len), missing


def pad_features(compact: np.ndarray, out_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Compact (L, P, 6) -> (out_len, P, 6) by the padding rule, and the (out_len,) bool mask.

    Restores exactly what `features_from_positions` gives for padded frames: the last
    real position repeated, motion zero.
    """
    n = min(len(compact), out_len)
    out = np.zeros((out_len,) + compact.shape[1:], dtype=compact.dtype)
    out[:n] = compact[:n]
    out[n:, :, :2] = compact[n - 1, :, :2]
    mask = np.zeros(out_len, dtype=bool)
    mask[:n] = True
    return out, mask


def preprocess(xyz: np.ndarray, max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
    """(T, 543, 3) raw landmarks -> features (max_len, 118, 6) float32 and mask (max_len,) bool."""
    pos = normalized_positions(xyz)[:max_len]
    return features_from_positions(pos, len(pos), out_len=max_len, max_len=max_len), np.arange(max_len) < len(pos)


def pack_missing(missing: np.ndarray) -> np.ndarray:
    """(L, 118) bool -> (L, 15) uint8, bits packed along the points (big-endian bit order)."""
    return np.packbits(missing, axis=-1)


def unpack_missing(packed: np.ndarray, n_points: int = N_POINTS) -> np.ndarray:
    """Inverse of `pack_missing`: (..., 15) uint8 -> (..., 118) bool."""
    return np.unpackbits(packed, axis=-1, count=n_points).astype(bool)
