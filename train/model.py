"""The sign classifier: a mask-aware Conv1D + Transformer encoder after the 1st-place asl-signs model.

Per frame, the (118, 6) features are flattened to 708 values and projected to `dim` by a linear stem.
The encoder alternates groups of depthwise Conv1D blocks (kernel 17, efficient channel attention)
with pre-norm Transformer blocks, then masked mean pooling, a late dropout and a linear classifier.

Every operation is padding-invariant: appending padding frames (whatever their values) to a sequence
leaves its logits unchanged in eval mode, and a row's output never depends on other rows of the batch.
The rules that guarantee it:

* padded frames are zeroed (with `masked_fill`, so even non-finite junk cannot leak) before every
  operation that mixes time, and at the output of every block;
* the depthwise conv uses zero 'same' padding, so a real frame near the end sees zeros beyond the
  real end whether or not padding frames follow;
* normalisation is LayerNorm (per frame), never BatchNorm over time;
* ECA and the final pooling average over real frames only; attention never attends to padding keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.features import MAX_LEN, N_CHANNELS
from pipeline.landmarks import N_POINTS

IN_FEATURES = N_POINTS * N_CHANNELS  # 708 values per frame


@dataclass
class ModelConfig:
    """Hyper-parameters of `SignModel`. The defaults give about 1.8 M parameters for 250 classes."""

    n_classes: int
    dim: int = 192
    depth: int = 2  # number of [conv x convs_per_group, transformer] groups
    convs_per_group: int = 3
    heads: int = 4
    kernel_size: int = 17
    expand: int = 2  # hidden width factor of conv blocks and transformer MLPs
    eca_kernel: int = 5
    top_expand: int = 2  # width factor of the per-frame layer before pooling
    dropout: float = 0.4  # late dropout before the classifier (a schedule may change it: `set_late_dropout`)
    drop_path: float = 0.2  # per-sample stochastic depth on every residual branch
    attn_dropout: float = 0.2  # dropout on attention weights
    max_len: int = MAX_LEN

    def __post_init__(self) -> None:
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {self.n_classes}")
        if self.dim % self.heads != 0:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.kernel_size % 2 != 1 or self.eca_kernel % 2 != 1:
            raise ValueError("kernel_size and eca_kernel must be odd ('same' padding)")
        if self.depth < 1 or self.convs_per_group < 0:
            raise ValueError("depth must be >= 1 and convs_per_group >= 0")


PRESETS: dict[str, dict[str, int | float]] = {
    # The 1st-place architecture: dim 192, 2 x [3 conv, 1 transformer], about 1.8 M parameters.
    "default": {},
    # A CPU demo that trains a few epochs on ~1,600 sequences in minutes: about 0.15 M parameters.
    "small": {"dim": 64, "depth": 1, "convs_per_group": 2, "heads": 2, "dropout": 0.2, "drop_path": 0.1},
    # Unit tests.
    "tiny": {"dim": 32, "depth": 1, "convs_per_group": 1, "heads": 2, "kernel_size": 5, "dropout": 0.1},
}


def model_config(preset: str, n_classes: int, **overrides: int | float) -> ModelConfig:
    """The `ModelConfig` of a named preset, with `overrides` applied on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in fields(ModelConfig)} - {"n_classes"}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model config fields {sorted(unknown)}")
    return ModelConfig(n_classes=n_classes, **{**PRESETS[preset], **overrides})


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _zero_padding(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Zero padded frames. x (B, T, C), pad (B, T, 1) bool True for padding."""
    return x.masked_fill(pad, 0.0)


def _masked_mean(x: torch.Tensor, pad: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean over real frames. x (B, T, C), pad (B, T, 1), count (B, 1) clamped >= 1 -> (B, C)."""
    return x.masked_fill(pad, 0.0).sum(dim=1) / count.to(x.dtype)


class DropPath(nn.Module):
    """Per-sample stochastic depth: drops a whole residual branch for a sample, rescaling the rest."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * noise / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MaskedECA(nn.Module):
    """Efficient channel attention whose channel statistics average over real frames only."""

    def __init__(self, kernel_size: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        s = _masked_mean(x, pad, count)  # (B, C)
        gate = torch.sigmoid(self.conv(s.unsqueeze(1)))  # (B, 1, C)
        return x * gate  # (B, T, C)


class ConvBlock(nn.Module):
    """Expand -> depthwise conv over time -> LayerNorm -> masked ECA -> project, with a residual."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.dim * cfg.expand
        self.expand = nn.Linear(cfg.dim, hidden)
        self.dwconv = nn.Conv1d(hidden, hidden, cfg.kernel_size, padding=cfg.kernel_size // 2, groups=hidden)
        self.norm = nn.LayerNorm(hidden)
        self.eca = MaskedECA(cfg.eca_kernel)
        self.project = nn.Linear(hidden, cfg.dim)
        self.drop_path = DropPath(cfg.drop_path)

    def forward(self, x: torch.Tensor, pad: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.expand(x))  # (B, T, H)
        h = _zero_padding(h, pad)  # the conv must see zeros beyond each real end
        h = self.dwconv(h.transpose(1, 2)).transpose(1, 2)  # (B, T, H)
        h = self.norm(h)
        h = self.eca(h, pad, count)  # (B, T, H)
        h = self.project(h)  # (B, T, C)
        return _zero_padding(x + self.drop_path(h), pad)


class TransformerBlock(nn.Module):
    """Pre-norm multi-head self-attention (keys restricted to real frames) and a SiLU MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.attn_dropout = cfg.attn_dropout
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.dim * cfg.expand), nn.SiLU(), nn.Linear(cfg.dim * cfg.expand, cfg.dim)
        )
        self.drop_path = DropPath(cfg.drop_path)

    def forward(self, x: torch.Tensor, pad: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, C); pad (B, T, 1); attn_mask (B, 1, 1, T) bool, True where a key may be attended."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, heads, T, C / heads)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, heads, T, C / heads)
        a = self.proj(a.transpose(1, 2).reshape(b, t, c))  # (B, T, C)
        x = x + self.drop_path(a)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return _zero_padding(x, pad)


class SignModel(nn.Module):
    """Landmark sequence classifier. `forward(x, mask)`: x (B, T, 118, 6), mask (B, T) -> logits (B, n_classes)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Linear(IN_FEATURES, cfg.dim, bias=False)
        self.stem_norm = nn.LayerNorm(cfg.dim)
        blocks: list[nn.Module] = []
        for _ in range(cfg.depth):
            blocks.extend(ConvBlock(cfg) for _ in range(cfg.convs_per_group))
            blocks.append(TransformerBlock(cfg))
        self.blocks = nn.ModuleList(blocks)
        self.top = nn.Linear(cfg.dim, cfg.dim * cfg.top_expand)
        self.late_dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.dim * cfg.top_expand, cfg.n_classes)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, dim * top_expand) of real frames, before the late dropout."""
        b, t = mask.shape
        if x.shape[:2] != (b, t) or x.shape[2] * x.shape[3] != IN_FEATURES:
            raise ValueError(f"expected x (B, T, {N_POINTS}, {N_CHANNELS}) matching mask {tuple(mask.shape)}")
        if t > self.cfg.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len {self.cfg.max_len}")
        mask = mask.bool()
        pad = ~mask.unsqueeze(-1)  # (B, T, 1) True for padding
        count = mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
        # Keys a query may attend: real frames; a row without any real frame attends everything (no NaN).
        attn_mask = (mask | ~mask.any(dim=1, keepdim=True))[:, None, None, :]  # (B, 1, 1, T)

        h = x.reshape(b, t, IN_FEATURES).masked_fill(pad, 0.0)  # (B, T, 708)
        h = _zero_padding(self.stem_norm(self.stem(h)), pad)  # (B, T, C)
        for block in self.blocks:
            h = block(h, pad, attn_mask) if isinstance(block, TransformerBlock) else block(h, pad, count)
        h = F.silu(self.top(h))  # (B, T, C * top_expand)
        return _masked_mean(h, pad, count)  # (B, C * top_expand)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, 118, 6) float32, mask (B, T) bool True for real frames -> logits (B, n_classes)."""
        return self.classifier(self.late_dropout(self.encode(x, mask)))  # (B, n_classes)

    def set_late_dropout(self, p: float) -> None:
        """Set the rate of the dropout before the classifier (a schedule may change it between epochs)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"late dropout must be in [0, 1), got {p}")
        self.late_dropout.p = p


def late_dropout_rate(epoch: int, rate: float, start: int) -> float:
    """The late dropout of epoch `epoch` (from 0) under a schedule that turns `rate` on at epoch `start`: 0 before."""
    return rate if epoch >= start else 0.0
