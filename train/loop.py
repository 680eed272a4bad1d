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

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    shards: str = "shards"
    out: str = "runs/default"
    val_folds: list[int] = field(default_factory=lambda: [0])
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
    shard_check: str = "sha256"  # what every shard read is checked against: its manifest "sha256" (and size), or "size"
    io_timeout: float = STALL_S  # seconds without a byte before a remote shard read is abandoned
    io_retries: int = RETRIES  # further attempts at a remote shard read that failed

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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
    """Train (or continue) a run to its last step."""
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(Path(resume) / "last.pt")
        if absent := [k for k in RESUME_KEYS if k not in ckpt]:
            raise CheckpointError(Path(resume) / "last.pt", f"cannot resume without {', '.join(absent)}")
        cfg = TrainConfig.from_dict({**ckpt["config"], "out": str(resume)})
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
        train_folds, val_folds = train_val_folds(manifest, cfg.val_folds)
        loader_args = dict(workers=cfg.workers, rank=rank, world_size=world, seed=cfg.seed, bucket=cfg.bucket,
                           pin_memory=cuda, manifest=manifest, check=cfg.shard_check, stall_s=cfg.io_timeout,
                           retries=cfg.io_retries)  # fmt: skip
        train_loader = make_loader(cfg.shards, train_folds, cfg.batch_size, train=True, **loader_args)
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

    # model, optimizer, schedule, EMA, augmentation
    model = build_model(cfg, len(label_map)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema)
    ) if cfg.ema else None  # fmt: skip
    aug_cfg = AugmentConfig(**cfg.augment_options)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed * 1000 + rank)  # every rank draws its own augmentations
    step, epoch, skip, best = 0, 0, 0, -1.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema"])
            ema.n_averaged.fill_(ckpt["ema_n_averaged"])
        step, epoch, skip, best = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["best_top1"]
        restore_rng(ckpt["rng"], rank, world, generator, device)
    ids = [device.index] if cuda else None
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids) if world > 1 else model
    if cfg.compile:
        net = torch.compile(net, dynamic=True)

    if ckpt is None and (out / "last.pt").exists():  # checked on every rank, so none waits for a failed one
        raise FileExistsError(f"{out} already holds a run; continue it with --resume {out}, or pick another --out")
    if master:
        out.mkdir(parents=True, exist_ok=True)
        keep_metrics(out / "metrics.jsonl", epoch)  # drop epochs logged after the checkpoint we resume from
        write_json_atomic(out / "config.json", asdict(cfg))
        log.info("model %s: %d parameters; %d steps/epoch, %d steps; train folds %s, val folds %s, device %s x%d",
                 cfg.preset, count_parameters(model), steps_per_epoch, total_steps, train_folds, val_folds,
                 device, world)  # fmt: skip

    def checkpoint(name: str, batch_in_epoch: int) -> None:  # called on every rank: it gathers their RNG states
        rng = gathered_rng(generator, device, world)
        if not master:
            return
        save_checkpoint(out / name, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "ema_n_averaged": int(ema.n_averaged) if ema is not None else 0,
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best_top1": best, "rng": rng,
            "config": asdict(cfg), "label_map": label_map, "shards_fingerprint": manifest["fingerprint"],
        })  # fmt: skip

    metrics: dict[str, Any] = {}
    consumed = 0
    while step < total_steps:
        train_loader.dataset.set_epoch(epoch)
        net.train()
        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch}", disable=not master or None,
                   dynamic_ncols=True, leave=False)  # fmt: skip
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * samples, samples: one sync per log
        t0 = time.perf_counter()
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
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            consumed += 1
            sums += torch.stack([loss.detach().double() * len(batch), sums.new_tensor(len(batch))])
            bar.update()
            if step % 10 == 0 or step == total_steps:
                rate = sums[1].item() * world / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", sps=f"{rate:.0f}")
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
                   "lr": scheduler.get_last_lr()[0], "samples_per_s": round(sums[1].item() / seconds, 1),
                   **evaluate(ema.module if ema is not None else model, val_loader, device)}  # fmt: skip
        improved = metrics["val_top1"] > best  # the same on every rank: the metrics are reduced
        best = max(best, metrics["val_top1"])
        if master:  # the epoch's line goes first: a kill before last.pt is written repeats the epoch
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            log.info("epoch %d step %d: train loss %.3f, val loss %.3f, top-1 %.3f, top-5 %.3f", epoch, step,
                     metrics["train_loss"], metrics["val_loss"], metrics["val_top1"], metrics["val_top5"])  # fmt: skip
        if improved:
            checkpoint("best.pt", 0)
        checkpoint("last.pt", 0)
    if master:
        plot_curves(out)
    return TrainResult(metrics, model, consumed)


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


def plot_curves(run: Path) -> Path | None:
    """Write run/curves.png from metrics.jsonl when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if _epoch_of(line) is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in rows]
    a.plot(epochs, [r["train_loss"] for r in rows], label="train")
    a.plot(epochs, [r["val_loss"] for r in rows], label="val")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.plot(epochs, [r["val_top1"] for r in rows], label="top-1")
    b.plot(epochs, [r["val_top5"] for r in rows], label="top-5")
    b.set_xlabel("epoch"), b.set_ylabel("validation accuracy"), b.legend()
    fig.tight_layout()
    tmp = run / "curves.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, run / "curves.png")
    return run / "curves.png"
