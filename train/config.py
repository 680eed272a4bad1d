"""TrainConfig: every training option's default, type, bounds and help text, once.

`asl-train`'s options are generated from these fields (see `train.cli`), a run's config.json is
`asdict` of one, and a config file may hold any subset of them. A field without help text is an
option of config files only.
"""

from __future__ import annotations

import copy
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import AslError
from pipeline.policy import MIN_RATE, RETRIES, STALL_S, ReadPolicy
from pipeline.read import InputFileError, read_file
from pipeline.text import printable
from train.augment import AugmentConfig
from train.model import PRESETS, ModelConfig, SignModel, count_parameters, model_config
from train.optim import OPTIMIZERS
from train.report import BACKENDS


class ConfigError(AslError, ValueError):
    """An option or config value that cannot be used; the message names it."""


class OptionsError(ConfigError):
    """Options that do not go together (a command line's usage error)."""


def option(default: Any, help: str | None = None, **meta: Any) -> Any:
    """A TrainConfig field: `help` makes it a command-line option; `meta` holds its bounds and parsing.

    meta: min, max, min_open (numbers); choices; path="file" (an existing file); parse (str -> value)
    with show (the default as typed); keys ({key: (type, help)}: one option per key of a dict field);
    resumable (a resumed run may change it).
    """
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def parse_folds(value: str) -> list[int]:
    """The folds of a --folds or --val-folds value such as `0,2`: distinct non-negative integers in ASCII digits
    (`²` and `٣` are digits to `str.isdigit`, not fold numbers), in the order given. The one fold parser."""
    parts = [p.strip() for p in value.split(",")]
    if not all(FOLD.fullmatch(p) for p in parts):
        raise ConfigError(f"{printable(repr(value), 60)}: expected fold numbers separated by commas, e.g. 0 or 0,2")
    folds = [int(p) for p in parts]
    if len(set(folds)) != len(folds):
        raise ConfigError(f"{printable(repr(value), 60)}: a fold is named twice")
    return folds


FOLD = re.compile(r"[0-9]{1,6}")  # a build writes at most 1,000 folds


def parse_val_folds(value: str) -> list[int]:
    """Fold numbers, or [] for `none` (train on every fold)."""
    if value.strip().lower() == "none":
        return []
    if not value.replace(",", "").strip():
        raise ConfigError(
            f"{value!r} names no fold; use --val-folds none to train on every fold without "
            "validation, or name folds, e.g. --val-folds 0 or 0,1"
        )
    return parse_folds(value)


def parse_report_to(value: str) -> list[str]:
    """Backend names, comma-separated, or none."""
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    if names == ["none"]:
        return []
    if not names or any(n not in BACKENDS for n in names):
        raise ConfigError(f"{value!r}: expected none, or {' or '.join(BACKENDS)} (both: tensorboard,csv)")
    return names


# Upper bounds of options that size memory or processes: far above any useful value.
MAX_BATCH = 1 << 16
MAX_WORKERS = 256

MAX_CONFIG_BYTES = 1 << 20  # a config file of every option is about 2 KB

MODEL_KEYS = {
    "dim": (int, "Override the preset's width."),
    "depth": (int, "Override the preset's number of conv+transformer groups."),
    "dropout": (float, "Override the preset's late dropout."),
    "drop_path": (float, "Override the preset's drop-path rate."),
}
# Bounds of every ModelConfig field, checked before a model is built from options or from a checkpoint's
# stored config: far beyond any useful sign model, yet close enough that a crafted config cannot ask for
# a model that exhausts memory; so is the parameter count, taken on the meta device (nothing allocated).
MODEL_BOUNDS: dict[str, tuple[float, float]] = {
    "n_classes": (1, 100_000),
    "dim": (1, 4096),
    "depth": (1, 32),
    "convs_per_group": (0, 8),
    "heads": (1, 64),
    "kernel_size": (1, 255),
    "expand": (1, 16),
    "eca_kernel": (1, 63),
    "top_expand": (1, 16),
    "dropout": (0, 1),
    "drop_path": (0, 1),
    "attn_dropout": (0, 1),
    "max_len": (1, 100_000),
}
MAX_PARAMETERS = 500_000_000  # the default preset has about 1.8 M


def checked_model_config(preset: str, n_classes: int, overrides: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of `preset` with `overrides`, or a ConfigError: every field a finite number of its type
    within MODEL_BOUNDS, and at most MAX_PARAMETERS parameters."""
    where = f"model options {overrides} of preset {preset!r}"
    if not isinstance(overrides, dict):
        raise ConfigError(f"model options {overrides!r}: expected an object of ModelConfig fields")
    try:
        cfg = model_config(preset, n_classes, **overrides)
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for f in fields(cfg):
        value, (lo, hi) = getattr(cfg, f.name), MODEL_BOUNDS.get(f.name, (-math.inf, math.inf))
        kind = int if f.type in ("int", int) else int | float
        if isinstance(value, bool) or not isinstance(value, kind) or not _finite(value) or not lo <= value <= hi:
            raise ConfigError(
                f"{where}: {f.name} {value!r} is not {'an integer' if kind is int else 'a number'} in [{lo}, {hi}]"
            )
    with torch.device("meta"):
        try:
            n = count_parameters(SignModel(cfg))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if n > MAX_PARAMETERS:
        raise ConfigError(f"{where}: a model of {n:,} parameters, over the limit of {MAX_PARAMETERS:,}")
    return cfg


@dataclass
class TrainConfig:
    # The field order is the order of a checkpoint's stored config: keep it, append new fields at the end.
    shards: str = option(
        "shards",
        "Shards written by `asl-pipeline build-shards`: a directory, a file:// or http(s):// URL of one, or a pipe: "
        "command template whose {} stands for a file name (e.g. 'pipe:aws s3 cp s3://bucket/shards/{} -').",
        resumable=True,
    )
    out: str = option("runs/default", "Run directory: checkpoints, metrics.jsonl, config.json.", path="any")
    val_folds: list[int] = option(
        [0],
        "Validation folds, comma-separated; or none: train on every fold without validation (the result is then "
        "last.pt, and no best.pt is written).",
        parse=parse_val_folds,
        show="0",
    )
    epochs: int = option(
        30,
        "Epochs to train. With --resume, a larger value extends the run: from its current step on, the learning "
        "rate follows the warmup + cosine schedule of a run planned for the new length (for 30 -> 40 epochs it "
        "restarts at about 18% of --lr and decays to 0 at epoch 40); the result differs from a run planned that "
        "long.",
        min=1,
        resumable=True,
    )
    batch_size: int = option(64, "Per rank.", min=1, max=MAX_BATCH)
    lr: float = option(1e-3, "Peak learning rate.", min=0, max=10)
    weight_decay: float = option(0.05, "Weight decay (decoupled from the gradient, as in AdamW).", min=0, max=10)
    warmup: float = option(0.1, "Warmup fraction: the share of all steps spent warming up.", min=0, max=1)
    label_smoothing: float = option(0.1, "Label smoothing of the cross-entropy loss.", min=0, max=1)
    grad_clip: float = option(1.0, "Clip the gradients' global norm to this before each step.", min=0, min_open=True)
    preset: str = option(
        "default", "Model size (default ~1.8M parameters; small for a CPU demo).", choices=sorted(PRESETS)
    )
    model: dict[str, Any] = option({}, keys=MODEL_KEYS)  # overrides of the preset
    augment: bool = option(True, "Augment the batches on the device (--no-augment: train on the stored features).")
    augment_options: dict[str, Any] = option({})  # overrides of AugmentConfig
    ema: float = option(0.0, "EMA decay of the weights (e.g. 0.999); 0 turns EMA off.", min=0, max=1)
    compile: bool = option(False, "torch.compile the model.")
    bucket: bool = option(True, "Length bucketing (--no-bucket: pad every batch to 384 frames).")
    device: str = option("auto", "Where to train.", choices=["auto", "cpu", "cuda"])
    workers: int = option(2, "DataLoader workers.", min=0, max=MAX_WORKERS, resumable=True)
    seed: int = option(
        0, "Seed of the weights' initialization, the data order and the augmentations.", min=0, max=2**32 - 1
    )
    max_steps: int | None = option(
        None,
        "Stop after this many steps (the learning-rate schedule stays planned for --epochs: a resume with a larger "
        "--max-steps, or none, continues as if uninterrupted).",
        min=1,
        resumable=True,
    )
    save_every: int = option(0, "Also write last.pt every N steps (0: at epoch ends only).", min=0, resumable=True)
    shard_check: str = option(
        "auto",
        "What every shard read is checked against in the manifest, besides its keys, count and labels: sha256 and "
        "size, or size only; auto: sha256 for a remote location (http, pipe:), size for a local directory.",
        choices=["auto", "sha256", "size"],
        resumable=True,
    )
    io_timeout: float = option(
        STALL_S,
        "Seconds without a byte before a remote shard read is abandoned.",
        min=0,
        min_open=True,
        resumable=True,
    )
    io_retries: int = option(
        RETRIES,
        "Further attempts at a remote shard read that failed (cut short, stalled, corrupted), after 1 s, 2 s, ...",
        min=0,
        resumable=True,
    )
    report_to: list[str] = option(
        [],
        "Also log per-step loss, lr and samples/s and the per-epoch metrics to: tensorboard (RUN/tensorboard; "
        "needs pip install -e '.[tensorboard]'), csv (RUN/steps.csv, RUN/epochs.csv), or both: tensorboard,csv. "
        "metrics.jsonl and curves.png are always written.",
        parse=parse_report_to,
        show="none",
        resumable=True,
    )
    log_every: int = option(
        10,
        "Steps between per-step logs (progress bar and --report-to); epoch ends are always logged.",
        min=1,
        resumable=True,
    )
    init_from: str | None = option(
        None,
        "Start a new run from this checkpoint's trained weights (its EMA weights when it has them), with a new "
        "optimizer and schedule. The model must have the same architecture (--preset and overrides; dropout may "
        "differ) and the same label map, unless --new-head.",
        path="file",
    )
    new_head: bool = option(
        False, "With --init-from: a newly initialized classifier head, for shards with another label map."
    )
    optimizer: str = option(
        "adamw",
        "adamw; radam (RAdam, decoupled weight decay); radam-lookahead (RAdam inside Lookahead, k=5, alpha=0.5, as "
        "in the 1st-place asl-signs solution). --lr and --weight-decay apply to each.",
        choices=list(OPTIMIZERS),
    )
    awp: float = option(
        0.0,
        "Adversarial weight perturbation: before each step the weights move this far up the loss gradient (per "
        "tensor) and the step takes the gradients found there (1st place: 0.2). Costs a second forward and backward "
        "per batch while active; 0 turns it off.",
        min=0,
    )
    awp_from: int = option(0, "The epoch (from 0) at which --awp starts (1st place: 15 of 300).", min=0)
    late_dropout: float | None = option(
        None,
        "Late dropout as a schedule: none before --late-dropout-from, this rate from then on (1st place: 0.8 from "
        "epoch 15). Unset: the preset's dropout (--dropout) throughout.",
        min=0,
        max=1,
    )
    late_dropout_from: int = option(0, "The epoch (from 0) at which --late-dropout starts.", min=0)
    cache_dir: str | None = option(
        None,
        "Keep the shards of a remote location (http, pipe:) in this local directory: each is fetched once, checked "
        "against the manifest's sha256, and read from here afterwards (re-checked for size on every read, and for "
        "sha256 with --shard-check sha256). Entries are keyed by the location and the build; ranks of a node share "
        "one directory safely. A local --shards directory is never cached.",
        path="any",
        resumable=True,
    )
    cache_limit: float | None = option(
        None,
        "GB the --cache-dir may hold in all (default: no limit); past it the least recently read shards are evicted.",
        min=0,
        min_open=True,
        resumable=True,
    )
    io_min_rate: float = option(
        MIN_RATE / 1000,
        "kB/s a remote read must average after its first --io-timeout seconds (a shard of B bytes is abandoned after "
        "--io-timeout + B / rate s); 0: no such limit.",
        min=0,
        resumable=True,
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Lenient, for checkpoints: keys this version does not know are ignored, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """Strict, for config files: an unknown key, a value of the wrong type or out of bounds is an error.

        Any subset of the options may be given; the others take their defaults.
        """
        try:  # through the input gate: a FIFO or /dev/zero is refused, never waited on or read without end
            d = json.loads(read_file(path, MAX_CONFIG_BYTES).decode(), object_pairs_hook=_unique_keys)
        except InputFileError as exc:
            raise ConfigError(f"{path}: not a readable JSON config ({exc.reason})") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ConfigError(f"{path}: not a readable JSON config ({printable(str(exc), 200)})") from None
        except DuplicateKeyError as exc:
            raise ConfigError(f"{path}: option {printable(repr(exc.key), 60)} is given twice") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of options, as in a run's config.json")
        hints = typing.get_type_hints(cls)
        if unknown := sorted(set(d) - set(hints)):
            raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}")
        if wrong := [k for k, v in d.items() if not _fits(v, hints[k])]:
            named = {k: hints[k].__name__ if isinstance(hints[k], type) else str(hints[k]) for k in wrong}
            found = ", ".join(f"{k} ({d[k]!r}, expected {named[k]})" for k in wrong)
            raise ConfigError(f"{path}: wrong type for {found}")
        if outside := [problem for k, v in d.items() if (problem := _out_of_bounds(k, v))]:
            raise ConfigError(f"{path}: {'; '.join(outside)}")
        return cls(**d)

    def read_policy(self) -> ReadPolicy:
        """How remote reads of these options' shards may take their time and retry (`pipeline.policy`)."""
        return ReadPolicy.from_options(self.io_timeout, self.io_min_rate, self.io_retries)

    def check(self) -> None:
        """Refuse bad values (`check_values`), options that do not go together and model or augmentation
        overrides that cannot be built."""
        self.check_values()
        if self.new_head and not self.init_from:
            raise OptionsError("--new-head needs --init-from: it replaces the head of the weights a run starts from")
        for start, on in (("awp_from", self.awp > 0), ("late_dropout_from", self.late_dropout is not None)):
            if on and getattr(self, start) >= self.epochs:
                raise OptionsError(
                    f"{flag(start)} {getattr(self, start)} is not below --epochs {self.epochs}: "
                    f"the piece would never start"
                )
        if self.late_dropout is not None and self.late_dropout >= 1:
            raise ConfigError(f"--late-dropout {self.late_dropout}: must be below 1 (1 drops every feature)")
        checked_model_config(self.preset, 1, self.model)
        if unknown := sorted(set(self.augment_options) - {f.name for f in fields(AugmentConfig)}, key=str):
            raise ConfigError(
                f"unknown augment_options key(s) {', '.join(map(str, unknown))}; known: "
                f"{', '.join(f.name for f in fields(AugmentConfig))}"
            )
        try:
            AugmentConfig(**self.augment_options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"augment_options {self.augment_options}: {exc}") from None

    def check_values(self) -> None:
        """Refuse a value of the wrong type, a number that is not finite or out of its field's bounds."""
        hints = typing.get_type_hints(type(self))
        if wrong := [f"{k} ({v!r}, expected {hints[k]})" for k, v in asdict(self).items() if not _fits(v, hints[k])]:
            raise ConfigError(f"wrong type for {', '.join(wrong)}")
        if outside := [problem for k, v in asdict(self).items() if (problem := _out_of_bounds(k, v))]:
            raise ConfigError("; ".join(outside))


class DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's dict, refusing a key given twice (json keeps the last silently)."""
    d: dict[str, Any] = {}
    for key, value in pairs:
        if key in d:
            raise DuplicateKeyError(key)
        d[key] = value
    return d


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (int for float, never bool for a number)."""
    for t in typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,):
        t, args = typing.get_origin(t) or t, typing.get_args(t)
        if isinstance(value, bool) and t is not bool:
            continue
        if t is list and args and args[0] is not Any:  # list[int]: every element too
            if isinstance(value, list) and all(_fits(v, args[0]) for v in value):
                return True
            continue
        if (t is type(None) and value is None) or (t is float and isinstance(value, int)) or isinstance(value, t):
            return True
    return False


def _out_of_bounds(name: str, value: Any) -> str | None:
    """Why a number is outside the bounds of its field (or not finite, or a container holds such), or None."""
    meta = FIELDS[name].metadata
    if isinstance(value, list | tuple | dict):
        return f"{name} holds a number that is not finite: {value}" if _holds_nonfinite(value) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not _finite(value):
        return f"{name} must be a finite number, not {str(value)[:40]}"
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_open") and value == lo)):
        return f"{name} {value} is below its minimum {lo}" if value < lo else f"{name} must be above {lo}"
    if hi is not None and value > hi:
        return f"{name} {value} is above its maximum {hi}"
    return None


def _finite(value: float) -> bool:
    """Whether a number is finite as a float (an int beyond float's range is not: it overflows where used)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _holds_nonfinite(value: Any) -> bool:
    """Whether a JSON-like value holds, at any depth, a number that is not finite."""
    if isinstance(value, dict):
        return any(_holds_nonfinite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_nonfinite(v) for v in value)
    return isinstance(value, float | int) and not isinstance(value, bool) and not _finite(value)


FIELDS = {f.name: f for f in fields(TrainConfig)}
RESUMABLE = tuple(name for name, f in FIELDS.items() if f.metadata.get("resumable"))


def flag(name: str) -> str:
    """The command-line spelling of an option: `--batch-size` for batch_size."""
    return "--" + name.replace("_", "-")


def with_options(base: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """`base` with the options `given` over it; a dict option (model) is updated key by key."""
    merged = {k: {**getattr(base, k), **v} if isinstance(v, dict) else v for k, v in given.items()}
    return replace(base, **merged)


def fixed_options(stored: TrainConfig, cfg: TrainConfig) -> list[str]:
    """The options, as flags, in which `cfg` differs from `stored` where a resumed run may not change them."""
    a, b = asdict(stored), asdict(cfg)
    changed = []
    for name in FIELDS:
        if name in RESUMABLE or a[name] == b[name]:
            continue
        keys = FIELDS[name].metadata.get("keys")
        if keys and set(a[name]) | set(b[name]) <= set(keys):  # name the override options that differ
            changed += [flag(k) for k in keys if a[name].get(k) != b[name].get(k)]
        else:
            changed.append(flag(name))
    return sorted(changed)
