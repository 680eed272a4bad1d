"""Batched augmentation: the missing-point contract, exact motion recompute, flip/affine geometry, resample, seeding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.features import MAX_LEN, compact_features, features_from_positions, pad_features
from pipeline.landmarks import FLIP_PERMUTATION, GROUP_SLICES, LHAND, POINT_LANDMARKS, RHAND
from train.augment import AugmentConfig, augment_batch, positions
from train.batch import Batch

LH, RH = GROUP_SLICES["lhand"], GROUP_SLICES["rhand"]
PERM = torch.as_tensor(FLIP_PERMUTATION.copy())

# Every augmentation off; tests switch on what they exercise.
OFF = AugmentConfig(resample_p=0.0, flip_p=0.0, affine_p=0.0, temporal_mask_p=0.0, cutout_p=0.0, group_cutout_p=0.0)
IDENTITY_AFFINE = dict(affine_p=1.0, rotation_deg=0.0, scale_range=(1.0, 1.0), shear_deg=0.0, shift=0.0)
ALL_ON = AugmentConfig(resample_p=1.0, flip_p=1.0, affine_p=1.0, temporal_mask_p=1.0, cutout_p=1.0, group_cutout_p=1.0)


# ---------------------------------------------------------------- inputs


def raw_sequence(length: int, rng: np.random.Generator, hand_missing: float = 0.5) -> np.ndarray:
    """Random (length, 543, 3) float32 landmarks; each hand NaN in a random subset of frames."""
    base = rng.uniform(0.0, 1.0, size=(543, 3))
    xyz = (base + 0.02 * rng.normal(size=(length, 543, 3)).cumsum(axis=0)).astype(np.float32)
    xyz[rng.random(length) < hand_missing, LHAND[0] : LHAND[-1] + 1] = np.nan
    xyz[rng.random(length) < hand_missing, RHAND[0] : RHAND[-1] + 1] = np.nan
    return xyz


def make_batch(lengths: list[int], seed: int = 0, pad_to: int | None = None) -> Batch:
    """Collate like the loader: compact features padded by the rule, `missing` repeating its last real frame."""
    rng = np.random.default_rng(seed)
    t = pad_to or max(lengths)
    xs, masks, missings = [], [], []
    for length in lengths:
        feats, missing = compact_features(raw_sequence(length, rng))
        x, mask = pad_features(feats, t)
        xs.append(x)
        masks.append(mask)
        missings.append(np.concatenate([missing, np.repeat(missing[-1:], t - len(missing), axis=0)]))
    return Batch(
        x=torch.from_numpy(np.stack(xs)),
        mask=torch.from_numpy(np.stack(masks)),
        missing=torch.from_numpy(np.stack(missings)),
        labels=torch.arange(len(lengths)),
    )


@pytest.fixture(scope="module")
def batch() -> Batch:
    return make_batch([1, 2, 3, 7, 12, 30, 45, 64, 64, 20, 5, 33])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exactly equal, NaN equal to NaN."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def reference_motion(pos: torch.Tensor, length: int) -> torch.Tensor:
    """Plain-loop features (T, P, 6) for one sequence of positions (T, P, 2) with NaN, `length` real frames."""
    t_len = pos.shape[0]
    out = torch.zeros(t_len, pos.shape[1], 6)
    for t in range(t_len):
        cur = pos[min(t, length - 1)]
        out[t, :, :2] = cur
        if t < length:
            if t + 1 < MAX_LEN:
                out[t, :, 2:4] = pos[min(t + 1, length - 1)] - cur
            if t + 2 < MAX_LEN:
                out[t, :, 4:6] = pos[min(t + 2, length - 1)] - cur
    return torch.nan_to_num(out, nan=0.0)


def check_invariants(out: Batch) -> None:
    """Masks are prefixes matching lengths; padding repeats the last real frame; missing points are all zero."""
    lengths = out.lengths
    t = torch.arange(out.x.shape[1])
    assert out.x.dtype == torch.float32 and out.mask.dtype == torch.bool and out.missing.dtype == torch.bool
    assert out.x.shape[:3] == out.missing.shape and out.mask.shape == out.x.shape[:2]
    assert torch.equal(out.mask, t[None] < lengths[:, None])
    assert int(lengths.min()) >= 1 and int(lengths.max()) <= MAX_LEN
    assert out.x.shape[1] == int(lengths.max())
    assert not torch.isnan(out.x).any()
    assert (out.x[out.missing] == 0).all()
    for b, length in enumerate(lengths.tolist()):
        assert (out.missing[b, length:] == out.missing[b, length - 1]).all()
        assert torch.equal(out.x[b, length:, :, :2], out.x[b, length - 1, :, :2].expand_as(out.x[b, length:, :, :2]))
        assert (out.x[b, length:, :, 2:] == 0).all()


# ---------------------------------------------------------------- identity and seeding


def test_all_probabilities_zero_returns_input(batch: Batch) -> None:
    assert augment_batch(batch, OFF, gen()) is batch
    assert augment_batch(batch, AugmentConfig(enabled=False), gen()) is batch
    assert augment_batch(batch, replace(ALL_ON, enabled=False)) is batch


def test_config_defaults_and_validation() -> None:
    cfg = AugmentConfig()
    assert (cfg.resample_p, cfg.resample_range, cfg.flip_p) == (1.0, (0.5, 1.5), 0.5)
    assert (cfg.affine_p, cfg.rotation_deg, cfg.scale_range) == (0.75, 10, (0.9, 1.1))
    assert (cfg.shear_deg, cfg.shift) == (10, 0.1)
    assert (cfg.temporal_mask_p, cfg.temporal_mask_fraction, cfg.cutout_p, cfg.cutout_frames) == (0.1, 0.1, 0.5, 10)
    assert cfg.group_cutout_p == 0.0
    for bad in (dict(flip_p=1.5), dict(resample_range=(1.5, 0.5)), dict(group_cutout_groups=("tail",))):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)


def test_positions_helper(batch: Batch) -> None:
    pos = positions(batch)
    assert pos.shape == (*batch.missing.shape, 2)
    assert torch.equal(torch.isnan(pos).any(-1), batch.missing)
    assert torch.equal(torch.isnan(pos).all(-1), batch.missing)
    assert torch.equal(pos[~batch.missing], batch.x[..., :2][~batch.missing])


def test_same_seed_same_output_different_seed_differs(batch: Batch) -> None:
    cfg = AugmentConfig()
    a, b, c = (augment_batch(batch, cfg, gen(s)) for s in (7, 7, 8))
    for field in ("x", "mask", "missing"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert a.x.shape != c.x.shape or not torch.equal(a.x, c.x)
    assert torch.equal(a.labels, batch.labels)


def test_input_batch_not_modified(batch: Batch) -> None:
    before = [t.clone() for t in (batch.x, batch.mask, batch.missing)]
    augment_batch(batch, ALL_ON, gen())
    for old, new in zip(before, (batch.x, batch.mask, batch.missing), strict=True):
        assert torch.equal(old, new)


@pytest.mark.parametrize("seed", range(4))
def test_defaults_keep_invariants(batch: Batch, seed: int) -> None:
    check_invariants(augment_batch(batch, AugmentConfig(), gen(seed)))


# ---------------------------------------------------------------- flip


def test_flip_twice_is_identity(batch: Batch) -> None:
    cfg = replace(OFF, flip_p=1.0)
    twice = augment_batch(augment_batch(batch, cfg, gen(1)), cfg, gen(2))
    assert torch.equal(twice.x, batch.x)
    assert torch.equal(twice.missing, batch.missing)
    assert torch.equal(twice.mask, batch.mask)


def test_flip_swaps_hands_and_mirrors_x(batch: Batch) -> None:
    out = augment_batch(batch, replace(OFF, flip_p=1.0), gen())
    check_invariants(out)
    new, old = positions(out), positions(batch)
    assert_same(new[..., LH, 0], -old[..., RH, 0])
    assert_same(new[..., LH, 1], old[..., RH, 1])
    assert_same(new[..., RH, 0], -old[..., LH, 0])
    assert_same(new[..., :, 0], -old[..., PERM, 0])
    assert_same(new[..., :, 1], old[..., PERM, 1])
    assert torch.equal(out.missing, batch.missing[..., PERM])
    centre = POINT_LANDMARKS.index(17)  # maps to itself
    assert_same(new[..., centre, 0], -old[..., centre, 0])


# ---------------------------------------------------------------- affine


def test_identity_affine_and_speed_one_reproduce_positions() -> None:
    batch = make_batch([4, 9, 17, 30], seed=3, pad_to=40)  # extra padding frames: T shrinks to max(L)
    cfg = replace(OFF, resample_p=1.0, resample_range=(1.0, 1.0), **IDENTITY_AFFINE)
    out = augment_batch(batch, cfg, gen())
    check_invariants(out)
    t = out.x.shape[1]
    assert t == 30
    assert_same(positions(out), positions(batch)[:, :t])
    assert torch.equal(out.missing, batch.missing[:, :t])
    assert torch.equal(out.mask, batch.mask[:, :t])
    torch.testing.assert_close(out.x, batch.x[:, :t], rtol=0, atol=1e-6)


def test_rotation_keeps_pairwise_distances(batch: Batch) -> None:
    cfg = replace(OFF, affine_p=1.0, rotation_deg=45.0, scale_range=(1.0, 1.0), shear_deg=0.0, shift=0.3)
    out = augment_batch(batch, cfg, gen())
    assert torch.equal(out.missing, batch.missing)
    new, old = positions(out), positions(batch)
    assert not torch.allclose(new.nan_to_num(), old.nan_to_num())
    d_new = torch.cdist(new.flatten(0, 1).double(), new.flatten(0, 1).double())
    d_old = torch.cdist(old.flatten(0, 1).double(), old.flatten(0, 1).double())
    both = ~torch.isnan(d_old)
    torch.testing.assert_close(d_new[both], d_old[both], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isnan(d_new), torch.isnan(d_old))


def test_affine_is_one_transform_per_sequence(batch: Batch) -> None:
    cfg = replace(OFF, affine_p=1.0, rotation_deg=30.0, scale_range=(0.8, 1.2), shear_deg=15.0, shift=0.2)
    out = augment_batch(batch, cfg, gen())
    check_invariants(out)
    assert torch.equal(out.missing, batch.missing)
    new, old = positions(out).double(), positions(batch).double()
    fitted = 0
    for b in range(len(batch)):
        present = ~batch.missing[b] & batch.mask[b, :, None]  # (T, P)
        src, dst = old[b][present], new[b][present]  # (N, 2)
        if len(src) < 10:
            continue
        design = torch.cat([src, torch.ones(len(src), 1, dtype=src.dtype)], dim=1)  # (N, 3)
        solution = torch.linalg.lstsq(design, dst).solution  # (3, 2): one matrix + shift for all frames
        torch.testing.assert_close(design @ solution, dst, rtol=0, atol=1e-5)
        fitted += 1
    assert fitted >= len(batch) // 2


# ---------------------------------------------------------------- resample


def test_speed_one_keeps_everything(batch: Batch) -> None:
    out = augment_batch(batch, replace(OFF, resample_p=1.0, resample_range=(1.0, 1.0)), gen())
    assert_same(positions(out), positions(batch))
    assert torch.equal(out.missing, batch.missing)
    assert torch.equal(out.mask, batch.mask)
    torch.testing.assert_close(out.x, batch.x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("factor", [0.5, 0.7, 1.3, 1.5])
def test_resample_lengths(batch: Batch, factor: float) -> None:
    out = augment_batch(batch, replace(OFF, resample_p=1.0, resample_range=(factor, factor)), gen())
    check_invariants(out)
    expected = torch.round(batch.lengths * torch.tensor(factor)).long().clamp(1, MAX_LEN)
    assert torch.equal(out.lengths, expected)
    # the first frame, and the last where L' > 1, are kept exactly (L' == 1 samples source frame 0)
    new, old = positions(out), positions(batch)
    assert_same(new[:, 0], old[:, 0])
    idx = torch.nonzero(out.lengths > 1).flatten()
    assert_same(new[idx, out.lengths[idx] - 1], old[idx, batch.lengths[idx] - 1])


def test_resample_never_exceeds_max_len() -> None:
    batch = make_batch([MAX_LEN, 300, 10], seed=5)
    out = augment_batch(batch, replace(OFF, resample_p=1.0, resample_range=(1.5, 1.5)), gen())
    check_invariants(out)
    assert out.lengths.tolist() == [MAX_LEN, MAX_LEN, 15]
    assert out.x.shape[1] == MAX_LEN
    assert_same(positions(out)[0], positions(batch)[0])  # a full-length sequence is left as it is


def test_resample_interpolation_and_nan_rule() -> None:
    """L=3 -> L'=5 samples source times 0, .5, 1, 1.5, 2: a neighbour with weight exactly 0 is ignored."""
    pos = torch.randn(1, 3, len(POINT_LANDMARKS), 2)
    pos[0, 2, 5] = torch.nan  # missing in the last source frame
    pos[0, 0, 7] = torch.nan  # missing in the first source frame
    x = features_from_positions(pos, torch.tensor([3]))
    batch = Batch(x=x, mask=torch.ones(1, 3, dtype=torch.bool), missing=torch.isnan(pos).any(-1), labels=torch.zeros(1))
    out = augment_batch(batch, replace(OFF, resample_p=1.0, resample_range=(5 / 3, 5 / 3)), gen())
    check_invariants(out)
    assert out.lengths.tolist() == [5]
    new = positions(out)[0]
    assert out.missing[0, :, 5].tolist() == [False, False, False, True, True]
    assert out.missing[0, :, 7].tolist() == [True, True, False, False, False]
    src = pos[0]
    for t, (i0, i1) in enumerate([(0, 0), (0, 1), (1, 1), (1, 2), (2, 2)]):
        if i0 == i1:  # on a source frame: an exact copy
            assert_same(new[t], src[i0])
        else:  # halfway: the mean, NaN where either neighbour is NaN
            torch.testing.assert_close(new[t], (src[i0] + src[i1]) / 2, rtol=0, atol=1e-6, equal_nan=True)


# ---------------------------------------------------------------- temporal mask and cutout


def whole_frames_added(out: Batch, batch: Batch) -> torch.Tensor:
    """(B, T) frames that became entirely missing; asserts nothing else changed in `missing`."""
    added = out.missing & ~batch.missing
    frames = out.missing.all(-1) & added.any(-1)
    assert torch.equal(added.any(-1), frames)  # additions are whole frames only
    assert torch.equal(out.missing | batch.missing, out.missing)  # nothing becomes present
    return frames & out.mask


def test_temporal_mask_drops_whole_frames(batch: Batch) -> None:
    out = augment_batch(batch, replace(OFF, temporal_mask_p=1.0, temporal_mask_fraction=0.25), gen())
    check_invariants(out)
    dropped = whole_frames_added(out, batch)
    kept = ~out.missing.all(-1) & out.mask
    expected = torch.minimum(torch.round(batch.lengths * 0.25).long(), batch.lengths - 1)
    assert not batch.missing.all(-1).any()  # the face is always present, so every dropped frame is new
    assert torch.equal(dropped.sum(1), expected)
    assert (kept.sum(1) >= 1).all()
    present = ~out.missing
    assert_same(positions(out)[present], positions(batch)[present])


def test_cutout_drops_a_contiguous_block(batch: Batch) -> None:
    out = augment_batch(batch, replace(OFF, cutout_p=1.0), gen())
    check_invariants(out)
    dropped = whole_frames_added(out, batch)
    for b, length in enumerate(batch.lengths.tolist()):
        frames = torch.nonzero(dropped[b]).flatten().tolist()
        assert len(frames) == min(10, length // 2)
        if frames:
            assert frames == list(range(frames[0], frames[0] + len(frames)))
            assert frames[-1] < length


def test_group_cutout_drops_a_hand(batch: Batch) -> None:
    out = augment_batch(batch, replace(OFF, group_cutout_p=1.0, group_cutout_groups=("lhand",)), gen())
    check_invariants(out)
    assert out.missing[..., LH].all()
    others = torch.ones(len(POINT_LANDMARKS), dtype=torch.bool)
    others[LH] = False
    assert torch.equal(out.missing[..., others], batch.missing[..., others])


# ---------------------------------------------------------------- everything together


@pytest.mark.parametrize("seed", range(3))
def test_motion_equals_formula_on_augmented_positions(batch: Batch, seed: int) -> None:
    for cfg in (AugmentConfig(), ALL_ON):
        out = augment_batch(batch, cfg, gen(seed))
        check_invariants(out)
        pos = positions(out)
        for b, length in enumerate(out.lengths.tolist()):
            assert torch.equal(out.x[b], reference_motion(pos[b], length))


def test_missing_is_carried_through_the_chain(batch: Batch) -> None:
    """Flip + speed 1 + affine: the missing mask is exactly the flipped source mask."""
    cfg = replace(OFF, flip_p=1.0, resample_p=1.0, resample_range=(1.0, 1.0), affine_p=1.0)
    out = augment_batch(batch, cfg, gen())
    check_invariants(out)
    assert torch.equal(out.missing, batch.missing[..., PERM])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_invariants(batch: Batch) -> None:
    cuda = batch.to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    out = augment_batch(cuda, ALL_ON, g).to("cpu")
    check_invariants(out)
    again = augment_batch(cuda, ALL_ON, torch.Generator(device="cuda").manual_seed(0)).to("cpu")
    assert torch.equal(out.x, again.x)
