"""The training loop; DDP aware (launch with torchrun).

Reads top to bottom like nanoGPT's train.py: data -> model -> optimizer -> loop. Only rank 0
writes files. Checkpoints hold everything needed to continue the same schedule, including the
position inside the epoch, so a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.cache import cache_view
from pipeline.errors import AslError
from pipeline.shards import ShardError, read_manifest
from pipeline.text import printable
from train.augment import AugmentConfig, augment_batch
from train.batch import Batch
from train.checkpoint import (
    ResumeError,
    build_model,
    check_optimizer_fit,
    check_resume_fit,
    load_initial_weights,
    restored,
    resume_checkpoint,
    save_checkpoint,
)
from train.config import ConfigError, TrainConfig
from train.data import ShardStream, make_loader, train_val_folds
from train.distributed import agreed_batches, autocast, first_error, gathered_rng, restore_rng, setup_distributed
from train.model import SignModel, count_parameters, late_dropout_rate
from train.optim import AWP, make_optimizer
from train.report import Reporters, check_backends, open_reporters
from train.resplit import pack_trained, unpack_trained
from train.runfiles import RunDirError, append_metrics, check_new_run, open_run_dir, plot_curves, run_lock
from train.scoring import predict_batches

log = logging.getLogger(__name__)


class DivergedError(AslError, FloatingPointError):
    """Training met a loss that is not finite: it stops before any checkpoint holds the weights that made it."""


@dataclass
class TrainResult:
    metrics: dict[str, Any]  # the last validation metrics (empty when no epoch ended in this run)
    model: torch.nn.Module  # the trained (unwrapped) model
    batches: int  # training batches this rank consumed in this run


@dataclass
class Data:
    manifest: dict[str, Any]
    digest: str  # `manifest_digest`
    train_folds: list[int]
    val_folds: list[int]
    train_loader: Any
    val_loader: Any | None  # None: --val-folds none, no validation


@dataclass
class Run:
    """One process's share of a run: how it was set up, and what each step changes (what a checkpoint holds)."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    label_map: dict[str, int]
    fingerprint: str
    steps_per_epoch: int
    total_steps: int
    model: SignModel
    net: torch.nn.Module  # what a step calls: the model, wrapped by DDP and torch.compile when asked
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: torch.optim.swa_utils.AveragedModel | None
    aug_cfg: AugmentConfig
    generator: torch.Generator
    sums: torch.Tensor  # the epoch's loss * samples and samples (over a resume too), and samples since start
    step: int = 0
    epoch: int = 0  # epochs finished
    skip: int = 0  # batches of the current epoch trained before the checkpoint this process resumed from
    best: float = -1.0  # best validation top-1 so far
    consumed: int = 0  # batches this process trained
    reporters: Reporters = field(default_factory=lambda: Reporters([]))
    awp: AWP | None = None  # --awp: the adversarial step on the weights, from its start epoch
    trained: np.ndarray | None = None  # uint8 per training sample id: 1 once this rank trained it this epoch
    resplit_epoch: int | None = None  # the epoch resumed under another split (`_resplit`)
    manifest_sha256: str = ""  # `manifest_digest` of the shards it trains on

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def scored_model(self) -> torch.nn.Module:
        """The weights validation scores and evaluate reads: the EMA ones when EMA is on."""
        return self.ema.module if self.ema is not None else self.model


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------- training


def train(cfg: TrainConfig, resume: str | Path | None = None) -> TrainResult:
    """Train a new run, or with `resume` continue the run in that directory to its (possibly later) last step.

    A resumed run's `cfg` is its stored one, changed in resumable options only (`checkpoint.check_resumable`).
    A larger `epochs` extends a run: from its current step on, the learning rate follows the
    schedule of a run planned for the new length (warmup and cosine over all its steps).
    """
    cfg.check()
    check_backends(cfg.report_to)  # on every rank, before any collective
    device, rank, world = setup_distributed(cfg.device)
    with contextlib.ExitStack() as held:
        error = None
        if rank == 0:  # one lock per run directory; the other ranks learn whether rank 0 got it
            try:
                held.enter_context(run_lock(Path(cfg.out)))
            except RunDirError as exc:
                error = str(exc)
        if (error := first_error(error, world)) is not None:
            raise RunDirError(error)
        return _train_locked(cfg, resume, device, rank, world)


def _train_locked(
    cfg: TrainConfig, resume: str | Path | None, device: torch.device, rank: int, world: int
) -> TrainResult:
    """`train`, once the run directory is this run's alone."""
    ckpt = resume_checkpoint(resume, cfg) if resume is not None else None
    torch.manual_seed(cfg.seed)
    data = open_data(cfg, ckpt, resume, device, rank, world)
    run = start_run(cfg, data, ckpt, resume, device, rank, world)
    open_run_files(run, data, resumed=ckpt is not None)

    metrics: dict[str, Any] = {}
    while run.step < run.total_steps:
        metrics = _run_epoch(run, data.train_loader)
        if data.val_loader is not None:
            metrics.update(validate(run.scored_model, data.val_loader, device))
        improved = data.val_loader is not None and metrics["val_top1"] > run.best  # the same on every rank
        run.best = max(run.best, metrics.get("val_top1", run.best))
        # the epoch's line goes first: a kill before last.pt is written repeats the epoch
        _agree(run, log=lambda metrics=metrics: _log_epoch(run, metrics))
        if improved:
            _save(run, "best.pt", run.skip)
        _save(run, "last.pt", run.skip)  # mid-epoch when --max-steps cut the epoch: a resume finishes it
    if run.master:
        run.reporters.close()
        plot_curves(run.out)
    return TrainResult(metrics, run.model, run.consumed)


def open_data(
    cfg: TrainConfig,
    ckpt: dict[str, Any] | None,
    resume: str | Path | None,
    device: torch.device,
    rank: int,
    world: int,
) -> Data:
    """The manifest and loaders; every rank sees the same number of batches per epoch.

    A rank that cannot open the shards stops every rank (one collective), instead of leaving them
    waiting in the first all-reduce.
    """
    error = None
    try:
        manifest = read_manifest(cfg.shards, cfg.read_policy())
        digest = manifest_digest(manifest)
        if ckpt is not None and (
            ckpt.get("shards_fingerprint") != manifest["fingerprint"]
            or ckpt.get("manifest_sha256", digest) != digest  # older checkpoints have no digest
        ):
            raise ShardError(f"{cfg.shards} is not the shard set {resume} was trained on (its manifest differs)")
        train_folds, val_folds = split_folds(manifest, cfg.val_folds, cfg.shards)
        loader_args = dict(
            workers=cfg.workers,
            rank=rank,
            world_size=world,
            seed=cfg.seed,
            bucket=cfg.bucket,
            pin_memory=device.type == "cuda",
            manifest=manifest,
            check=cfg.shard_check,
            policy=cfg.read_policy(),
            cache=cache_view(cfg.cache_dir, cfg.cache_limit, cfg.shards, manifest, outputs=[cfg.out]),
        )
        train_loader = make_loader(cfg.shards, train_folds, cfg.batch_size, train=True, **loader_args)
        val_loader = None
        if val_folds:
            val_loader = make_loader(cfg.shards, val_folds, cfg.batch_size, train=False, **loader_args)
    except (AslError, OSError) as exc:
        error = str(exc)
    if (error := first_error(error, world)) is not None:
        raise ShardError(error)
    return Data(manifest, digest, train_folds, val_folds, train_loader, val_loader)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The SHA-256 of a manifest's content: a manifest edited in place keeps the build's fingerprint, not this."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def start_run(
    cfg: TrainConfig,
    data: Data,
    ckpt: dict[str, Any] | None,
    resume: str | Path | None,
    device: torch.device,
    rank: int,
    world: int,
) -> Run:
    """Model, optimizer, schedule, EMA and augmentation: new, or as the checkpoint `ckpt` left them."""
    steps_per_epoch = len(data.train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    if ckpt is not None and ckpt["step"] >= total_steps:
        option, value = ("--max-steps", cfg.max_steps) if total_steps == cfg.max_steps else ("--epochs", cfg.epochs)
        raise ConfigError(
            f"{resume} has finished: it trained {ckpt['step']} steps ({ckpt['epoch']} epochs), and "
            f"{option} {value} asks for {total_steps}; resume it with a larger {option} to go on"
        )
    planned = cfg.epochs * steps_per_epoch  # the schedule's length: --max-steps stops a run early, never re-plans it
    warmup = max(1, int(cfg.warmup * planned))
    cuda = device.type == "cuda"
    label_map = data.manifest["label_map"]
    model = build_model(cfg, len(label_map))
    check_max_len(model.cfg.max_len, data, cfg.shards)
    model = model.to(device)
    if cfg.init_from and ckpt is None:  # a resumed run has its own weights
        load_initial_weights(model, cfg.init_from, label_map, cfg.new_head)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, fused=cuda or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, planned, warmup))
    ema = (
        torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema))
        if cfg.ema
        else None
    )
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed * 1000 + rank)  # every rank draws its own augmentations
    run = Run(
        cfg,
        device,
        rank,
        world,
        label_map,
        data.manifest["fingerprint"],
        steps_per_epoch,
        total_steps,
        model,
        model,
        optimizer,
        scheduler,
        ema,
        augment_config(cfg.augment_options, model.cfg.max_len),
        generator,
        sums=torch.zeros(3, dtype=torch.float64, device=device),
    )
    run.awp = AWP(model, cfg.awp, cfg.awp_from) if cfg.awp > 0 else None
    run.trained = np.zeros(data.train_loader.dataset.total, dtype=np.uint8)
    run.manifest_sha256 = data.digest
    if ckpt is not None:
        _restore(run, ckpt, warmup, data.train_loader.dataset, Path(resume) / "last.pt")
    if world > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if cfg.compile:
        run.net = torch.compile(run.net, dynamic=True)
    return run


def check_max_len(max_len: int, data: Data, shards: str) -> None:
    """Refuse a model whose max_len is below the longest sequence of the folds it trains and validates on."""
    folds = {*data.train_folds, *data.val_folds}
    entries = [e for e in data.manifest["shards"] if e["fold"] in folds]
    longest = max((max(e["lengths"], default=0) for e in entries), default=0)
    if longest > max_len:
        raise ConfigError(
            f"{printable(shards)} holds sequences of up to {longest} frames, more than the model's max_len {max_len} "
            f"(model.max_len in the config); set it to {longest} or more"
        )


def augment_config(options: dict[str, Any], max_len: int) -> AugmentConfig:
    """The augmentation of `options`, never resampling a sequence past the model's `max_len`."""
    aug = AugmentConfig(**options)
    return replace(aug, max_len=max_len) if aug.max_len > max_len else aug


def _restore(run: Run, ckpt: dict[str, Any], warmup: int, stream: ShardStream, path: Path) -> None:
    """Continue from a checkpoint (`path`): weights, optimizer, schedule, EMA, position, every rank's RNG states
    (or, under another split of the epoch, new ones: `_resplit`); a part that does not fit is one line."""
    restored(path, "model", run.model.load_state_dict, ckpt["model"])
    restored(path, "optimizer", run.optimizer.load_state_dict, ckpt["optimizer"])
    check_optimizer_fit(path, run.optimizer)
    restored(path, "scheduler", run.scheduler.load_state_dict, ckpt["scheduler"])
    lrs = run.scheduler.base_lrs
    if len(lrs) != len(run.optimizer.param_groups) or not all(isinstance(x, float) and math.isfinite(x) for x in lrs):
        raise ResumeError(path, "scheduler", f"base_lrs {printable(repr(lrs), 80)} do not fit this run's optimizer")
    if run.ema is not None:
        restored(path, "ema", run.ema.module.load_state_dict, ckpt["ema"])
        run.ema.n_averaged.fill_(ckpt["ema_n_averaged"])
    run.step, run.epoch, run.skip, run.best = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["best_top1"]
    try:
        resplit = _resplit(run, ckpt, stream)
    except ValueError as exc:  # a trained-sample record of another size
        raise ResumeError(path, "epoch_trained", str(exc)) from None
    same_split = ckpt.get("world", run.world) == run.world and ckpt.get("workers", run.cfg.workers) == run.cfg.workers
    check_resume_fit(path, ckpt, run.steps_per_epoch, resplit, same_split)
    if not resplit:
        restored(path, "rng", lambda rng: restore_rng(rng, run.rank, run.world, run.generator, run.device), ckpt["rng"])
    if run.master and "epoch_sums" in ckpt:  # summed over every rank: one rank carries them, the reduction adds
        run.sums[:2] = torch.tensor(ckpt["epoch_sums"], dtype=torch.float64)
    for group, base_lr in zip(run.optimizer.param_groups, run.scheduler.base_lrs, strict=True):
        # the next step's rate, stretched or not
        group["lr"] = base_lr * lr_factor(run.step, run.cfg.epochs * run.steps_per_epoch, warmup)


def _resplit(run: Run, ckpt: dict[str, Any], stream: ShardStream) -> bool:
    """Whether the checkpoint's epoch goes on under another split: it was cut mid-epoch by another number of ranks
    or workers (or was itself such an epoch). Its untrained samples are then split afresh (`train.resplit`), the
    step is where that many batches remain, and each rank's RNGs are seeded anew; otherwise the same split
    resumes bit-identically, skipping the batches already trained."""
    packed = ckpt.get("epoch_trained")
    if run.skip and packed is not None:
        run.trained[:] = unpack_trained(packed.numpy(), stream.total)
    same = ckpt.get("world", run.world) == run.world and ckpt.get("workers", run.cfg.workers) == run.cfg.workers
    if not run.skip or packed is None or (same and not ckpt.get("resplit")):
        return False
    stream.resume_epoch(run.epoch, run.trained.astype(bool))
    stream.set_epoch(run.epoch)
    rest = len(stream)
    run.skip = run.steps_per_epoch - rest  # batches of the epoch in this split that the trained samples stand for
    run.step = run.epoch * run.steps_per_epoch + run.skip
    run.scheduler.last_epoch = run.step
    run.resplit_epoch = run.epoch
    seed = run.cfg.seed * 1000 + run.rank + 1_000_003 * (run.step + 1)
    torch.manual_seed(seed)
    run.generator.manual_seed(seed)
    if run.master:
        log.info(
            "resuming epoch %d under %d rank(s) x %d worker(s) (written by %s x %s): %d of its samples left, "
            "%d batches per rank from step %d",
            run.epoch + 1,
            run.world,
            run.cfg.workers,
            ckpt.get("world"),
            ckpt.get("workers"),
            int((run.trained == 0).sum()),
            rest,
            run.step,
        )
    return True


def open_run_files(run: Run, data: Data, resumed: bool) -> None:
    """The run directory with config.json and the logging backends (rank 0); a failure stops every rank."""
    if not resumed:  # checked on every rank, so none waits for a failed one
        check_new_run(run.out)
    error = None
    if run.master:
        try:  # a failure here (read-only or full --out) must stop the other ranks too, not leave them waiting
            open_run_dir(run.out, asdict(run.cfg), run.epoch)  # drops epochs logged after the checkpoint
            run.reporters = open_reporters(run.cfg.report_to, run.out, run.step, run.epoch)
        except OSError as exc:
            error = f"{run.out}: cannot write the run directory ({exc.strerror or exc})"
    if (error := first_error(error, run.world)) is not None:
        raise RunDirError(error)
    if run.master:
        manifest, cfg = data.manifest, run.cfg
        log.info(
            "model %s: %d parameters; %d steps/epoch, %d steps; train folds %s (%d samples), val folds %s, "
            "device %s x%d",
            cfg.preset,
            count_parameters(run.model),
            run.steps_per_epoch,
            run.total_steps,
            data.train_folds,
            fold_samples(manifest, data.train_folds),
            data.val_folds or "none (no validation: the result is last.pt)",
            run.device,
            run.world,
        )


def _run_epoch(run: Run, loader: Any) -> dict[str, Any]:
    """Train the rest of the current epoch (or up to the last step); the epoch's training metrics."""
    cfg = run.cfg
    loader.dataset.set_epoch(run.epoch)
    if cfg.late_dropout is not None:  # set from the epoch alone: a resumed run sets the same rate
        run.model.set_late_dropout(late_dropout_rate(run.epoch, cfg.late_dropout, cfg.late_dropout_from))
    run.net.train()
    epochs = math.ceil(run.total_steps / run.steps_per_epoch)
    bar = tqdm(
        total=run.steps_per_epoch,
        initial=run.skip,
        desc=f"epoch {run.epoch + 1}/{epochs}",
        disable=not run.master or None,
        dynamic_ncols=True,
        leave=False,
    )
    window = torch.zeros_like(run.sums)  # the same sums since the last per-step log: one sync per log
    # the first step whose loss was not finite (-1: none), kept on the device and read where ranks agree anyway
    bad = torch.full((), -1, dtype=torch.int64, device=run.device)
    t0 = t_log = time.perf_counter()
    done = run.skip
    if run.skip == 0 and run.resplit_epoch != run.epoch:
        run.trained[:] = 0  # a new epoch
    batches = len(loader)  # fewer than steps_per_epoch in an epoch resumed under another split: its rest
    for i, batch in enumerate(agreed_batches(loader, batches, run.world), start=run.steps_per_epoch - batches):
        if i < run.skip:  # resuming mid-epoch: the epoch's order is deterministic, so skip what was trained
            continue
        loss, lr, n = _step(run, batch)
        if batch.ids is not None:
            run.trained[batch.ids.numpy()] = 1
        done = i + 1
        bad = torch.where((bad < 0) & ~torch.isfinite(loss), run.step, bad)
        seen = torch.stack([loss.double() * n, n, n])
        run.sums += seen
        window += seen
        bar.update()
        if run.step % cfg.log_every == 0 or i + 1 == run.steps_per_epoch or run.step == run.total_steps:
            now = time.perf_counter()  # rank 0's loss; samples/s of all ranks
            values = {
                "epoch": run.epoch + 1,
                "loss": (window[0] / window[1]).item(),
                "lr": lr,
                "samples_per_s": window[1].item() * run.world / (now - t_log),
            }
            _agree(run, bad, lambda values=values: run.reporters.log_step(run.step, values))
            bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", sps=f"{values['samples_per_s']:.0f}")
            window.zero_()
            t_log = now
        if cfg.save_every and run.step % cfg.save_every == 0:
            _agree(run, bad)
            _save(run, "last.pt", i + 1)
        if run.step >= run.total_steps:
            break
    bar.close()
    _agree(run, bad)
    seconds = time.perf_counter() - t0
    sums = run.sums.clone()
    if run.world > 1:
        dist.all_reduce(sums)
    number = run.epoch + 1
    if done == run.steps_per_epoch:
        run.sums.zero_()  # the next epoch starts from nothing
        run.skip = 0
        run.epoch += 1
    else:  # --max-steps cut the epoch: not finished, so a resume with a larger --max-steps trains the rest of it
        run.skip = done
    return {
        "epoch": number,
        "step": run.step,
        "train_loss": sums[0].item() / max(1.0, sums[1].item()),
        "train_samples": int(sums[1].item()),
        "lr": run.scheduler.get_last_lr()[0],
        "samples_per_s": round(sums[2].item() / seconds, 1),
    }


def _agree(run: Run, bad: torch.Tensor | None = None, log: Callable[[], None] | None = None) -> None:
    """Stop every rank, with one message, when a rank met a non-finite loss (`bad`: its first step, or -1) or
    rank 0 failed to `log` (a full disk, say). A collective: every rank calls it at the same steps."""
    error = None
    if (step := -1 if bad is None else int(bad.item())) >= 0:
        error = (
            f"step {step}: the training loss is not finite; training stopped, and {run.out} keeps the checkpoints "
            "written before it (try a lower --lr or --grad-clip)"
        )
    elif log is not None and run.master:
        try:
            log()
        except OSError as exc:
            error = str(exc)
    if (error := first_error(error, run.world)) is not None:
        raise DivergedError(error) if step >= 0 else RunDirError(error)


def _step(run: Run, batch: Batch) -> tuple[torch.Tensor, float, torch.Tensor]:
    """One optimizer step: (the batch's detached loss, the step's learning rate, its sample count as a tensor)."""
    cfg = run.cfg
    batch = batch.to(run.device, non_blocking=run.device.type == "cuda")  # (B, T, 118, 6)
    if cfg.augment:
        batch = augment_batch(batch, run.aug_cfg, run.generator)

    def batch_loss() -> torch.Tensor:
        with autocast(run.device):
            logits = run.net(batch.x, batch.mask)  # (B, n_classes)
            return F.cross_entropy(logits.float(), batch.labels, label_smoothing=cfg.label_smoothing)

    loss = batch_loss()
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.awp is not None and run.awp.active(run.epoch):  # the step takes the gradients at the perturbed weights
        run.awp.attack_backward(batch_loss)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]  # the rate of this step
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    run.step += 1
    run.consumed += 1
    return loss.detach(), lr, run.sums.new_tensor(len(batch))


def _log_epoch(run: Run, metrics: dict[str, Any]) -> None:
    """The epoch's row in metrics.jsonl and the backends, and its log line."""
    append_metrics(run.out, metrics)
    run.reporters.log_epoch(run.step, metrics)
    validated = (
        ", val loss {val_loss:.3f}, top-1 {val_top1:.3f}, top-5 {val_top5:.3f}".format(**metrics)
        if "val_top1" in metrics
        else ""
    )
    log.info("epoch %d step %d: train loss %.3f%s", metrics["epoch"], run.step, metrics["train_loss"], validated)


def _save(run: Run, name: str, batch_in_epoch: int) -> None:
    """Write `name` in the run directory (rank 0); called on every rank: it gathers their RNG states."""
    rng = gathered_rng(run.generator, run.device, run.world)
    epoch_sums = run.sums[:2].clone() if batch_in_epoch else torch.zeros(2, dtype=torch.float64, device=run.device)
    if batch_in_epoch and run.world > 1:
        dist.all_reduce(epoch_sums)
    trained = _trained(run) if batch_in_epoch else None
    error = None
    if run.master:
        ema = run.ema
        try:
            save_checkpoint(
                run.out / name,
                {
                    "model": run.model.state_dict(),
                    "optimizer": run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(),
                    "ema": ema.module.state_dict() if ema is not None else None,
                    "ema_n_averaged": int(ema.n_averaged) if ema is not None else 0,
                    "step": run.step,
                    "epoch": run.epoch,
                    "batch_in_epoch": batch_in_epoch,
                    "best_top1": run.best,
                    "rng": rng,
                    "epoch_sums": epoch_sums.tolist(),
                    "config": asdict(run.cfg),
                    "label_map": run.label_map,
                    "shards_fingerprint": run.fingerprint,
                    "manifest_sha256": run.manifest_sha256,
                    "epoch_trained": trained,
                    "world": run.world,
                    "workers": run.cfg.workers,
                    "resplit": run.resplit_epoch == run.epoch,
                },
            )
        except OSError as exc:  # a full disk: every rank stops with this message (the last good file stays)
            error = f"{run.out / name}: cannot write the checkpoint ({exc.strerror or exc})"
    if (error := first_error(error, run.world)) is not None:
        raise RunDirError(error)


def _trained(run: Run) -> torch.Tensor:
    """The samples any rank trained in the current epoch, one bit per sample id (`train.resplit.pack_trained`)."""
    mask = torch.from_numpy(run.trained).to(run.device)
    if run.world > 1:
        dist.all_reduce(mask, op=dist.ReduceOp.MAX)
    return torch.from_numpy(pack_trained(mask.cpu().numpy()))


# ---------------------------------------------------------------------------- validation


def validate(model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
    """Validation loss, top-1 and top-5, summed over every rank."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    world = dist.get_world_size() if dist.is_initialized() else 1
    error = None
    try:  # ranks may hold different numbers of validation batches: agree once, at the end
        for batch, logits in predict_batches(model, loader, device):
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hit = top5 == batch.labels[:, None]
            sums += torch.stack(
                [
                    F.cross_entropy(logits, batch.labels, reduction="sum").double(),
                    hit[:, 0].sum().double(),
                    hit.any(dim=1).sum().double(),
                    torch.tensor(len(batch), device=device).double(),
                ]
            )
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, or they hang
        if world == 1:
            raise
        error = str(exc) if isinstance(exc, ShardError) else f"{type(exc).__name__}: {exc}"
    if (error := first_error(error, world)) is not None:
        raise ShardError(error)
    if world > 1:
        dist.all_reduce(sums)
    n = max(1.0, sums[3].item())
    return {
        "val_loss": sums[0].item() / n,
        "val_top1": sums[1].item() / n,
        "val_top5": sums[2].item() / n,
        "val_samples": int(sums[3].item()),
    }


def split_folds(manifest: dict[str, Any], val_folds: list[int], shards: str) -> tuple[list[int], list[int]]:
    """(training folds, validation folds), refusing folds the manifest lacks and a split that leaves none to train."""
    known = [f["fold"] for f in manifest["folds"]]
    if unknown := sorted(set(val_folds) - set(known)):
        raise ConfigError(
            f"--val-folds {','.join(map(str, unknown))}: not in the manifest of {shards}, "
            f"which has folds {','.join(map(str, known))}"
        )
    train_folds, val = train_val_folds(manifest, val_folds)
    if not train_folds:
        raise ConfigError(
            f"--val-folds {','.join(map(str, val))} leaves no fold of {shards} to train on "
            f"(it has folds {','.join(map(str, known))})"
        )
    return train_folds, val


def fold_samples(manifest: dict[str, Any], folds: list[int]) -> int:
    """Samples in the given folds, by the manifest."""
    return sum(f["samples"] for f in manifest["folds"] if f["fold"] in folds)
