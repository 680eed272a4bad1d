"""Test oracles for shard contents: every sample of a shard decoded to the padded form, and a file's digest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.features import FEATURE_SHAPE, MAX_LEN, pad_features, pad_frames, unpack_missing
from pipeline.shards import decode_compact, iter_members


@dataclass
class Sample:
    """One decoded sample in the padded form, whichever layout it was stored in."""

    features: np.ndarray  # (384, 118, 6) float32
    mask: np.ndarray  # (384,) bool
    missing: np.ndarray  # (384, 118) bool
    label: int
    meta: dict[str, Any]


def decode_sample(members: dict[str, bytes], source: str = "") -> Sample:
    """The padded float32 sample from a sample's members, for either layout (`decode_compact`, then padding)."""
    x, packed, label = decode_compact(members, source)
    features, mask = pad_features(x, out=np.empty(FEATURE_SHAPE, dtype=np.float32))
    missing = unpack_missing(pad_frames(packed, MAX_LEN))
    return Sample(features, mask, missing, label, json.loads(members["json"]))


def iter_samples(path: str | Path) -> Iterator[Sample]:
    """Every sample of a shard, decoded to the padded float32 form."""
    for key, members in iter_members(path):
        yield decode_sample(members, f"{path}:{key}")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
