"""Tests for train/model.py: shapes, size of the presets, padding invariance, batch independence, gradients."""

from __future__ import annotations

import pytest
import torch

from pipeline.features import MAX_LEN, N_CHANNELS
from pipeline.landmarks import N_POINTS
from train.model import PRESETS, ModelConfig, SignModel, count_parameters, late_dropout_rate, model_config

N_CLASSES = 250


def _tiny(**overrides: int | float) -> SignModel:
    torch.manual_seed(0)
    return SignModel(model_config("tiny", N_CLASSES, **overrides)).eval()


def _batch(lengths: list[int], t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features with junk in the padding, and the prefix mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), t, N_POINTS, N_CHANNELS, generator=g)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return x, mask


def _pad(x: torch.Tensor, extra: int, seed: int = 1) -> torch.Tensor:
    """Append `extra` frames of large random junk along time."""
    g = torch.Generator().manual_seed(seed)
    junk = 100 * torch.randn(x.shape[0], extra, *x.shape[2:], generator=g)
    return torch.cat([x, junk], dim=1)


def test_output_shape() -> None:
    model = _tiny()
    x, mask = _batch([10, 7, 3], 12)
    with torch.no_grad():
        out = model(x, mask)
    assert out.shape == (3, N_CLASSES)
    assert out.dtype == torch.float32


def test_default_preset_size() -> None:
    n = count_parameters(SignModel(model_config("default", N_CLASSES)))
    assert 1_750_000 <= n <= 1_950_000  # the README's "about 1.84 M" (1st place: about 1.8 M)
    assert count_parameters(SignModel(model_config("small", N_CLASSES))) < 200_000
    assert set(PRESETS) >= {"default", "small", "tiny"}


def test_model_config_overrides_and_errors() -> None:
    cfg = model_config("default", 10, dim=96, heads=3)
    assert isinstance(cfg, ModelConfig) and (cfg.n_classes, cfg.dim, cfg.heads, cfg.max_len) == (10, 96, 3, MAX_LEN)
    with pytest.raises(ValueError):
        model_config("huge", 10)
    with pytest.raises(ValueError):
        model_config("tiny", 10, nonsense=1)
    with pytest.raises(ValueError):
        model_config("tiny", 10, dim=30, heads=4)


@pytest.mark.parametrize("preset_overrides", [{}, {"kernel_size": 17, "depth": 2}])
def test_padding_invariance_single(preset_overrides: dict[str, int]) -> None:
    model = _tiny(**preset_overrides)
    length = 21
    x, mask = _batch([length], length)
    xp = _pad(x, 37)
    mp = torch.zeros(1, length + 37, dtype=torch.bool)
    mp[:, :length] = True
    with torch.no_grad():
        a = model(x, mask)
        b = model(xp, mp)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padding_invariance_in_batch() -> None:
    model = _tiny(kernel_size=17)
    lengths = [30, 5, 17, 1, 30]
    x, mask = _batch(lengths, 30, seed=3)
    x = torch.where(mask[:, :, None, None], x, 50 * torch.randn_like(x))  # junk in the batch's own padding
    with torch.no_grad():
        batched = model(x, mask)
        padded = model(_pad(x, 37), torch.cat([mask, torch.zeros(len(lengths), 37, dtype=torch.bool)], dim=1))
        for i, n in enumerate(lengths):
            alone = model(x[i : i + 1, :n], mask[i : i + 1, :n])
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, padded, atol=1e-5, rtol=1e-5)


def test_batch_independence() -> None:
    model = _tiny()
    x, mask = _batch([12, 8, 4], 12, seed=5)
    with torch.no_grad():
        ref = model(x, mask)
        x2 = x.clone()
        x2[1:] = torch.randn_like(x2[1:]) * 10  # change the other rows completely
        mask2 = mask.clone()
        mask2[1:] = True
        out = model(x2, mask2)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)


def test_all_padding_row_is_finite() -> None:
    model = _tiny()
    x, mask = _batch([9, 0, 4], 9)
    with torch.no_grad():
        out = model(x, mask)
    assert torch.isfinite(out).all()
    model.train()
    out = model(x, mask)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradients_flow() -> None:
    torch.manual_seed(0)
    model = SignModel(model_config("tiny", N_CLASSES, drop_path=0.0, dropout=0.0, attn_dropout=0.0)).train()
    x, mask = _batch([16, 11, 6, 2], 16, seed=7)
    loss = torch.nn.functional.cross_entropy(model(x, mask), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_train_mode_regularisation_is_stochastic() -> None:
    model = _tiny()
    model.train()
    x, mask = _batch([8, 8], 8)
    assert not torch.allclose(model(x, mask), model(x, mask))


def test_bf16_autocast_forward() -> None:
    model = _tiny(kernel_size=17)
    x, mask = _batch([14, 9], 14)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask)
    assert out.shape == (2, N_CLASSES)
    assert torch.isfinite(out.float()).all()
    with torch.no_grad():
        reference = model(x, mask)
    # bf16 keeps about 3 significant digits: close to fp32, not equal to it
    torch.testing.assert_close(out.float(), reference, atol=0.05 * float(reference.abs().max()), rtol=0.05)
    assert not torch.equal(out.float(), reference)


def test_rejects_too_long_sequences() -> None:
    model = _tiny(max_len=8)
    x, mask = _batch([9], 9)
    with pytest.raises(ValueError):
        model(x, mask)


def test_late_dropout_is_settable_and_off_at_zero() -> None:
    """Rate 0: training output equals eval output (the other dropouts off); rate p: about p of the pooled
    features are zeroed before the classifier, the rest scaled by 1 / (1 - p)."""
    model = _tiny(dropout=0.5, drop_path=0.0, attn_dropout=0.0)
    x, mask = _batch([12] * 64, 12)
    with torch.no_grad():
        reference = model.eval()(x, mask)
        model.train()
        model.set_late_dropout(0.0)
        assert torch.equal(model(x, mask), reference)
        seen = []
        hook = model.classifier.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        model.set_late_dropout(0.8)
        model(x, mask)
        hook.remove()
        pooled = model.encode(x, mask)
    zeroed = (seen[0] == 0).float().mean().item()
    assert 0.75 < zeroed < 0.85
    kept = seen[0] != 0
    torch.testing.assert_close(seen[0][kept], pooled[kept] / 0.2)
    with pytest.raises(ValueError, match=r"late dropout must be in \[0, 1\)"):
        model.set_late_dropout(1.0)


def test_late_dropout_schedule_turns_on_at_its_epoch() -> None:
    assert [late_dropout_rate(e, 0.8, 15) for e in (0, 14, 15, 40)] == [0.0, 0.0, 0.8, 0.8]
    assert late_dropout_rate(0, 0.3, 0) == 0.3
