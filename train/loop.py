"""Train / evaluate / checkpoint / resume; DDP aware (launch with torchrun).

Reads top to bottom like nanoGPT's train.py: config -> data -> model -> optimizer ->
loop. Only rank 0 writes files. Checkpoints are written atomically and hold everything
needed to continue the same schedule, including the position inside the epoch.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import pickle
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.location import RETRIES, STALL_S
from pipeline.shards import ShardError, read_manifest, write_atomic, write_json_atomic
from train.augment import AugmentConfig, augment_batch
from train.batch import Batch
from train.data import checked, make_loader, train_val_folds
from train.distributed import agreed_batches, first_error
from train.model import SignModel, count_parameters, model_config
from train.report import Reporters, check_backends, open_reporters

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    shards: str = "shards"
    out: str = "runs/default"
    val_folds: list[int] = field(default_factory=lambda: [0])  # empty: no validation, train on every fold
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of all steps spent warming up
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    preset: str = "default"
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset
    augment: bool = True
    augment_options: dict[str, Any] = field(default_factory=dict)  # overrides of AugmentConfig
    ema: float = 0.0  # EMA decay of the weights; 0 turns it off
    compile: bool = False
    bucket: bool = True
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    max_steps: int | None = None
    save_every: int = 0  # steps between mid-epoch checkpoints; 0: only at epoch ends
    shard_check: str = "auto"  # "sha256" (and size), "size", or auto: sha256 for a remote location, else size
    io_timeout: float = STALL_S  # seconds without a byte before a remote shard read is abandoned
    io_retries: int = RETRIES  # further attempts at a remote shard read that failed
    report_to: list[str] = field(default_factory=list)  # logs besides metrics.jsonl: "tensorboard", "csv"
    log_every: int = 10  # steps between per-step logs (loss, lr, samples/s)
    init_from: str | None = None  # a checkpoint whose trained weights a new run starts from
    new_head: bool = False  # with init_from: a freshly initialized classifier head

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Lenient, for checkpoints: keys this version does not know are ignored, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """Strict, for config files (a run's config.json): an unknown key or a value of the wrong type is an error."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable JSON config ({exc})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of options, as in a run's config.json")
        hints = typing.get_type_hints(cls)
        if unknown := sorted(set(d) - set(hints)):
            raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
        if wrong := [k for k, v in d.items() if not _fits(v, hints[k])]:
            named = {k: hints[k].__name__ if isinstance(hints[k], type) else str(hints[k]) for k in wrong}
            found = ", ".join(f"{k} ({d[k]!r}, expected {named[k]})" for k in wrong)
            raise ValueError(f"{path}: wrong type for {found}")
        return cls(**d)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (int for float, never bool for a number)."""
    for t in typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,):
        t = typing.get_origin(t) or t
        if isinstance(value, bool) and t is not bool:
            continue
        if (t is type(None) and value is None) or (t is float and isinstance(value, int)) or isinstance(value, t):
            return True
    return False


# What a resumed run may change: how far it goes, what it logs, where it reads its shards (fingerprint checked).
RESUMABLE = ("epochs", "max_steps", "save_every", "report_to", "log_every", "shards", "shard_check", "io_timeout",
             "io_retries")  # fmt: skip


def resume_config(run: str | Path, **changes: Any) -> TrainConfig:
    """The config to continue `run` with: its last.pt's, with `changes` that alter RESUMABLE fields only."""
    stored = asdict(TrainConfig.from_dict({**load_checkpoint(Path(run) / "last.pt")["config"], "out": str(run)}))
    if fixed := sorted(k for k, v in changes.items() if k not in RESUMABLE and v != stored[k]):
        raise ValueError(f"a resumed run keeps its options; {', '.join(fixed)} cannot change")
    return TrainConfig(**{**stored, **changes})


@dataclass
class TrainResult:
    metrics: dict[str, Any]  # the last validation metrics (empty when no epoch ended in this run)
    model: torch.nn.Module  # the trained (unwrapped) model
    batches: int  # training batches this rank consumed in this run


# ---------------------------------------------------------------------------- setup


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def setup_distributed(name: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size); under torchrun each process takes GPU LOCAL_RANK, then joins the group."""
    device = resolve_device(name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device, 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def gathered_rng(generator: torch.Generator, device: torch.device, world: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states (torch, CUDA, augmentation), so a resume gives each rank its own back."""
    parts = {"torch": torch.get_rng_state(), "augment": generator.get_state().cpu()}
    if device.type == "cuda":
        parts["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return [parts]
    flat = torch.cat(list(parts.values())).to(device)  # same size on every rank
    bufs = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(bufs, flat)
    sizes = [p.numel() for p in parts.values()]
    return [dict(zip(parts, buf.cpu().split(sizes), strict=True)) for buf in bufs]


def restore_rng(states: list[dict[str, torch.Tensor]], rank: int, world: int, generator: torch.Generator,
                device: torch.device) -> None:  # fmt: skip
    if len(states) != world:
        # another world size also changes the batches per epoch, so the saved position would be wrong
        raise ValueError(f"the checkpoint was written by {len(states)} rank(s); resume with that many processes")
    state = states[rank]
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialize in memory, then the pipeline's atomic write: a kill never leaves a half-written file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


class CheckpointError(ValueError):
    """A file that is not a usable asl-train checkpoint; the message names it and says why, in one line."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: not an asl-train checkpoint: {reason}")


# What every checkpoint holds, and what a resume needs on top.
CHECKPOINT_KEYS = ("model", "config", "label_map")
RESUME_KEYS = ("optimizer", "scheduler", "ema", "step", "epoch", "batch_in_epoch", "best_top1", "rng")


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
    return SignModel(model_config(cfg.preset, n_classes, **cfg.model))


def model_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = True) -> SignModel:
    """The trained model of a checkpoint (its EMA weights when present and `use_ema`)."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg, len(ckpt["label_map"]))
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") else ckpt["model"]
    model.load_state_dict(weights)
    return model.eval()


# Model options that change neither the weights' shapes nor the evaluated function: a fine-tune may change them.
REGULARIZATION = ("dropout", "drop_path", "attn_dropout")


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
        raise ValueError(f"--init-from {path}: its {preset!r} model differs from this run's in {', '.join(differ)}; "
                         f"pass --preset {preset} and the overrides it was trained with")  # fmt: skip
    if ckpt["label_map"] != label_map and not new_head:
        theirs_n, ours_n = len(ckpt["label_map"]), len(label_map)
        raise ValueError(f"--init-from {path}: it was trained with another label map ({theirs_n} signs; these "
                         f"shards have {ours_n}); pass --new-head for a new classifier head")  # fmt: skip
    weights = source.state_dict()
    if new_head:
        weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
    model.load_state_dict(weights, strict=not new_head)


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_batches(model: torch.nn.Module, loader: Any, device: torch.device) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch on device, logits) for every batch of a loader, in eval mode."""
    model.eval()
    for batch in checked(loader):
        batch = batch.to(device, non_blocking=device.type == "cuda")
        with autocast(device):
            logits = model(batch.x, batch.mask)
        yield batch, logits.float()


def evaluate(model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
    """Validation loss, top-1 and top-5, summed over every rank."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    world = dist.get_world_size() if dist.is_initialized() else 1
    error = None
    try:  # ranks may hold different numbers of validation batches: agree once, at the end
        for batch, logits in predict_batches(model, loader, device):
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hit = top5 == batch.labels[:, None]
            sums += torch.stack([
                F.cross_entropy(logits, batch.labels, reduction="sum").double(), hit[:, 0].sum().double(),
                hit.any(dim=1).sum().double(), torch.tensor(len(batch), device=device).double(),
            ])  # fmt: skip
    except Exception as exc:
        if world == 1:
            raise
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ShardError) else str(exc)
    if (error := first_error(error, world)) is not None:
        raise ShardError(error)
    if world > 1:
        dist.all_reduce(sums)
    n = max(1.0, sums[3].item())
    return {"val_loss": sums[0].item() / n, "val_top1": sums[1].item() / n, "val_top5": sums[2].item() / n,
            "val_samples": int(sums[3].item())}  # fmt: skip


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------- training


def train(cfg: TrainConfig, resume: str | Path | None = None) -> TrainResult:
    """Train a new run, or with `resume` continue the run in that directory to its (possibly later) last step.

    A resumed run's `cfg` is its stored one, changed in RESUMABLE fields only (see `resume_config`).
    A larger `epochs` extends a run: from its current step on, the learning rate follows the
    schedule of a run planned for the new length (warmup and cosine over all its steps).
    """
    check_backends(cfg.report_to)  # on every rank, before any collective
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(Path(resume) / "last.pt")
        if absent := [k for k in RESUME_KEYS if k not in ckpt]:
            raise CheckpointError(Path(resume) / "last.pt", f"cannot resume without {', '.join(absent)}")
        stored = TrainConfig.from_dict({**ckpt["config"], "out": str(resume)})
        if changed := [k for k in asdict(cfg) if k not in RESUMABLE and getattr(cfg, k) != getattr(stored, k)]:
            raise ValueError(f"a resumed run keeps its options; {', '.join(changed)} cannot change")
    device, rank, world = setup_distributed(cfg.device)
    cuda, master, out = device.type == "cuda", rank == 0, Path(cfg.out)
    torch.manual_seed(cfg.seed)

    # data: every rank sees the same number of batches per epoch; a rank that cannot open the
    # shards stops every rank (one collective), instead of leaving them waiting in the first all-reduce
    error = None
    try:
        manifest = read_manifest(cfg.shards)
        if ckpt is not None and ckpt.get("shards_fingerprint") != manifest["fingerprint"]:
            raise ValueError(f"{cfg.shards} is not the shard set {resume} was trained on (its manifest differs)")
        label_map = manifest["label_map"]
        train_folds, val_folds = split_folds(manifest, cfg.val_folds, cfg.shards)
        loader_args = dict(workers=cfg.workers, rank=rank, world_size=world, seed=cfg.seed, bucket=cfg.bucket,
                           pin_memory=cuda, manifest=manifest, check=cfg.shard_check, stall_s=cfg.io_timeout,
                           retries=cfg.io_retries)  # fmt: skip
        train_loader = make_loader(cfg.shards, train_folds, cfg.batch_size, train=True, **loader_args)
        val_loader = None  # --val-folds none: no validation
        if val_folds:
            val_loader = make_loader(cfg.shards, val_folds, cfg.batch_size, train=False, **loader_args)
    except (OSError, ValueError) as exc:
        error = str(exc)
    if (error := first_error(error, world)) is not None:
        raise ShardError(error)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = max(1, int(cfg.warmup * total_steps))
    if ckpt is not None and ckpt["step"] >= total_steps:
        option, value = ("--max-steps", cfg.max_steps) if total_steps == cfg.max_steps else ("--epochs", cfg.epochs)
        raise ValueError(
            f"{resume} has finished: it trained {ckpt['step']} steps ({ckpt['epoch']} epochs), and "
            f"{option} {value} asks for {total_steps}; resume it with a larger {option} to go on"
        )

    # model, optimizer, schedule, EMA, augmentation
    model = build_model(cfg, len(label_map)).to(device)
    if cfg.init_from and ckpt is None:  # a resumed run has its own weights
        load_initial_weights(model, cfg.init_from, label_map, cfg.new_head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema)
    ) if cfg.ema else None  # fmt: skip
    aug_cfg = AugmentConfig(**cfg.augment_options)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed * 1000 + rank)  # every rank draws its own augmentations
    step, epoch, skip, best = 0, 0, 0, -1.0
    carried = torch.zeros(3, dtype=torch.float64, device=device)  # a resumed epoch's sums before the checkpoint
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema"])
            ema.n_averaged.fill_(ckpt["ema_n_averaged"])
        step, epoch, skip, best = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["best_top1"]
        restore_rng(ckpt["rng"], rank, world, generator, device)
        if master and "epoch_sums" in ckpt:  # summed over every rank: one rank carries them, the reduction adds
            carried[:2] = torch.tensor(ckpt["epoch_sums"], dtype=torch.float64)
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * lr_factor(step, total_steps, warmup)  # the next step's rate, stretched or not
    ids = [device.index] if cuda else None
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids) if world > 1 else model
    if cfg.compile:
        net = torch.compile(net, dynamic=True)

    if ckpt is None and (out / "last.pt").exists():  # checked on every rank, so none waits for a failed one
        raise FileExistsError(f"{out} already holds a run; continue it with --resume {out}, or pick another --out")
    reporters, error = Reporters([]), None
    if master:
        try:  # a failure here (read-only or full --out) must stop the other ranks too, not leave them waiting
            out.mkdir(parents=True, exist_ok=True)
            keep_metrics(out / "metrics.jsonl", epoch)  # drop epochs logged after the checkpoint we resume from
            reporters = open_reporters(cfg.report_to, out, step)
            write_json_atomic(out / "config.json", asdict(cfg))
        except OSError as exc:
            error = f"{out}: cannot write the run directory ({exc.strerror or exc})"
    if (error := first_error(error, world)) is not None:
        raise OSError(error)
    if master:
        log.info("model %s: %d parameters; %d steps/epoch, %d steps; train folds %s (%d samples), val folds %s, "
                 "device %s x%d", cfg.preset, count_parameters(model), steps_per_epoch, total_steps, train_folds,
                 fold_samples(manifest, train_folds), val_folds or "none (no validation: the result is last.pt)",
                 device, world)  # fmt: skip

    def checkpoint(name: str, batch_in_epoch: int) -> None:  # called on every rank: it gathers their RNG states
        rng = gathered_rng(generator, device, world)
        epoch_sums = sums[:2].clone() if batch_in_epoch else torch.zeros(2, dtype=torch.float64, device=device)
        if batch_in_epoch and world > 1:
            dist.all_reduce(epoch_sums)
        error = None
        if master:
            try:
                save_checkpoint(out / name, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
                    "ema_n_averaged": int(ema.n_averaged) if ema is not None else 0,
                    "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best_top1": best, "rng": rng,
                    "epoch_sums": epoch_sums.tolist(),
                    "config": asdict(cfg), "label_map": label_map, "shards_fingerprint": manifest["fingerprint"],
                })  # fmt: skip
            except OSError as exc:  # a full disk: every rank stops with this message (the last good file stays)
                error = f"{out / name}: cannot write the checkpoint ({exc.strerror or exc})"
        if (error := first_error(error, world)) is not None:
            raise OSError(error)

    metrics: dict[str, Any] = {}
    consumed = 0
    epochs = math.ceil(total_steps / steps_per_epoch)
    while step < total_steps:
        train_loader.dataset.set_epoch(epoch)
        net.train()
        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{epochs}", disable=not master or None,
                   dynamic_ncols=True, leave=False)  # fmt: skip
        sums = carried.clone()  # loss * samples, samples of the epoch, samples of this session (for the rate)
        carried.zero_()
        window = torch.zeros_like(sums)  # the same since the last per-step log: one sync per log
        t0 = t_log = time.perf_counter()
        for i, batch in enumerate(agreed_batches(train_loader, steps_per_epoch, world)):
            if i < skip:  # resuming mid-epoch: the epoch's order is deterministic, so skip what was trained
                continue
            batch = batch.to(device, non_blocking=cuda)  # (B, T, 118, 6)
            if cfg.augment:
                batch = augment_batch(batch, aug_cfg, generator)
            with autocast(device):
                logits = net(batch.x, batch.mask)  # (B, n_classes)
                loss = F.cross_entropy(logits.float(), batch.labels, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]  # the rate of this step
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            consumed += 1
            n = sums.new_tensor(len(batch))
            seen = torch.stack([loss.detach().double() * n, n, n])
            sums += seen
            window += seen
            bar.update()
            if step % cfg.log_every == 0 or i + 1 == steps_per_epoch or step == total_steps:
                now = time.perf_counter()  # rank 0's loss; samples/s of all ranks
                values = {"epoch": epoch + 1, "loss": (window[0] / window[1]).item(), "lr": lr,
                          "samples_per_s": window[1].item() * world / (now - t_log)}  # fmt: skip
                reporters.log_step(step, values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", sps=f"{values['samples_per_s']:.0f}")
                window.zero_()
                t_log = now
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint("last.pt", i + 1)
            if step >= total_steps:
                break
        bar.close()
        seconds = time.perf_counter() - t0
        if world > 1:
            dist.all_reduce(sums)
        skip = 0
        epoch += 1
        metrics = {"epoch": epoch, "step": step, "train_loss": sums[0].item() / max(1.0, sums[1].item()),
                   "train_samples": int(sums[1].item()), "lr": scheduler.get_last_lr()[0],
                   "samples_per_s": round(sums[2].item() / seconds, 1)}  # fmt: skip
        if val_loader is not None:
            metrics.update(evaluate(ema.module if ema is not None else model, val_loader, device))
        improved = val_loader is not None and metrics["val_top1"] > best  # the same on every rank (reduced)
        best = max(best, metrics.get("val_top1", best))
        if master:  # the epoch's line goes first: a kill before last.pt is written repeats the epoch
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            reporters.log_epoch(step, metrics)
            log.info("epoch %d step %d: train loss %.3f%s", epoch, step, metrics["train_loss"],
                     ", val loss {val_loss:.3f}, top-1 {val_top1:.3f}, top-5 {val_top5:.3f}".format(**metrics)
                     if val_loader is not None else "")  # fmt: skip
        if improved:
            checkpoint("best.pt", 0)
        checkpoint("last.pt", 0)
    if master:
        reporters.close()
        plot_curves(out)
    return TrainResult(metrics, model, consumed)


def split_folds(manifest: dict[str, Any], val_folds: list[int], shards: str) -> tuple[list[int], list[int]]:
    """(training folds, validation folds), refusing folds the manifest lacks and a split that leaves none to train."""
    known = [f["fold"] for f in manifest["folds"]]
    if unknown := sorted(set(val_folds) - set(known)):
        raise ValueError(f"--val-folds {','.join(map(str, unknown))}: not in the manifest of {shards}, "
                         f"which has folds {','.join(map(str, known))}")  # fmt: skip
    train_folds, val = train_val_folds(manifest, val_folds)
    if not train_folds:
        raise ValueError(f"--val-folds {','.join(map(str, val))} leaves no fold of {shards} to train on "
                         f"(it has folds {','.join(map(str, known))})")  # fmt: skip
    return train_folds, val


def fold_samples(manifest: dict[str, Any], folds: list[int]) -> int:
    """Samples in the given folds, by the manifest."""
    return sum(f["samples"] for f in manifest["folds"] if f["fold"] in folds)


def keep_metrics(path: Path, epochs: int) -> None:
    """Keep the metrics of the first `epochs` epochs only (none for a new run), rewritten atomically."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if _epoch_of(line) is not None]
    kept = "".join(line + "\n" for line in rows if _epoch_of(line) <= epochs)
    write_atomic(path, kept.encode())


def _epoch_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The epochs' rows of run/metrics.jsonl, in order (none when it does not exist yet)."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if _epoch_of(line) is not None]


def best_epoch(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row of the first epoch with the highest validation top-1: the epoch best.pt holds (None: no validation)."""
    return max((r for r in rows if "val_top1" in r), key=lambda r: r["val_top1"], default=None)


def plot_curves(run: Path) -> Path | None:
    """Write run/curves.png from metrics.jsonl when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(run)
    if not rows:
        return None
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    folds = ",".join(map(str, cfg.get("val_folds", []))) or "none"
    fig = curves_figure(rows, f"{run.resolve().name}  (preset {cfg.get('preset', '?')}, val folds {folds})")
    tmp = run / "curves.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, run / "curves.png")
    return run / "curves.png"


def curves_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """Loss and validation accuracy against whole epochs, the best epoch marked (a matplotlib Figure)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    best = best_epoch(rows)
    fig, axes = plt.subplots(1, 2 if best else 1, figsize=(11 if best else 6, 4.5), squeeze=False)
    loss = axes[0][0]
    epochs = [r["epoch"] for r in rows]
    loss.plot(epochs, [r["train_loss"] for r in rows], marker=".", label="train")
    loss.set_ylabel("loss")
    if best:
        acc = axes[0][1]
        loss.plot(epochs, [r["val_loss"] for r in rows], marker=".", label="validation")
        acc.plot(epochs, [r["val_top1"] for r in rows], marker=".", label="top-1")
        acc.plot(epochs, [r["val_top5"] for r in rows], marker=".", label="top-5")
        acc.plot([best["epoch"]], [best["val_top1"]], "r*", markersize=14,
                 label=f"best: epoch {best['epoch']}, top-1 {best['val_top1']:.4f}")  # fmt: skip
        acc.set_ylabel("validation accuracy")
        for ax in axes[0]:
            ax.axvline(best["epoch"], color="red", linestyle=":", linewidth=1)
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.suptitle(title if best else f"{title}: no validation, the result is last.pt")
    fig.tight_layout()
    return fig
