"""The reference preprocessing: raw (T, 543, 3) landmarks -> normalized (L, 118, 6) features.

Channels are `[x, y, dx, dy, dx2, dy2]`. `features_from_positions` is the one definition
of the motion channels; it works on numpy arrays for one sequence and on torch tensors
for a batch, so the trainer's augmentations recompute motion exactly as the pipeline does.
The padding rule (frame `t` of a sequence of `L` real frames is frame `min(t, L-1)`, with
zero motion past `L`) is `padded_index` for stored per-sequence arrays (`pad_features`,
`pad_frames`); `features_from_positions` applies the same index, batched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.landmarks import N_POINTS, POINT_LANDMARKS, REFERENCE_LANDMARK

MAX_LEN = 384
N_CHANNELS = 6
FEATURE_SHAPE = (MAX_LEN, N_POINTS, N_CHANNELS)
REFERENCE_FALLBACK = 0.5  # origin used when the reference landmark is NaN in every frame
# Version of the arithmetic in this module: bump it with any change that alters the features, so
# the build's fingerprint changes and old shards are never mixed with new ones (nor reused).
FEATURES_VERSION = 1

_POINTS = np.array(POINT_LANDMARKS)


def normalized_positions(xyz: Any) -> Any:
    """(T, 543, 2 or 3) raw landmarks -> (T, 118, 2) float32 positions, NaN where a point is missing.

    Origin: NaN-mean of raw landmark 17 over all frames (0.5 where entirely NaN).
    Scale: NaN-aware std per axis over all frames and the 118 points (correction=1),
    replaced by 1 where it is 0 or undefined. Statistics use the whole sequence, in float64.
    Works on a numpy array (the pipeline) or a torch tensor (the exported model's graph):
    only the gathering and casting differ, the statistics are the same functions.
    """
    if isinstance(xyz, np.ndarray):
        ref = xyz[:, REFERENCE_LANDMARK, :2].T.astype(np.float64)  # (2, T)
        pts = np.take(xyz, _POINTS, axis=1)[..., :2]  # (T, 118, 2)
        # per axis as contiguous rows: reductions along the last axis are the fast ones
        planes = np.ascontiguousarray(pts.reshape(-1, 2).T, dtype=np.float64)  # (2, T*118)
    else:
        import torch

        ref = xyz[:, REFERENCE_LANDMARK, :2].T.to(torch.float64)  # (2, T)
        pts = xyz[:, POINT_LANDMARKS, :2]  # (T, 118, 2)
        planes = pts.reshape(-1, 2).T.to(torch.float64)  # (2, T*118)
    origin = _nan_mean(ref, fallback=REFERENCE_FALLBACK)  # (2,)
    std = _nan_std(planes)  # (2,)
    norm = (pts - origin) / std  # float64
    return norm.astype(np.float32) if isinstance(norm, np.ndarray) else norm.float()


def _namespace(a: Any) -> Any:
    """The module whose functions apply to `a`: numpy, or torch (whose isnan, where, sqrt, isfinite match numpy's)."""
    if isinstance(a, np.ndarray):
        return np
    import torch

    return torch


def _nan_mean(rows: Any, fallback: float) -> Any:
    """Mean of each row ignoring NaN; `fallback` for a row with no value."""
    xp = _namespace(rows)
    present = ~xp.isnan(rows)
    n = present.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = xp.where(present, rows, 0.0).sum(axis=1) / n
    return xp.where(n > 0, mean, fallback)


def _nan_std(rows: Any) -> Any:
    """Std of each row ignoring NaN (correction=1); 1 where it is 0 or undefined."""
    xp = _namespace(rows)
    present = ~xp.isnan(rows)
    n = present.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = xp.where(present, rows, 0.0).sum(axis=1) / n
        dev = xp.where(present, rows - mean[:, None], 0.0)
        std = xp.sqrt((dev * dev).sum(axis=1) / (n - 1))
    return xp.where((n > 1) & xp.isfinite(std) & (std > 0), std, 1.0)


def features_from_positions(pos: Any, lengths: Any, out_len: int | None = None, max_len: int = MAX_LEN) -> Any:
    """Positions (..., T, P, 2) with NaN for missing points -> features (..., out_len, P, 6).

    Works on a numpy array or a torch tensor. `lengths` (shape `...`) counts the real
    frames; frames at or past it are padding: the last real position repeated, motion
    zero. `dx[t] = x[t+1] - x[t]`, `dx2[t] = x[t+2] - x[t]` on the sequence padded to
    `max_len`, zero where `t+1` (`t+2`) reaches `max_len`. NaN becomes 0.
    """
    n = out_len or pos.shape[-3]
    frames, points, c = pos.shape[-3:]
    flat = pos.reshape(-1, points, c)  # (N*T, P, 2): one row per frame of every sequence
    if isinstance(pos, np.ndarray):
        lengths, t = np.asarray(lengths).reshape(-1, 1), np.arange(n + 2)
        base = np.arange(flat.shape[0] // frames)[:, None] * frames
        index = (np.minimum(t, lengths - 1) + base).reshape(-1)
    else:
        import torch

        if isinstance(lengths, (int, torch.SymInt)):  # as_tensor would freeze an exported graph's length to a constant
            lengths = torch.full((), lengths, dtype=torch.int64)
        lengths, t = torch.as_tensor(lengths, device=pos.device).reshape(-1, 1), torch.arange(n + 2, device=pos.device)
        base = torch.arange(flat.shape[0] // frames, device=pos.device)[:, None] * frames
        index = (torch.minimum(t, lengths - 1) + base).reshape(-1)
    # frames 0..n+1 with padding by the rule (past each length: the last real frame); one gather
    ext = flat[index].reshape(pos.shape[:-3] + (n + 2, points, c))
    cur = ext[..., :n, :, :]
    if isinstance(pos, np.ndarray):
        out = np.empty(pos.shape[:-3] + (n, points, 3 * c), dtype=pos.dtype)
        out[..., :c] = cur
        out[..., c : 2 * c] = ext[..., 1 : n + 1, :, :] - cur  # zero (or NaN -> 0) on padding: frames repeat
        out[..., 2 * c :] = ext[..., 2:, :, :] - cur
        out[..., max_len - 1 :, :, c : 2 * c] = 0.0  # t+1 reaches max_len
        out[..., max_len - 2 :, :, 2 * c :] = 0.0  # t+2 reaches max_len
        return np.nan_to_num(out, copy=False, nan=0.0)
    # The same, without writes into slices (an exported graph pays for each with transposes and a
    # scatter) and with the two rules past max_len as conditions on the frame index (a slice from a
    # fixed frame would make an exported graph guard on its length, and so pin the lengths it accepts).
    frame = t[:n, None, None]  # (n, 1, 1)
    dx = (ext[..., 1 : n + 1, :, :] - cur).where(frame + 1 < max_len, 0.0)
    dx2 = (ext[..., 2:, :, :] - cur).where(frame + 2 < max_len, 0.0)
    return torch.cat([cur, dx, dx2], dim=-1).nan_to_num_(nan=0.0)


def compact_features(xyz: Any, max_len: int = MAX_LEN) -> tuple[Any, Any]:
    """(T, 543, 3) -> features (L, 118, 6) float32 of the real frames and missing (L, 118) bool.

    `L = min(T, max_len)`; `missing` marks points whose source x or y was NaN. Works on a numpy
    array or a torch tensor (the exported model runs this function on its input).
    """
    pos = _first_frames(normalized_positions(xyz), max_len)  # statistics before truncation
    missing = _namespace(pos).isnan(pos).any(-1)
    return features_from_positions(pos, pos.shape[0], max_len=max_len), missing


def _first_frames(a: Any, n: int) -> Any:
    """`a[:n]`; for a torch tensor through `sym_min`, so that an exported graph does not guard on its length."""
    if isinstance(a, np.ndarray):
        return a[:n]
    import torch

    return a[: torch.sym_min(a.shape[0], n)]


def padded_index(length: int, out_len: int) -> np.ndarray:
    """(out_len,) frame indices of a sequence of `length` real frames padded by the rule: `min(t, length - 1)`."""
    return np.minimum(np.arange(out_len), length - 1)


def pad_frames(a: np.ndarray, out_len: int) -> np.ndarray:
    """Per-frame data (L, ...) padded (or truncated) to `out_len` frames by repeating its last frame."""
    return a[padded_index(len(a), out_len)]


def pad_features(
    compact: np.ndarray, out_len: int = MAX_LEN, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Compact (L, P, 6) -> (out_len, P, 6) by the padding rule, and the (out_len,) bool mask.

    Reproduces exactly what `features_from_positions` gives for padded frames: positions of
    frame `L-1` repeated (`padded_index`), motion zero. `out`, when given, is a preallocated
    (out_len, P, 6) array of any float dtype (e.g. a row of a batch) that is filled and returned.
    """
    n = min(len(compact), out_len)
    shape = (out_len,) + compact.shape[1:]
    if out is None:
        out = np.empty(shape, dtype=compact.dtype)
    elif out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    out[:n] = compact[:n]
    out[n:, :, :2] = compact[n - 1, :, :2]
    out[n:, :, 2:] = 0.0
    return out, np.arange(out_len) < n


def preprocess(xyz: np.ndarray, max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
    """(T, 543, 3) raw landmarks -> features (max_len, 118, 6) float32 and mask (max_len,) bool."""
    pos = normalized_positions(xyz)[:max_len]
    return features_from_positions(pos, len(pos), out_len=max_len, max_len=max_len), np.arange(max_len) < len(pos)


N_PACKED = (N_POINTS + 7) // 8  # bytes per frame of the packed missing mask: 15


def pack_missing(missing: np.ndarray) -> np.ndarray:
    """(L, 118) bool -> (L, N_PACKED) uint8, bits packed along the points (big-endian bit order)."""
    return np.packbits(missing, axis=-1)


def unpack_missing(packed: np.ndarray, n_points: int = N_POINTS) -> np.ndarray:
    """Inverse of `pack_missing`: (..., N_PACKED) uint8 -> (..., 118) bool."""
    return np.unpackbits(packed, axis=-1, count=n_points).astype(bool)
