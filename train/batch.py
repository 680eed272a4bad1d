"""The batch that flows from the loader through augmentation into the model."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Batch:
    """A collated batch; real frames are a prefix of each row, padding follows the pipeline's rule."""

    x: torch.Tensor  # (B, T, 118, 6) features [x, y, dx, dy, dx2, dy2], no NaN; the shards' dtype until `to()`
    mask: torch.Tensor  # (B, T) bool, True for real frames
    missing: torch.Tensor  # (B, T, 118) bool, True where the source point was NaN
    labels: torch.Tensor  # (B,) int64
    keys: tuple[str, ...] = ()  # the samples' sequence ids (keys in the shards), when collated from shards
    participants: tuple[str, ...] = ()  # their participant ids, likewise
    ids: torch.Tensor | None = None  # (B,) int64 sample ids (`train.data.shard_offsets`); stays on the CPU

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of real frames per sequence."""
        return self.mask.sum(dim=1)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on `device` with x as float32 (it travels in the shards' dtype, often float16)."""
        moved = {k: getattr(self, k).to(device, non_blocking=non_blocking) for k in _FIELDS}
        return replace(self, **moved | {"x": moved["x"].float()})

    def pin_memory(self) -> Batch:
        return replace(self, **{k: getattr(self, k).pin_memory() for k in _FIELDS})


_FIELDS = ("x", "mask", "missing", "labels")
