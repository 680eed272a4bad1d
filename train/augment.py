"""Batched, per-sequence data augmentation on the GPU (or CPU), applied to landmark positions.

`augment_batch` turns the batch's features back into positions (NaN where a point is
missing), transforms the positions, and recomputes every feature channel with
`pipeline.features.features_from_positions`, the one definition of the motion channels
and of the padding rule. Consequences:

* a point missing in the source stays missing (NaN propagates through every operation),
  and augmentations that drop data make points *missing*, never far-away points;
* `dx`/`dx2` always equal the formula applied to the augmented positions;
* padding frames repeat the last real frame (positions and `missing`), motion zero.

Every random quantity is drawn once per sequence (the affine matrix is one matrix for
all frames of a sequence), vectorized over the batch: one (B, 15) uniform draw in a fixed
layout whatever the configuration (so a seed gives the same parameters to the
augmentations that stay enabled when others are switched off), plus one (B, T') draw
for the temporal mask's frame choice when it is enabled. No per-sample or per-frame
Python loops; the only host sync is reading `max(L')` for the output shape.

Order of operations: temporal resample and horizontal flip (they commute exactly; the
flip's point swap is done first, on the shorter input) -> affine (the flip's x -> -x is
folded into its matrix) -> temporal mask -> temporal cutout -> group cutout.

Precondition: every sequence has at least one real frame, real frames form a prefix of
each row, and the padding follows the pipeline's rule (as the collate produces it).

Temporal resample: a sequence of `L` real frames gets the length factor `s` (drawn in
`resample_range`) and the new length `L' = clamp(round(L * s), 1, max_len)`. New frame
`t` samples source time `t * (L - 1) / (L' - 1)` (0 when `L' == 1`): the first and last
frames are kept and the whole sign is always kept, so a sequence that would exceed
`max_len` is resampled to exactly `max_len` frames (its factor is clipped, nothing is
cropped). `s > 1` slows the sign down (more frames), `s < 1` speeds it up; `s == 1` is the
identity. Positions are interpolated linearly between the two neighbouring source
frames. NaN rule: when the source time falls exactly on a source frame (weight 0 on the
next frame) the frame is copied and the other neighbour is ignored; otherwise a point is
NaN (missing) when it is NaN in either neighbour. The batch's `T` becomes `max(L')`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from pipeline.features import MAX_LEN, features_from_positions
from pipeline.landmarks import FLIP_PERMUTATION, GROUP_SLICES
from train.batch import Batch

__all__ = ["AugmentConfig", "augment_batch", "positions"]

# Columns of the per-sequence uniform draws (B, _N_DRAWS); fixed whatever the config.
_P_RESAMPLE, _P_FLIP, _P_AFFINE, _P_TMASK, _P_CUTOUT, _P_GROUP = range(6)
_SPEED, _ROT, _SCALE, _SHEAR_X, _SHEAR_Y, _SHIFT_X, _SHIFT_Y, _CUT_START, _GROUP = range(6, 15)
_N_DRAWS = 15


@dataclass
class AugmentConfig:
    """Probabilities (per sequence) and ranges of the augmentations; defaults are the project's.

    A probability of 0 switches an augmentation off; with every probability 0, or
    `enabled=False`, `augment_batch` returns its input unchanged.
    """

    enabled: bool = True  # master switch

    # Temporal resample: length factor s uniform in the range, new length round(L * s).
    resample_p: float = 1.0
    resample_range: tuple[float, float] = (0.5, 1.5)

    # Horizontal flip with the left/right swap (FLIP_PERMUTATION), x -> -x about the lip centre.
    flip_p: float = 0.5

    # Affine about the origin (the normalized lip centre), one matrix + shift per sequence:
    # pos <- R(rotation) @ Shear @ scale * pos + shift.
    affine_p: float = 0.75
    rotation_deg: float = 10.0  # rotation angle uniform in [-rotation_deg, rotation_deg] degrees
    scale_range: tuple[float, float] = (0.9, 1.1)  # isotropic scale, uniform in the range
    shear_deg: float = 10.0  # shear angles (x and y, independent) uniform in +-shear_deg; factor = tan(angle)
    shift: float = 0.1  # shift per axis uniform in [-shift, shift] (normalized feature units)

    # Temporal mask: round(temporal_mask_fraction * L) random real frames become missing
    # (capped at L - 1 so a sequence keeps at least one frame).
    temporal_mask_p: float = 0.1
    temporal_mask_fraction: float = 0.1

    # Temporal cutout: a contiguous block of min(cutout_frames, floor(cutout_max_fraction * L))
    # real frames, at a uniformly random start, becomes missing.
    cutout_p: float = 0.5
    cutout_frames: int = 10
    cutout_max_fraction: float = 0.5

    # Spatial (group) cutout, off by default: one group of GROUP_SLICES, chosen uniformly
    # from group_cutout_groups, becomes missing in every frame of the sequence.
    group_cutout_p: float = 0.0
    group_cutout_groups: tuple[str, ...] = ("lhand", "rhand")

    max_len: int = MAX_LEN  # resampled sequences never exceed this many frames

    def __post_init__(self) -> None:
        probabilities = (self.resample_p, self.flip_p, self.affine_p, self.temporal_mask_p, self.cutout_p)
        if not all(0.0 <= p <= 1.0 for p in probabilities + (self.group_cutout_p,)):
            raise ValueError("augmentation probabilities must lie in [0, 1]")
        for name in ("resample_range", "scale_range"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if not 0.0 <= self.temporal_mask_fraction <= 1.0 or not 0.0 <= self.cutout_max_fraction <= 1.0:
            raise ValueError("temporal_mask_fraction and cutout_max_fraction must lie in [0, 1]")
        if self.cutout_frames < 0 or not 1 <= self.max_len <= MAX_LEN:
            raise ValueError(f"cutout_frames must be >= 0 and max_len in [1, {MAX_LEN}]")
        unknown = set(self.group_cutout_groups) - set(GROUP_SLICES)
        if unknown:
            raise ValueError(f"unknown groups {sorted(unknown)}; known: {sorted(GROUP_SLICES)}")

    def is_identity(self) -> bool:
        """True when no augmentation can fire."""
        probabilities = (self.resample_p, self.flip_p, self.affine_p, self.temporal_mask_p, self.cutout_p)
        return not self.enabled or all(p <= 0 for p in probabilities + (self.group_cutout_p,))


def positions(batch: Batch) -> torch.Tensor:
    """The batch's positions (B, T, 118, 2) [x, y], NaN where a point is missing."""
    return torch.where(batch.missing[..., None], torch.nan, batch.x[..., :2])  # (B, T, 118, 2)


def augment_batch(batch: Batch, cfg: AugmentConfig, generator: torch.Generator | None = None) -> Batch:
    """Augment every sequence of `batch` on its device; returns a new Batch (the input itself if nothing can fire).

    `generator` must live on the batch's device (None: the device's default generator).
    The output's `T` is `max(L')` when resampling is on, otherwise unchanged.
    """
    if cfg.is_identity():
        return batch
    x, device = batch.x, batch.x.device
    bsz, t_in, n_pts = x.shape[0], x.shape[1], x.shape[2]
    lengths = batch.lengths  # (B,) int64
    u = torch.rand(bsz, _N_DRAWS, generator=generator, device=device)  # (B, 15)
    probabilities = [cfg.resample_p, cfg.flip_p, cfg.affine_p, cfg.temporal_mask_p, cfg.cutout_p, cfg.group_cutout_p]
    fire = u[:, :6] < torch.tensor(probabilities, device=device)  # (B, 6) bool
    flip = fire[:, _P_FLIP] if cfg.flip_p > 0 else None  # (B,) bool

    # Positions as coordinate planes (2, B, T, P), x then y: every step is a contiguous pass.
    # Flip's point swap happens here (it commutes exactly with the resample), its x -> -x below.
    planes = _input_planes(x, batch.missing, flip)  # (2, B, T, P), NaN where missing

    t_out = t_in
    if cfg.resample_p > 0:
        lo, hi = cfg.resample_range
        speed = torch.where(fire[:, _P_RESAMPLE], lo + (hi - lo) * u[:, _SPEED], 1.0)  # (B,)
        new_lengths = torch.round(lengths * speed).long().clamp_(1, cfg.max_len)  # (B,)
        t_out = int(new_lengths.max())  # the one host sync: the output shape depends on it
        planes = _resample(planes, lengths, new_lengths, t_out)  # (2, B, T', P)
        lengths = new_lengths

    sign = None if flip is None else torch.where(flip, -1.0, 1.0).to(planes.dtype)  # (B,) x factor of the flip
    if cfg.affine_p > 0:
        mat, shift = _affine_params(u, fire[:, _P_AFFINE], cfg)  # (B, 2, 2), (B, 2)
        if sign is not None:
            mat = mat * torch.stack([sign, torch.ones_like(sign)], dim=-1)[:, None, :]  # mat @ diag(sign, 1)
        planes = _affine(planes, mat, shift)  # (2, B, T', P)
    elif sign is not None:
        planes[0].mul_(sign[:, None, None])

    # Drops: whole frames (temporal mask, cutout) and whole groups (group cutout) become missing.
    t = torch.arange(t_out, device=device)  # (T',)
    frame_drop = None
    if cfg.temporal_mask_p > 0:
        frame_drop = _temporal_mask(lengths, t, fire[:, _P_TMASK], cfg.temporal_mask_fraction, generator)
    if cfg.cutout_p > 0:
        cut = _cutout(lengths, t, fire[:, _P_CUTOUT], u[:, _CUT_START], cfg)  # (B, T')
        frame_drop = cut if frame_drop is None else frame_drop | cut
    if frame_drop is not None:  # padding frames follow the last real frame
        last = torch.minimum(t[None, :], lengths[:, None] - 1)  # (B, T')
        frame_drop = torch.take_along_dim(frame_drop, last, dim=1)  # (B, T')
        planes.mul_(_nan_factor(frame_drop, planes.dtype)[:, :, None])  # planes never aliases the input
    if cfg.group_cutout_p > 0 and cfg.group_cutout_groups:
        point_drop = _group_cutout(fire[:, _P_GROUP], u[:, _GROUP], cfg.group_cutout_groups, n_pts, device)
        planes.mul_(_nan_factor(point_drop, planes.dtype)[:, None, :])  # (B, P) -> whole sequence

    pos = planes.permute(1, 2, 3, 0).contiguous()  # (B, T', P, 2), padded by the rule
    feats = features_from_positions(pos, lengths, out_len=t_out)  # (B, T', P, 6), NaN -> 0
    # x and y are NaN together by construction (every step writes NaN to both or mixes both), so x decides;
    # padding frames repeat the last real frame's positions, hence its missing points.
    missing = torch.isnan(planes[0])  # (B, T', P)
    mask = t[None, :] < lengths[:, None]  # (B, T')
    return replace(batch, x=feats, mask=mask, missing=missing)


def _nan_factor(drop: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool -> float: 1 where False, NaN where True (multiplying by it is exact; faster than masked_fill on CPU)."""
    return (~drop).to(dtype).reciprocal_().mul_(0.0).add_(1.0)  # 1/1*0+1 = 1, 1/0*0+1 = inf*0+1 = NaN


def _input_planes(x: torch.Tensor, missing: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """Features (B, T, P, 6) -> position planes (2, B, T, P), NaN where missing, points swapped where `flip`."""
    bsz, t_in, n_pts, _ = x.shape
    factor = _nan_factor(missing, x.dtype)  # (B, T, P)
    planes = torch.empty(2, bsz, t_in, n_pts, dtype=x.dtype, device=x.device)
    for c in range(2):
        torch.mul(x[..., c], factor, out=planes[c])
    if flip is None:
        return planes
    ident = torch.arange(n_pts, device=x.device)
    perm = torch.as_tensor(FLIP_PERMUTATION.copy(), device=x.device)
    src_pts = torch.where(flip[:, None], perm[None, :], ident[None, :])  # (B, P) source point of each point
    return torch.gather(planes, 3, src_pts[None, :, None, :].expand_as(planes))  # (2, B, T, P)


def _resample(planes: torch.Tensor, lengths: torch.Tensor, new_lengths: torch.Tensor, t_out: int) -> torch.Tensor:
    """Linear-interpolation resample of (2, B, T, P) to (2, B, t_out, P), padded by the rule.

    Output frame t (clamped to L'-1, so padding repeats the last real frame) samples source
    time t*(L-1)/(L'-1). Weight exactly 0 on the next frame copies the frame (the next frame
    is not read); otherwise NaN in either neighbour gives NaN.
    """
    _, bsz, t_in, n_pts = planes.shape
    device = planes.device
    t = torch.arange(t_out, device=device)  # (T',)
    tc = torch.minimum(t[None, :], new_lengths[:, None] - 1)  # (B, T')
    src = (tc * (lengths[:, None] - 1)).float() / (new_lengths[:, None] - 1).clamp(min=1).float()  # (B, T')
    i0 = src.floor().long()  # (B, T'), in [0, L-1]
    w = src - i0.float()  # (B, T'), in [0, 1)
    i1 = torch.where(w == 0, i0, torch.minimum(i0 + 1, lengths[:, None] - 1))  # (B, T')

    rows = planes.reshape(2, bsz * t_in, n_pts)
    base = torch.arange(bsz, device=device)[:, None] * t_in  # (B, 1)
    p0 = rows.index_select(1, (base + i0).reshape(-1)).view(2, bsz, t_out, n_pts)
    p1 = rows.index_select(1, (base + i1).reshape(-1)).view(2, bsz, t_out, n_pts)
    return p0.lerp_(p1, w.to(planes.dtype)[None, :, :, None])  # (2, B, T', P); w == 0 gives p0 exactly


def _affine(planes: torch.Tensor, mat: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """In place: one matrix (B, 2, 2) and shift (B, 2) per sequence, applied to every point of every frame."""
    m = mat[:, :, :, None, None]  # (B, 2, 2, 1, 1)
    s = shift[:, :, None, None]  # (B, 2, 1, 1)
    px, py = planes[0], planes[1]  # (B, T, P)
    new_x = torch.addcmul(s[:, 0], m[:, 0, 0], px).addcmul_(m[:, 0, 1], py)  # m00 x + m01 y + s0
    py.mul_(m[:, 1, 1]).addcmul_(m[:, 1, 0], px).add_(s[:, 1])  # m10 x + m11 y + s1
    px.copy_(new_x)
    return planes


def _affine_params(u: torch.Tensor, fire: torch.Tensor, cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence matrix R @ Shear * scale (B, 2, 2) and shift (B, 2); identity where not fired."""
    angle = torch.where(fire, math.radians(cfg.rotation_deg) * (2 * u[:, _ROT] - 1), 0.0)  # (B,)
    lo, hi = cfg.scale_range
    scale = torch.where(fire, lo + (hi - lo) * u[:, _SCALE], 1.0)  # (B,)
    shear = math.radians(cfg.shear_deg)
    kx = torch.where(fire, torch.tan(shear * (2 * u[:, _SHEAR_X] - 1)), 0.0)  # (B,)
    ky = torch.where(fire, torch.tan(shear * (2 * u[:, _SHEAR_Y] - 1)), 0.0)  # (B,)
    shift = torch.where(fire[:, None], cfg.shift * (2 * u[:, [_SHIFT_X, _SHIFT_Y]] - 1), 0.0)  # (B, 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    one = torch.ones_like(kx)
    shear_x = torch.stack([torch.stack([one, kx], -1), torch.stack([torch.zeros_like(kx), one], -1)], -2)
    shear_y = torch.stack([torch.stack([one, torch.zeros_like(ky)], -1), torch.stack([ky, one], -1)], -2)
    mat = rot @ shear_x @ shear_y * scale[:, None, None]  # (B, 2, 2)
    return mat, shift


def _temporal_mask(
    lengths: torch.Tensor, t: torch.Tensor, fire: torch.Tensor, fraction: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, T') bool: round(fraction * L) (at most L-1) random real frames of each fired sequence."""
    bsz, t_out = lengths.shape[0], t.shape[0]
    real = t[None, :] < lengths[:, None]  # (B, T')
    scores = torch.rand(bsz, t_out, generator=generator, device=t.device).masked_fill_(~real, 2.0)  # (B, T')
    order = scores.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, t.expand(bsz, t_out))  # (B, T') rank of each frame
    count = torch.minimum(torch.round(lengths * fraction).long(), lengths - 1)  # (B,)
    count = torch.where(fire, count, 0)
    return rank < count[:, None]  # (B, T')


def _cutout(
    lengths: torch.Tensor, t: torch.Tensor, fire: torch.Tensor, u_start: torch.Tensor, cfg: AugmentConfig
) -> torch.Tensor:
    """(B, T') bool: a contiguous block of real frames at a uniform random start, per fired sequence."""
    size = torch.clamp(torch.floor(lengths * cfg.cutout_max_fraction).long(), max=cfg.cutout_frames)  # (B,)
    size = torch.where(fire, size, 0)
    room = lengths - size + 1  # (B,) number of possible starts
    start = torch.minimum((u_start * room).long(), room - 1)  # (B,)
    return (t[None, :] >= start[:, None]) & (t[None, :] < (start + size)[:, None])  # (B, T')


def _group_cutout(
    fire: torch.Tensor, u_group: torch.Tensor, groups: tuple[str, ...], n_pts: int, device: torch.device
) -> torch.Tensor:
    """(B, P) bool: all points of one group (chosen uniformly from `groups`) per fired sequence."""
    table = torch.zeros(len(groups), n_pts, dtype=torch.bool)
    for i, name in enumerate(groups):
        table[i, GROUP_SLICES[name]] = True
    choice = torch.clamp((u_group * len(groups)).long(), max=len(groups) - 1)  # (B,)
    return table.to(device)[choice] & fire[:, None]  # (B, P)
