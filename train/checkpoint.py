"""Checkpoints: written atomically, loaded with `weights_only=True` and checked; init-from; the resume rule.

A checkpoint is a dict: `model`, `config` (asdict of the run's TrainConfig) and `label_map` always;
`optimizer`, `scheduler`, `ema`, `step`, `epoch`, `batch_in_epoch`, `best_top1`, `rng` (and more)
in those the training loop writes, which a resumed run needs.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import AslError
from pipeline.files import write_atomic
from train.config import ConfigError, OptionsError, TrainConfig, fixed_options
from train.model import SignModel, model_config

# What every checkpoint holds, and what a resume needs on top.
CHECKPOINT_KEYS = ("model", "config", "label_map")
RESUME_KEYS = ("optimizer", "scheduler", "ema", "step", "epoch", "batch_in_epoch", "best_top1", "rng")
# Model options that change neither the weights' shapes nor the evaluated function: a fine-tune may change them.
REGULARIZATION = ("dropout", "drop_path", "attn_dropout")


class CheckpointError(AslError, ValueError):
    """A file that is not a usable asl-train checkpoint; the message names it and says why, in one line."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: not an asl-train checkpoint: {reason}")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialize in memory, then the pipeline's atomic write: a kill never leaves a half-written file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint loaded with `weights_only=True` and checked: its model can be built and takes its weights.

    Anything else (an empty, truncated or foreign file, or one holding Python objects, which
    `weights_only` refuses to unpickle) is a CheckpointError.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except pickle.UnpicklingError as exc:
        reason = "empty, truncated or not a torch file (UnpicklingError)"
        if "GLOBAL" in str(exc):  # weights_only met a class or function to import: the file would run code
            reason = "it holds Python objects besides tensors and plain data (refused: unpickling them could run code)"
        raise CheckpointError(path, reason) from None
    except Exception as exc:  # torch raises EOFError, RuntimeError, KeyError... for files that are not its own
        raise CheckpointError(path, f"empty, truncated or not a torch file ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        have = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(path, f"expected a dict with {', '.join(CHECKPOINT_KEYS)}; found {have}")
    try:
        model_from_checkpoint(ckpt)
    except Exception as exc:  # a config the model cannot take, weights of other shapes or names
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"its weights do not fit the model its config describes ({first})") from None
    return ckpt


def build_model(cfg: TrainConfig, n_classes: int) -> SignModel:
    """A freshly initialized model of the config's preset and overrides."""
    return SignModel(model_config(cfg.preset, n_classes, **cfg.model))


def model_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = True) -> SignModel:
    """The trained model of a checkpoint (its EMA weights when present and `use_ema`)."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg, len(ckpt["label_map"]))
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") else ckpt["model"]
    model.load_state_dict(weights)
    return model.eval()


def load_initial_weights(model: SignModel, path: str | Path, label_map: dict[str, int], new_head: bool) -> None:
    """Start `model` from another run's trained weights (its EMA weights when present: what evaluate scores).

    The architecture must match (regularization aside), and so must the label map unless `new_head`,
    which keeps this model's freshly initialized classifier.
    """
    ckpt = load_checkpoint(path)
    source = model_from_checkpoint(ckpt)
    theirs, ours = asdict(source.cfg), asdict(model.cfg)
    differ = [f"{k} {theirs[k]} (here {ours[k]})" for k in ours
              if k not in ("n_classes", *REGULARIZATION) and theirs[k] != ours[k]]  # fmt: skip
    if differ:
        preset = TrainConfig.from_dict(ckpt["config"]).preset
        raise ConfigError(f"--init-from {path}: its {preset!r} model differs from this run's in {', '.join(differ)}; "
                          f"pass --preset {preset} and the overrides it was trained with")  # fmt: skip
    if ckpt["label_map"] != label_map and not new_head:
        theirs_n, ours_n = len(ckpt["label_map"]), len(label_map)
        raise ConfigError(f"--init-from {path}: it was trained with another label map ({theirs_n} signs; these "
                          f"shards have {ours_n}); pass --new-head for a new classifier head")  # fmt: skip
    weights = source.state_dict()
    if new_head:
        weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
    model.load_state_dict(weights, strict=not new_head)


def stored_config(run: str | Path, ckpt: dict[str, Any] | None = None) -> TrainConfig:
    """The options the run in directory `run` was trained with (its last.pt's), its directory as `out`."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(Path(run) / "last.pt")
    return TrainConfig.from_dict({**ckpt["config"], "out": str(run)})


def check_resumable(run: str | Path, stored: TrainConfig, cfg: TrainConfig) -> None:
    """The resume rule: a resumed run keeps its options, but for how far it goes, what it logs, and where
    it reads its shards (`config.RESUMABLE`)."""
    if fixed := fixed_options(stored, cfg):
        raise OptionsError(f"--resume continues {run} with its stored options, so {', '.join(fixed)} cannot "
                           f"change; to change them, start a new run from its weights with --init-from "
                           f"{Path(run) / 'last.pt'}")  # fmt: skip


def resume_checkpoint(run: str | Path, cfg: TrainConfig) -> dict[str, Any]:
    """The last.pt of `run`, checked: it holds the training state, and `cfg` keeps the options it must keep."""
    path = Path(run) / "last.pt"
    ckpt = load_checkpoint(path)
    if absent := [k for k in RESUME_KEYS if k not in ckpt]:
        raise CheckpointError(path, f"cannot resume without {', '.join(absent)}")
    check_resumable(run, stored_config(run, ckpt), cfg)
    return ckpt
