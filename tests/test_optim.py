"""Tests for train/optim.py: the optimizers, Lookahead's arithmetic and bit-identical resume, AWP."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.features import N_CHANNELS
from pipeline.landmarks import N_POINTS
from train.model import SignModel, model_config
from train.optim import AWP, OPTIMIZERS, Lookahead, make_optimizer


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(net(x), y)


def test_make_optimizer_builds_each_kind_with_decoupled_decay() -> None:
    params = list(_net().parameters())
    adamw = make_optimizer("adamw", params, 1e-3, 0.05)
    radam = make_optimizer("radam", params, 1e-3, 0.05)
    look = make_optimizer("radam-lookahead", params, 1e-3, 0.05)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.05
    assert type(radam) is torch.optim.RAdam and radam.defaults["decoupled_weight_decay"] is True
    assert isinstance(look, Lookahead) and type(look.inner) is torch.optim.RAdam
    assert look.inner.defaults["decoupled_weight_decay"] is True and (look.k, look.alpha) == (5, 0.5)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; choose one of adamw, radam, radam-lookahead"):
        make_optimizer("sgd", params, 1e-3, 0.0)


def test_lookahead_syncs_every_k_steps_as_the_formula_says() -> None:
    """After k inner steps: slow = w0 + alpha * (fast_k - w0), and the fast weights restart from it."""
    x, y = _data()
    net, plain = _net(), _net()
    w0 = [p.detach().clone() for p in net.parameters()]
    look = Lookahead(torch.optim.SGD(net.parameters(), lr=0.1), k=3, alpha=0.5)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1)
    for step in range(1, 4):
        for opt, model in ((look, net), (sgd, plain)):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        if step < 3:  # between syncs the fast weights are the inner optimizer's alone
            assert all(torch.equal(a, b) for a, b in zip(net.parameters(), plain.parameters(), strict=True))
    for p, q, w in zip(net.parameters(), plain.parameters(), w0, strict=True):
        torch.testing.assert_close(p, w + 0.5 * (q - w), rtol=0, atol=1e-7)
    assert look.steps == 3


def test_lookahead_shares_the_learning_rate_a_scheduler_sets() -> None:
    net = _net()
    look = make_optimizer("radam-lookahead", net.parameters(), 1e-2, 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(look, lambda s: 1.0 / (1 + s))
    x, y = _data()
    for _ in range(3):
        look.zero_grad()
        _loss(net, x, y).backward()
        look.step()
        sched.step()
    assert look.inner.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)


def _train(name: str, net: nn.Module, steps: int, state: dict | None = None) -> dict:
    """`steps` steps of `name` under a LambdaLR schedule (starting from `state` when given); the state after."""
    opt = make_optimizer(name, net.parameters(), 3e-2, 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s / 10))
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    for i in range(steps):
        x, y = _data(seed=100 + sched.last_epoch)  # the batch of the global step
        opt.zero_grad(set_to_none=True)
        _loss(net, x, y).backward()
        opt.step()
        sched.step()
        del i
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # as a checkpoint is read back


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_from_a_saved_state_is_bit_identical(name: str) -> None:
    """7 steps, save, reload into fresh objects, 6 more == 13 uninterrupted (7 is not a multiple of k=5)."""
    whole = _train(name, _net(), 13)
    half = _train(name, _net(), 7)
    resumed = _train(name, _net(seed=99), 6, half)  # other initial weights: everything must come from the state
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert not torch.equal(half["model"]["0.weight"], whole["model"]["0.weight"])


def test_lookahead_refuses_another_optimizers_state() -> None:
    net = _net()
    radam_state = make_optimizer("radam", net.parameters(), 1e-3, 0.0).state_dict()
    look = make_optimizer("radam-lookahead", net.parameters(), 1e-3, 0.0)
    with pytest.raises(ValueError, match="not a Lookahead optimizer state"):
        look.load_state_dict(radam_state)


# ---------------------------------------------------------------------------- AWP


def _grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


def test_awp_restores_the_weights_exactly_and_uses_the_perturbed_gradients() -> None:
    x, y = _data()
    net = _net()
    before = copy.deepcopy(net.state_dict())
    _loss(net, x, y).backward()
    clean = _grads(net)
    adv = AWP(net, 0.2).attack_backward(lambda: _loss(net, x, y))
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key  # copied back, not subtracted
    # independently: move each tensor by 0.2 * g / ||g|| and take the gradients there
    ref = _net()
    with torch.no_grad():
        for p, g in zip(ref.parameters(), clean, strict=True):
            p.add_(0.2 * g / g.norm())
    ref_loss = _loss(ref, x, y)
    ref_loss.backward()
    assert adv.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert adv.item() > _loss(net, x, y).item()  # a step up the loss
    for got, want in zip(_grads(net), _grads(ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_awp_with_lambda_zero_gives_the_plain_gradients() -> None:
    x, y = _data()
    plain, net = _net(), _net()
    _loss(plain, x, y).backward()
    _loss(net, x, y).backward()
    AWP(net, 0.0).attack_backward(lambda: _loss(net, x, y))
    assert all(torch.equal(a, b) for a, b in zip(_grads(net), _grads(plain), strict=True))


def test_awp_leaves_a_tensor_with_zero_gradient_unmoved() -> None:
    x, y = _data()
    net = _net()
    _loss(net, x, y).backward()
    net[2].bias.grad.zero_()
    AWP(net, 0.2).attack_backward(lambda: _loss(net, x, y))
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_awp_is_active_from_its_start_epoch_and_never_at_lambda_zero() -> None:
    awp = AWP(_net(), 0.2, start_epoch=15)
    assert [awp.active(e) for e in (0, 14, 15, 16)] == [False, False, True, True]
    assert not AWP(_net(), 0.0, start_epoch=0).active(3)
    with pytest.raises(ValueError, match="lambda >= 0"):
        AWP(_net(), -0.1)


def test_awp_on_the_sign_model_restores_it_and_raises_the_loss() -> None:
    torch.manual_seed(0)
    model = SignModel(model_config("tiny", 7, dropout=0.0, drop_path=0.0, attn_dropout=0.0)).train()
    x = torch.randn(4, 9, N_POINTS, N_CHANNELS)
    mask = torch.arange(9)[None] < torch.tensor([9, 5, 3, 1])[:, None]
    y = torch.tensor([0, 3, 6, 2])
    before = copy.deepcopy(model.state_dict())
    clean = F.cross_entropy(model(x, mask), y)
    clean.backward()
    adv = AWP(model, 0.2).attack_backward(lambda: F.cross_entropy(model(x, mask), y))
    assert adv.item() > clean.item()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["slow"].__setitem__(0, torch.zeros(1)), "slow weights of other shapes"),
        (lambda s: s.__setitem__("steps", -1), "a step count below 0"),
        (lambda s: s.__setitem__("steps", 2.5), "a step count below 0"),
    ],
)
def test_lookahead_refuses_a_state_that_would_broadcast_or_count_back(change, message: str) -> None:
    """A slow tensor of shape (1,) would be broadcast into every weight by copy_: refused, nothing changed."""
    net = nn.Linear(3, 2)
    look = Lookahead(torch.optim.SGD(net.parameters(), lr=0.1), k=3, alpha=0.5)
    state = look.state_dict()
    before = [s.clone() for s in look.slow]
    change(state)
    with pytest.raises(ValueError, match=message):
        look.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(before, look.slow, strict=True))
