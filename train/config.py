"""TrainConfig: every training option's default, type, bounds and help text, once.

`asl-train`'s options are generated from these fields (see `train.cli`), a run's config.json is
`asdict` of one, and a config file may hold any subset of them. A field without help text is an
option of config files only.
"""

from __future__ import annotations

import copy
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pipeline.errors import AslError
from pipeline.location import RETRIES, STALL_S
from train.augment import AugmentConfig
from train.model import PRESETS, model_config
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
    """Comma-separated fold numbers."""
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{value!r}: expected comma-separated fold numbers, e.g. 0 or 0,1") from None


def parse_val_folds(value: str) -> list[int]:
    """Fold numbers, or [] for `none` (train on every fold)."""
    if value.strip().lower() == "none":
        return []
    if not (folds := parse_folds(value)):
        raise ConfigError(f"{value!r} names no fold; use --val-folds none to train on every fold without "
                          "validation, or name folds, e.g. --val-folds 0 or 0,1")  # fmt: skip
    return folds


def parse_report_to(value: str) -> list[str]:
    """Backend names, comma-separated, or none."""
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    if names == ["none"]:
        return []
    if not names or any(n not in BACKENDS for n in names):
        raise ConfigError(f"{value!r}: expected none, or {' or '.join(BACKENDS)} (both: tensorboard,csv)")
    return names


MODEL_KEYS = {
    "dim": (int, "Override the preset's width."),
    "depth": (int, "Override the preset's number of conv+transformer groups."),
    "dropout": (float, "Override the preset's late dropout."),
    "drop_path": (float, "Override the preset's drop-path rate."),
}


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
    batch_size: int = option(64, "Per rank.", min=1)
    lr: float = option(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = option(0.05, "AdamW weight decay.")
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
    workers: int = option(2, "DataLoader workers.", min=0)
    seed: int = option(0, "Seed of the weights' initialization, the data order and the augmentations.")
    max_steps: int | None = option(None, "Stop after this many steps.", min=1, resumable=True)
    save_every: int = option(0, "Also write last.pt every N steps (0: at epoch ends only).", min=0, resumable=True)
    shard_check: str = option(
        "auto",
        "What every shard read is checked against in the manifest, besides its keys, count and labels: sha256 and "
        "size, or size only; auto: sha256 for a remote location (http, pipe:), size for a local directory.",
        choices=["auto", "sha256", "size"],
        resumable=True,
    )
    io_timeout: float = option(
        STALL_S, "Seconds without a byte before a remote shard read is abandoned.", min=0, min_open=True,
        resumable=True,
    )  # fmt: skip
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
        10, "Steps between per-step logs (progress bar and --report-to); epoch ends are always logged.", min=1,
        resumable=True,
    )  # fmt: skip
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
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not a readable JSON config ({exc})") from None
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

    def check(self) -> None:
        """Refuse options that do not go together and model or augmentation overrides that cannot be built."""
        if self.new_head and not self.init_from:
            raise OptionsError("--new-head needs --init-from: it replaces the head of the weights a run starts from")
        try:
            model_config(self.preset, 1, **self.model)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model options {self.model} of preset {self.preset!r}: {exc}") from None
        try:
            AugmentConfig(**self.augment_options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"augment_options {self.augment_options}: {exc}") from None


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (int for float, never bool for a number)."""
    for t in typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,):
        t = typing.get_origin(t) or t
        if isinstance(value, bool) and t is not bool:
            continue
        if (t is type(None) and value is None) or (t is float and isinstance(value, int)) or isinstance(value, t):
            return True
    return False


def _out_of_bounds(name: str, value: Any) -> str | None:
    """Why a number is outside the bounds of its field (or not finite), or None."""
    meta = FIELDS[name].metadata
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return f"{name} must be a finite number, not {value}"
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_open") and value == lo)):
        return f"{name} {value} is below its minimum {lo}" if value < lo else f"{name} must be above {lo}"
    if hi is not None and value > hi:
        return f"{name} {value} is above its maximum {hi}"
    return None


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
