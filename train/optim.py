"""Optimizers (AdamW, RAdam, RAdam in Lookahead) and adversarial weight perturbation (AWP).

Both keep every piece of their state in `state_dict()` as tensors and plain data, so a checkpoint
(loaded with `weights_only=True`) resumes them bit-identically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "radam", "radam-lookahead")


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float, fused: bool | None = None
) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS), its weight decay decoupled from the gradient in every case.

    `fused` goes to AdamW only (RAdam has no fused kernel).
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name in ("radam", "radam-lookahead"):
        radam = torch.optim.RAdam(params, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=True)
        return Lookahead(radam) if name == "radam-lookahead" else radam
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019) around an inner optimizer: every `k` steps the slow weights move
    `alpha` of the way to the fast ones, and the fast weights restart from them.

    It shares the inner optimizer's `param_groups`, so a learning-rate scheduler drives both.
    """

    def __init__(self, inner: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead needs k >= 1 and 0 < alpha <= 1, got k={k}, alpha={alpha}")
        self.inner, self.k, self.alpha = inner, k, alpha
        super().__init__([p for g in inner.param_groups for p in g["params"]], inner.defaults)
        self.param_groups = inner.param_groups  # the same dicts: the scheduler's lr reaches the inner optimizer
        self.steps = 0
        # The slow weights start at the initial weights (not at step k, which would skip the first sync).
        self.slow = [p.detach().clone() for p in self._params()]

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.inner.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = self.inner.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            for fast, slow in zip(self._params(), self.slow, strict=True):
                slow.add_(fast - slow, alpha=self.alpha)
                fast.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "inner": self.inner.state_dict(),
            "slow": [s.clone() for s in self.slow],
            "steps": self.steps,
            "k": self.k,
            "alpha": self.alpha,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state, dict) or set(state) != {"inner", "slow", "steps", "k", "alpha"}:
            raise ValueError("not a Lookahead optimizer state (the checkpoint was written with another --optimizer)")
        if (state["k"], state["alpha"]) != (self.k, self.alpha) or len(state["slow"]) != len(self.slow):
            raise ValueError(
                f"Lookahead state for k={state['k']}, alpha={state['alpha']} and {len(state['slow'])} "
                f"tensors; this one has k={self.k}, alpha={self.alpha} and {len(self.slow)}"
            )
        shapes = [tuple(getattr(s, "shape", ())) for s in state["slow"]]
        if shapes != [tuple(s.shape) for s in self.slow] or type(state["steps"]) is not int or state["steps"] < 0:
            raise ValueError("Lookahead slow weights of other shapes than this model's, or a step count below 0")
        self.inner.load_state_dict(state["inner"])
        self.param_groups = self.inner.param_groups  # load_state_dict replaced the inner group dicts
        with torch.no_grad():
            for slow, saved in zip(self.slow, state["slow"], strict=True):
                slow.copy_(saved)  # same shapes: never a broadcast
        self.steps = state["steps"]


class AWP:
    """Adversarial weight perturbation as in the 1st-place asl-signs solution.

    After the normal backward, every trainable tensor W with gradient g moves to W + lam * g / ||g||
    (a step of length `lam` per tensor, up the loss; a tensor whose gradient is zero stays), the batch's
    loss is computed and back-propagated again there, and W is restored exactly (a copy, not a
    subtraction). The optimizer then steps with the gradients taken at the perturbed weights only.
    It costs a second forward and backward per batch once active (from epoch `start_epoch`, counted
    from 0). Under DDP the first gradients are already averaged, so every rank perturbs alike.
    """

    def __init__(self, model: nn.Module, lam: float, start_epoch: int = 0) -> None:
        if lam < 0 or start_epoch < 0:
            raise ValueError(f"AWP needs lambda >= 0 and a start epoch >= 0, got {lam} and {start_epoch}")
        self.model, self.lam, self.start_epoch = model, lam, start_epoch

    def active(self, epoch: int) -> bool:
        """Whether epoch `epoch` (from 0) takes the adversarial step."""
        return self.lam > 0 and epoch >= self.start_epoch

    def attack_backward(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Replace the gradients in `.grad` by those of `loss_fn()` at the perturbed weights; the loss there.

        Call it after `loss.backward()` and before clipping and `optimizer.step()`; `loss_fn` runs the
        same batch through the model (the loop's forward, autocast included) and returns the loss.
        """
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                g = p.grad.float()
                norm = g.norm()  # a tensor whose gradient is zero stays, decided on the device (no sync)
                scale = torch.where(norm > 0, self.lam / norm.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
                p.add_((g * scale).to(p.dtype))
                p.grad = None
        try:
            loss = loss_fn()
            loss.backward()
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)
        return loss.detach()
