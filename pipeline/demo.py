"""A synthetic `asl-signs` dataset in exactly the Kaggle layout, for demos and tests.

`write_demo_dataset(out)` writes `train.csv`, `sign_to_prediction_index_map.json` and one parquet file per
sequence under `train_landmark_files/<participant_id>/<sequence_id>.parquet`, with the real schema, dtypes,
row order and metadata (docs/cli.md, expected dataset layout; tests/test_demo.py compares with real files):

- frame int16 (first frame usually not 0, a few sequences with gaps), row_id "{frame}-{type}-{landmark_index}",
  type, landmark_index int16, x/y/z float64 holding float32 values; 543 rows a frame in the 543-point layout.
- Lengths lognormal (median ~22, mean ~38, p95 ~120, a few past 384), clipped to [2, 537].
- Undetected hands are NaN rows (about 69% of hand rows), a whole face NaN in ~1% of frames, pose never NaN.

The motion is a model of signing that a classifier can learn but not from one trivial feature. Each sign has a
start location, a smooth wrist path (a sum of sinusoids), a handshape that may change (finger curls, spread,
roll and palm yaw) and, for some signs, a second hand that mirrors the first or holds a base pose. Each
participant has a body position and scale, handedness (left-handers are mirrored: the left hand is dominant),
a noise level, a sequence-length speed factor and a personal offset per sign. Each sequence adds time warping,
amplitude and location variation, jitter, hand entry/exit frames (hand not detected) and dropouts; the head sways
a little. Sequence lengths do not depend on the sign.

Everything is derived from `seed` through `np.random.default_rng([seed, stream, ...])`: one stream for the plan
(ids, signs, lengths), one per sign, one per participant and one per sequence, so the files are byte-identical
for the same arguments whatever `jobs` is.

Public helpers: `plan_dataset` (ids, signs and frame counts without writing), `generate_sequence` (one
sequence's frame numbers and (T, 543, 3) float32 landmarks), `sequence_table` (the Kaggle-layout table),
`sample_lengths` and `sign_names`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import atomic_file
from pipeline.landmarks import (
    LEYE,
    LIP,
    MIRROR_PAIRS,
    N_RAW,
    NOSE,
    REYE,
    ROW_INDEX,
    ROW_TYPES,
    TYPE_OFFSETS,
    TYPE_SIZES,
    TYPES,
)

log = logging.getLogger(__name__)

MIN_FRAMES = 2
MAX_FRAMES = 537
LENGTH_MEDIAN = 22.0
LENGTH_SIGMA = 1.045  # total log-sd: mean ~38, p95 ~123, ~0.3% past 384 (before clipping)
SPEED_SIGMA = 0.3  # part of LENGTH_SIGMA that is per participant (slow and fast signers)

# The real files' schema, including the pandas metadata they carry (written by pandas through pyarrow).
_PANDAS_METADATA = (
    '{"index_columns": [], "column_indexes": [], "columns": ['
    + ", ".join(
        f'{{"name": "{name}", "field_name": "{name}", "pandas_type": "{pt}", "numpy_type": "{nt}", "metadata": null}}'
        for name, pt, nt in (
            ("frame", "int16", "int16"),
            ("row_id", "unicode", "object"),
            ("type", "unicode", "object"),
            ("landmark_index", "int16", "int16"),
            ("x", "float64", "float64"),
            ("y", "float64", "float64"),
            ("z", "float64", "float64"),
        )
    )
    + '], "creator": {"library": "pyarrow", "version": "8.0.0"}, "pandas_version": "1.5.0"}'
)
SCHEMA = pa.schema(
    [
        ("frame", pa.int16()),
        ("row_id", pa.string()),
        ("type", pa.string()),
        ("landmark_index", pa.int16()),
        ("x", pa.float64()),
        ("y", pa.float64()),
        ("z", pa.float64()),
    ],
    metadata={"pandas": _PANDAS_METADATA},
)

# Per-row constants of one frame: the type and "-{type}-{index}" strings, as UTF-8 bytes below.
_TYPE_STR = [TYPES[code] for code in ROW_TYPES.tolist()]
_SUFFIX_STR = [f"-{t}-{i}" for t, i in zip(_TYPE_STR, ROW_INDEX.tolist(), strict=True)]
_TYPE_BYTES = "".join(_TYPE_STR).encode()
_TYPE_LENGTHS = np.array([len(s) for s in _TYPE_STR], dtype=np.int64)
_SUFFIX_LENGTHS = np.array([len(s) for s in _SUFFIX_STR], dtype=np.int64)

# Dictionary-encode the repetitive columns only (row_id and the coordinates are nearly all distinct).
_DICTIONARY_COLUMNS = ["frame", "type", "landmark_index"]

_FACE = slice(TYPE_OFFSETS["face"], TYPE_OFFSETS["face"] + TYPE_SIZES["face"])
_POSE = TYPE_OFFSETS["pose"]
_HAND_OFFSET = {"left": TYPE_OFFSETS["left_hand"], "right": TYPE_OFFSETS["right_hand"]}

# Streams of the seed sequence.
_PLAN, _SIGN, _PARTICIPANT, _SEQUENCE, _STYLE = range(5)

UNIT = 0.14  # image units per body unit (half a face width) at participant scale 1


# ---------------------------------------------------------------- static templates (body units, y down)


def _face_template() -> np.ndarray:
    """(468, 3) face points around the nose; mirror pairs of the 118 selection placed symmetrically."""
    rng = np.random.default_rng(20230224)
    r = np.sqrt(rng.uniform(0, 1, 468))
    a = rng.uniform(0, 2 * np.pi, 468)
    pts = np.stack([0.95 * r * np.cos(a), 0.15 + 1.15 * r * np.sin(a), np.zeros(468)], axis=1)

    def ellipse(cx: float, cy: float, ax: float, ay: float, angles: np.ndarray) -> np.ndarray:
        return np.stack([cx + ax * np.cos(angles), cy - ay * np.sin(angles)], axis=1)

    # Lips: 0/17 outer top/bottom centre, 13/14 inner; the 18 "left" lip points on the -x side, mirrored.
    mouth_y = 0.58
    pts[[0, 17, 13, 14], :2] = [[0, mouth_y - 0.15], [0, mouth_y + 0.15], [0, mouth_y - 0.05], [0, mouth_y + 0.05]]
    lip_pairs = {a: b for a, b in MIRROR_PAIRS if a in LIP}
    outer = np.radians(np.linspace(108, 252, 9))
    side = np.concatenate([ellipse(0, mouth_y, 0.4, 0.15, outer), ellipse(0, mouth_y, 0.3, 0.05, outer)])
    order = (37, 39, 40, 185, 61, 146, 91, 181, 84, 82, 81, 80, 191, 78, 95, 88, 178, 87)
    for raw, xy in zip(order, side, strict=True):
        pts[raw, :2] = xy
        pts[lip_pairs[raw], :2] = [-xy[0], xy[1]]
    # Eyes: REYE on the -x side, LEYE mirrored; nose tip, below the tip and the nostrils.
    eye = ellipse(-0.42, -0.3, 0.2, 0.08, np.linspace(0, 2 * np.pi, len(REYE), endpoint=False))
    pts[list(REYE), :2] = eye
    pts[list(LEYE), :2] = eye * [-1, 1]
    pts[list(NOSE), :2] = [[0, 0.1], [0, 0.22], [-0.15, 0.2], [0.15, 0.2]]
    rr = (pts[:, 0] / 0.95) ** 2 + ((pts[:, 1] - 0.15) / 1.15) ** 2
    pts[:, 2] = -0.55 + 0.9 * np.clip(rr, 0, 1.2)
    return pts


# Pose (33): image-oriented (subject's left on +x), z in absolute pose units; arms are filled per frame.
_POSE_XY = np.array(
    [
        [0, 0.1],
        [0.25, -0.3],
        [0.4, -0.3],
        [0.55, -0.3],
        [-0.25, -0.3],
        [-0.4, -0.3],
        [-0.55, -0.3],
        [0.95, -0.1],
        [-0.95, -0.1],
        [0.3, 0.55],
        [-0.3, 0.55],
        [1.7, 2.3],
        [-1.7, 2.3],
        [2.2, 4.0],
        [-2.2, 4.0],
        [1.4, 5.5],
        [-1.4, 5.5],
        [1.5, 5.9],
        [-1.5, 5.9],
        [1.45, 6.0],
        [-1.45, 6.0],
        [1.3, 5.8],
        [-1.3, 5.8],
        [1.1, 5.8],
        [-1.1, 5.8],
        [1.1, 8.6],
        [-1.1, 8.6],
        [1.1, 11.5],
        [-1.1, 11.5],
        [1.15, 11.9],
        [-1.15, 11.9],
        [1.0, 12.2],
        [-1.0, 12.2],
    ]
)
_POSE_Z = np.array(
    [
        -1.0,
        -0.95,
        -0.95,
        -0.95,
        -0.95,
        -0.95,
        -0.95,
        -0.5,
        -0.5,
        -0.9,
        -0.9,
        -0.45,
        -0.45,
        -0.5,
        -0.5,
        -0.3,
        -0.3,
        -0.35,
        -0.35,
        -0.35,
        -0.35,
        -0.3,
        -0.3,
        0.0,
        0.0,
        0.6,
        0.6,
        1.2,
        1.2,
        1.25,
        1.25,
        1.0,
        1.0,
    ]
)
_HEAD = slice(0, 11)
# Pose arm points (shoulder, elbow, wrist, pinky, index, thumb) of the subject's left and right side.
_ARM = {"left": (11, 13, 15, 17, 19, 21), "right": (12, 14, 16, 18, 20, 22)}

# Hand (21 points, wrist at 0) of a dominant hand, fingers up (-y), thumb toward the body midline (-u).
# Each finger: base point, in-plane direction, three segment lengths; thumb first, then index..pinky.
_FINGER_BASE = np.array([[-0.12, -0.1], [-0.22, -0.55], [-0.07, -0.58], [0.08, -0.56], [0.22, -0.5]])
_FINGER_DIR = np.radians([-40.0, -6.0, 0.0, 6.0, 14.0])  # in-plane angle from "up", + toward +u
_FINGER_LEN = np.array(
    [[0.2, 0.17, 0.15], [0.33, 0.2, 0.17], [0.37, 0.23, 0.18], [0.34, 0.21, 0.17], [0.27, 0.16, 0.15]]
)
_REST = np.array([1.4, 5.5])  # dominant wrist at rest (below the image)


def _hand_shape(curl: np.ndarray, spread: np.ndarray, roll: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """(T, 21, 3) hand points relative to the wrist from per-frame curls (T, 5) and angles (T,)."""
    t = curl.shape[0]
    angle = _FINGER_DIR + spread + np.where(np.arange(5) == 0, 1.1 * curl, 0.0)  # the thumb folds across the palm
    d = np.stack([np.sin(angle), -np.cos(angle)], axis=-1)  # (T, 5, 2) in-plane direction
    flex = np.cumsum(np.repeat((1.45 * curl)[:, :, None], 3, axis=2), axis=2)  # (T, 5, 3) cumulative flexion
    seg = np.concatenate([np.cos(flex)[..., None] * d[:, :, None, :], -np.sin(flex)[..., None]], axis=-1)
    joints = np.cumsum(seg * _FINGER_LEN[None, :, :, None], axis=2)  # (T, 5, 3, 3)
    base = np.concatenate([np.broadcast_to(_FINGER_BASE, (t, 5, 2)), np.zeros((t, 5, 1))], axis=-1)
    fingers = np.concatenate([base[:, :, None], base[:, :, None] + joints], axis=2).reshape(t, 20, 3)
    pts = np.concatenate([np.zeros((t, 1, 3)), fingers], axis=1)
    cy, sy = np.cos(yaw)[:, None], np.sin(yaw)[:, None]  # palm turning about the vertical axis
    u, z = pts[..., 0] * cy + pts[..., 2] * sy, -pts[..., 0] * sy + pts[..., 2] * cy
    cr, sr = np.cos(roll)[:, None], np.sin(roll)[:, None]  # rotation in the image plane
    v = pts[..., 1]
    return np.stack([u * cr - v * sr, u * sr + v * cr, z], axis=-1)


_FACE_TEMPLATE = _face_template()
_FACE_TEMPLATE.setflags(write=False)


# ---------------------------------------------------------------- signs and participants


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


@lru_cache(maxsize=4096)
def _sign(seed: int, k: int) -> dict:
    """Prototype of sign k (independent of how many signs there are)."""
    rng = _rng(seed, _SIGN, k)
    curl0 = rng.beta(0.5, 0.5, 5)
    curl1 = curl0 if rng.random() < 0.5 else rng.beta(0.5, 0.5, 5)
    roll0 = rng.uniform(-0.8, 0.8)
    second = rng.choice(["none", "mirror", "base"], p=[0.65, 0.21, 0.14])
    return {
        "loc": np.array([rng.uniform(-0.5, 2.0), rng.uniform(-0.5, 4.0)]),
        "amp": rng.normal(0, 0.5, (3, 2)),
        "freq": rng.uniform(0.25, 1.5, 3),
        "phase": rng.uniform(0, 2 * np.pi, 3),
        "curl": (curl0, curl1),
        "spread": rng.normal(0, 0.15, 5),
        "roll": (roll0, roll0 + rng.normal(0, 0.5)),
        "yaw": rng.uniform(-1.0, 1.0),
        "second": str(second),
        "mirror_offset": rng.normal(0, 0.2, 2),
        "base_loc": np.array([rng.uniform(-1.2, 0.3), rng.uniform(2.0, 3.5)]),
        "base_curl": rng.beta(0.5, 0.5, 5),
        "base_roll": rng.uniform(-1.2, 1.2),
    }


@lru_cache(maxsize=4096)
def _participant(seed: int, p: int) -> dict:
    """Body, handedness and style of participant p."""
    rng = _rng(seed, _PARTICIPANT, p)
    return {
        "centre": np.array([rng.uniform(0.42, 0.58), rng.uniform(0.3, 0.45)]),
        "scale": UNIT * rng.uniform(0.8, 1.2),
        "mirror": 1.0 if rng.random() < 0.25 else -1.0,  # +1: left-handed (dominant hand on the image's right)
        "noise": rng.uniform(0.01, 0.035),
        "log_speed": rng.normal(0, SPEED_SIGMA),
        "offset": rng.normal(0, 0.2, 2),
        "hand_size": rng.uniform(0.9, 1.1),
        "face": rng.normal(0, 0.02, (468, 2)),
    }


def sign_names(signs: int) -> list[str]:
    """Readable synthetic sign names, sorted by code point: sign_000, sign_001, ..."""
    width = max(3, len(str(signs - 1)))
    return [f"sign_{k:0{width}d}" for k in range(signs)]


def sample_lengths(rng: np.random.Generator, n: int, log_speed: np.ndarray | float | None = None) -> np.ndarray:
    """n sequence lengths (int64) in [2, 537], lognormal with median ~22, mean ~38, p95 ~120.

    `log_speed` holds each sequence's participant offset (log scale); None folds the participant spread into the
    noise, giving the whole-dataset distribution.
    """
    if log_speed is None:
        log_len = LENGTH_SIGMA * rng.standard_normal(n)
    else:
        sigma = np.sqrt(LENGTH_SIGMA**2 - SPEED_SIGMA**2)
        log_len = np.asarray(log_speed, dtype=np.float64) + sigma * rng.standard_normal(n)
    return np.clip(np.rint(LENGTH_MEDIAN * np.exp(log_len)), MIN_FRAMES, MAX_FRAMES).astype(np.int64)


def plan_dataset(sequences: int = 2000, signs: int = 25, participants: int = 10, seed: int = 0) -> dict:
    """What `write_demo_dataset` writes, without writing: numpy arrays, one entry per sequence.

    Keys: participant (index), participant_id, sequence_id, sign (label index), frames (length), path
    (relative to the dataset root), plus sign_names.
    """
    if sequences < 1 or signs < 1 or participants < 1:
        raise ValueError("sequences, signs and participants must be positive")
    seed = _seed(seed)
    rng = _rng(seed, _PLAN)
    participant_ids = np.sort(rng.choice(np.arange(10000, 65536), size=participants, replace=False))
    weights = rng.uniform(0.7, 1.0, participants)
    participant = rng.choice(participants, size=sequences, p=weights / weights.sum())
    sign = rng.permutation(np.resize(np.arange(signs), sequences))
    speeds = np.array([_participant(seed, p)["log_speed"] for p in range(participants)])
    speeds -= speeds.mean()
    frames = sample_lengths(rng, sequences, speeds[participant])
    sequence_id = _unique_ids(rng, sequences)
    pid = participant_ids[participant]
    paths = np.array(
        [f"train_landmark_files/{a}/{b}.parquet" for a, b in zip(pid.tolist(), sequence_id.tolist(), strict=True)]
    )
    return {
        "participant": participant,
        "participant_id": pid,
        "sequence_id": sequence_id,
        "sign": sign,
        "frames": frames,
        "path": paths,
        "sign_names": sign_names(signs),
    }


def _seed(seed: int) -> int:
    """Any Python int as a non-negative seed (negative seeds in two's complement)."""
    return int(seed) % 2**64


def _unique_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct sequence ids with 6 to 10 digits, mostly uniform below 2**32 like the real ones."""
    ids: list[int] = []
    seen: set[int] = set()
    while len(ids) < n:
        m = n - len(ids)
        uniform = rng.integers(100_000, 2**32 - 1, m)
        log_uniform = np.exp(rng.uniform(np.log(1e5), np.log(2**32 - 1), m)).astype(np.int64)
        for v in np.where(rng.random(m) < 0.9, uniform, log_uniform).tolist():
            if v not in seen:
                seen.add(v)
                ids.append(v)
    return np.array(ids, dtype=np.int64)


# ---------------------------------------------------------------- one sequence


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


def generate_sequence(seed: int, index: int, sign: int, participant: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(frame numbers int16 (T,), landmarks float32 (T, 543, 3) with NaN) of sequence `index`."""
    seed = _seed(seed)
    rng = _rng(seed, _SEQUENCE, index)
    sg, pp = _sign(seed, sign), _participant(seed, participant)
    style_rng = _rng(seed, _STYLE, participant, sign)  # how this participant makes this sign
    style, style_curl = style_rng.normal(0, 0.15, 2), style_rng.normal(0, 0.1, 5)
    n = int(frames)
    t = np.arange(n, dtype=np.float64)

    # Frame numbers: a random start, rarely a few gaps.
    first = min(int(rng.exponential(29.0)), 484)
    step = np.ones(n, dtype=np.int64)
    if n > 3 and rng.random() < 0.03:
        step[rng.integers(1, n, rng.integers(1, 3))] += rng.integers(1, 4)
    frame_numbers = (first + np.cumsum(step) - 1).astype(np.int16)

    # When the dominant hand is in view: entry and exit frames, then dropouts.
    detected = rng.random() >= 0.04  # 4% of sequences: the hands are never detected
    lead, tail = rng.uniform(0, 0.6, 2) ** 1.2 * n
    t0, t1 = int(lead), max(int(lead) + 1, int(np.ceil(n - tail)))
    t1 = min(t1, n)
    in_view = (t >= t0) & (t < t1) & detected
    span = max(t1 - t0 - 1, 1)
    tau = np.clip((t - t0) / span, 0, 1)
    a = rng.uniform(-0.5, 0.5)
    tau = np.clip(tau + a * np.sin(2 * np.pi * tau) / (2 * np.pi), 0, 1) ** np.exp(rng.normal(0, 0.2))
    visible = in_view & (rng.random(n) >= rng.uniform(0, 0.4))

    # Dominant wrist path in body units (dominant side = +u), with entry from and exit to the rest position.
    amp = np.clip(rng.normal(1, 0.15), 0.6, 1.4)
    loc = sg["loc"] + pp["offset"] + style + rng.normal(0, 0.2, 2)
    wave = np.sin(2 * np.pi * sg["freq"] * tau[:, None] + sg["phase"]) - np.sin(sg["phase"])  # (T, 3)
    path = loc + amp * wave @ sg["amp"]
    enter = _smoothstep((t + 1) / max(t0, 1))[:, None]
    leave = _smoothstep((n - t) / max(n - t1, 1))[:, None]
    path = _REST + (path - _REST) * np.minimum(enter, leave)
    jitter = pp["noise"] * rng.uniform(0.7, 1.3)
    path = path + jitter * rng.standard_normal((n, 2))

    ramp = _smoothstep(tau)[:, None]
    curl = sg["curl"][0] + (sg["curl"][1] - sg["curl"][0]) * ramp + style_curl + rng.normal(0, 0.15, 5)
    roll = sg["roll"][0] + (sg["roll"][1] - sg["roll"][0]) * tau + rng.normal(0, 0.2)
    yaw = np.full(n, sg["yaw"] + rng.normal(0, 0.25))
    hand = _hand_shape(np.clip(curl, 0, 1), sg["spread"], roll, yaw)
    dom = np.concatenate([path, np.zeros((n, 1))], axis=1)[:, None, :] + hand * pp["hand_size"]
    dom += 0.4 * jitter * rng.standard_normal(dom.shape)

    # Second hand: mirrors the dominant one, holds a base handshape, or rests (rare spurious detections).
    if sg["second"] == "mirror":
        other_path = path * [-1, 1] + sg["mirror_offset"] + rng.normal(0, 0.1, 2)
        other_hand = hand
        other_visible = in_view & (rng.random(n) >= rng.uniform(0, 0.3))
    elif sg["second"] == "base":
        wobble = 0.1 * np.sin(2 * np.pi * tau + rng.uniform(0, 2 * np.pi))[:, None]
        other_path = sg["base_loc"] + pp["offset"] * [-1, 1] + wobble + rng.normal(0, 0.15, 2)
        other_curl = np.clip(np.broadcast_to(sg["base_curl"] + rng.normal(0, 0.15, 5), (n, 5)), 0, 1)
        roll2 = np.full(n, sg["base_roll"] + rng.normal(0, 0.15))
        other_hand = _hand_shape(other_curl, sg["spread"], roll2, np.full(n, rng.uniform(-0.8, 0.8)))
        other_visible = in_view & (rng.random(n) >= rng.uniform(0, 0.3))
    else:
        other_path = np.broadcast_to([-1.5, 3.6] + rng.normal(0, 0.2, 2), (n, 2))
        other_curl = np.broadcast_to(rng.uniform(0, 1, 5), (n, 5))
        other_hand = _hand_shape(other_curl, np.zeros(5), np.full(n, 0.3), np.zeros(n))
        other_visible = rng.random(n) < rng.uniform(0, 0.08)
    other_path = np.asarray(other_path, dtype=np.float64) + jitter * rng.standard_normal((n, 2))
    other_hand = other_hand * [-1, 1, 1] * pp["hand_size"]  # a mirror-image hand
    other = np.concatenate([other_path, np.zeros((n, 1))], axis=1)[:, None, :] + other_hand
    other += 0.4 * jitter * rng.standard_normal(other.shape)

    # Head sway and a per-sequence body shift; body units to image coordinates.
    scale, centre, mirror = pp["scale"], pp["centre"], pp["mirror"]
    shift = rng.normal(0, 0.1, 2)
    ph = rng.uniform(0, 2 * np.pi, 3)
    w = rng.uniform(0.03, 0.12, 3)
    sway = 0.06 * np.stack([np.sin(w[0] * t + ph[0]), np.sin(w[1] * t + ph[1])], axis=1)
    head_roll = 0.03 * np.sin(w[2] * t + ph[2])

    def to_image(pts: np.ndarray) -> np.ndarray:  # body units (dominant side +u) -> image x, y
        return centre + scale * (shift + pts[..., :2] * [mirror, 1.0])

    out = np.empty((n, N_RAW, 3), dtype=np.float64)
    face = _FACE_TEMPLATE[:, :2] + pp["face"]
    cr, sr = np.cos(head_roll)[:, None], np.sin(head_roll)[:, None]
    fx = face[:, 0] * cr - face[:, 1] * sr + sway[:, :1]
    fy = face[:, 0] * sr + face[:, 1] * cr + sway[:, 1:]
    out[:, _FACE, 0] = centre[0] + scale * (shift[0] + fx)
    out[:, _FACE, 1] = centre[1] + scale * (shift[1] + fy)
    out[:, _FACE, 2] = scale * _FACE_TEMPLATE[:, 2] + 0.002 * rng.standard_normal((n, 468))
    out[:, _FACE, :2] += 0.0008 * rng.standard_normal((n, 468, 2))

    dom_side, other_side = ("left", "right") if mirror > 0 else ("right", "left")
    hand_z = scale * 0.6  # hand z: relative to the wrist, in image-width units
    for side, pts, seen in ((dom_side, dom, visible), (other_side, other, other_visible)):
        off = _HAND_OFFSET[side]
        block = out[:, off : off + 21]
        block[..., :2] = to_image(pts)
        block[..., 2] = hand_z * pts[..., 2] + 1e-7 * rng.standard_normal((n, 21))
        block[~seen] = np.nan

    pose = np.empty((n, 33, 3))
    pose[..., :2] = centre + scale * (shift + _POSE_XY)
    pose[:, _HEAD, :2] += scale * sway[:, None, :]
    pose[..., 2] = _POSE_Z * (scale / UNIT)
    for side, pts in ((dom_side, dom), (other_side, other)):
        shoulder, elbow, wrist, pinky, index_, thumb = _ARM[side]
        hand_xy = to_image(pts)  # (T, 21, 2)
        pose[:, wrist, :2] = hand_xy[:, 0]
        pose[:, pinky, :2], pose[:, index_, :2], pose[:, thumb, :2] = hand_xy[:, 17], hand_xy[:, 5], hand_xy[:, 2]
        out_dir = np.sign(pose[:, shoulder, :1] - centre[0])  # elbows bend outward and down
        pose[:, elbow, :2] = 0.5 * (pose[:, shoulder, :2] + hand_xy[:, 0]) + scale * np.concatenate(
            [0.6 * out_dir, np.full((n, 1), 0.8)], axis=1
        )
        raised = np.clip((5.5 - pts[:, 0, 1]) / 4.0, 0, 1)  # how far the wrist is above the rest position
        for k in (wrist, pinky, index_, thumb):
            pose[:, k, 2] = (scale / UNIT) * (-0.3 - 1.5 * raised)
    pose[..., :2] += 0.02 * scale * rng.standard_normal((n, 33, 2))
    pose[..., 2] += 0.08 * rng.standard_normal((n, 33))
    out[:, _POSE : _POSE + 33] = pose

    out[rng.random(n) < 0.008, _FACE] = np.nan
    return frame_numbers, out.astype(np.float32)


@lru_cache(maxsize=2048)
def _row_id_block(frame: int) -> bytes:
    """The 543 row_id strings of one frame number, concatenated."""
    return "".join(f"{frame}{s}" for s in _SUFFIX_STR).encode()


def _string_array(data: bytes, lengths: np.ndarray) -> pa.Array:
    """A pyarrow string array (no nulls) from concatenated UTF-8 bytes and the length of each string."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.StringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(data))


def sequence_table(frame_numbers: np.ndarray, xyz: np.ndarray) -> pa.Table:
    """The Kaggle-layout table of one sequence: 543 rows a frame, exact schema and dtypes."""
    frames = np.asarray(frame_numbers, dtype=np.int16)
    n = len(frames)
    digits = np.array([len(str(f)) for f in frames.tolist()], dtype=np.int64)
    row_id = _string_array(
        b"".join(_row_id_block(f) for f in frames.tolist()),
        (digits[:, None] + _SUFFIX_LENGTHS).reshape(-1),
    )
    # float32 values widened to float64; NaN stored as null, as pandas wrote the real files.
    flat = np.ascontiguousarray(np.asarray(xyz, dtype=np.float32).reshape(n * N_RAW, 3).T, dtype=np.float64)
    columns = [
        pa.array(np.repeat(frames, N_RAW), type=pa.int16()),
        row_id,
        _string_array(_TYPE_BYTES * n, np.tile(_TYPE_LENGTHS, n)),
        pa.array(np.tile(ROW_INDEX, n), type=pa.int16()),
        pa.array(flat[0], from_pandas=True),
        pa.array(flat[1], from_pandas=True),
        pa.array(flat[2], from_pandas=True),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) for the pipeline's atomic file `f` of `path` (not fsynced: demo data is made again at will)."""
    with atomic_file(path, durable=False) as f:
        write(f)


def _write_chunk(root: str, seed: int, items: list[tuple[int, int, int, int, str]]) -> None:
    """Generate and write sequences (index, sign, participant, frames, relative path)."""
    for index, sign, participant, frames, rel in items:
        table = sequence_table(*generate_sequence(seed, index, sign, participant, frames))
        _write_atomic(
            Path(root) / rel,
            lambda f, table=table: pq.write_table(table, f, version="1.0", use_dictionary=_DICTIONARY_COLUMNS),
        )


def write_demo_dataset(
    out: str | Path, sequences: int = 2000, signs: int = 25, participants: int = 10, seed: int = 0, jobs: int = 1
) -> dict:
    """Write a synthetic dataset in the Kaggle layout under `out` and return a summary.

    The same arguments give byte-identical files whatever `jobs` is (joblib processes when jobs != 1; -1 means
    all cores). Existing files of the same names are replaced; other files under `out` are left alone.
    The label map is written after the parquet files and train.csv last of all, so a complete train.csv means a
    complete dataset.
    """
    seed_arg = int(seed)
    plan = plan_dataset(sequences, signs, participants, seed)
    root = Path(out)
    for pid in np.unique(plan["participant_id"]).tolist():
        (root / "train_landmark_files" / str(pid)).mkdir(parents=True, exist_ok=True)
    items = list(
        zip(
            range(sequences),
            plan["sign"].tolist(),
            plan["participant"].tolist(),
            plan["frames"].tolist(),
            plan["path"].tolist(),
            strict=True,
        )
    )
    seed = _seed(seed)
    if jobs == 1:
        _write_chunk(str(root), seed, items)
    else:
        from joblib import Parallel, delayed

        n_chunks = min(len(items), 64)
        chunks = [items[i::n_chunks] for i in range(n_chunks)]
        Parallel(n_jobs=jobs)(delayed(_write_chunk)(str(root), seed, chunk) for chunk in chunks)

    names = plan["sign_names"]
    lines = ["path,participant_id,sequence_id,sign"] + [
        f"{p},{a},{b},{names[k]}"
        for p, a, b, k in zip(
            plan["path"].tolist(),
            plan["participant_id"].tolist(),
            plan["sequence_id"].tolist(),
            plan["sign"].tolist(),
            strict=True,
        )
    ]
    label_map = json.dumps({name: i for i, name in enumerate(names)})
    _write_atomic(root / "sign_to_prediction_index_map.json", lambda f: f.write(label_map.encode("utf-8")))
    _write_atomic(root / "train.csv", lambda f: f.write(("\n".join(lines) + "\n").encode("utf-8")))
    frames = int(plan["frames"].sum())
    log.info("wrote %d sequences (%d frames) to %s", sequences, frames, root)
    return {
        "path": str(root),
        "sequences": int(sequences),
        "signs": int(signs),
        "participants": int(participants),
        "frames": frames,
        "rows": frames * N_RAW,
        "seed": seed_arg,
    }
