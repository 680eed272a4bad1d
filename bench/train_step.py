"""Training throughput with length bucketing against fixed 384-frame batches, in one run.

    python bench/train_step.py [--shards DIR] [--preset small] [--steps 30] [--batch-size 64]

For each mode it runs the real training step (augment on the device, forward, backward,
AdamW) over batches from the real loader and prints samples/s, the ratio against fixed 384,
and the fraction of step time spent waiting for data. On a GPU it also runs bf16 autocast,
compiled and not.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ensure_demo

from pipeline.build import BuildOptions, build_shards
from pipeline.shards import read_manifest
from train.augment import AugmentConfig, augment_batch
from train.data import make_loader
from train.distributed import autocast
from train.model import SignModel, model_config


def measure(shards: Path, args: argparse.Namespace, device: torch.device, bucket: bool, compile_: bool) -> dict:
    manifest = read_manifest(shards)
    loader = make_loader(
        shards,
        [f["fold"] for f in manifest["folds"]],
        args.batch_size,
        train=True,
        workers=args.workers,
        bucket=bucket,
        pin_memory=device.type == "cuda",
    )
    model = SignModel(model_config(args.preset, len(manifest["label_map"]))).to(device)
    net = torch.compile(model, dynamic=True) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(0)
    aug = AugmentConfig()
    samples = steps = 0
    wait = total = 0.0
    it = iter(loader)
    while steps < args.warmup + args.steps:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t1 = time.perf_counter()
        batch = augment_batch(batch.to(device, non_blocking=device.type == "cuda"), aug, gen)
        with autocast(device):
            loss = F.cross_entropy(net(batch.x, batch.mask).float(), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        steps += 1
        if steps > args.warmup:  # the first steps pay for worker start-up and compilation
            samples += len(batch)
            wait += t1 - t0
            total += t2 - t0
    return {"samples/s": samples / total, "data wait": wait / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, default=None, help="shard directory (default: build from demo data)")
    ap.add_argument("--sequences", type=int, default=2000)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    shards = args.shards
    if shards is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
        ensure_demo(tmp / "data", args.sequences)
        shards = tmp / "shards"
        build_shards(tmp / "data", shards, BuildOptions(), jobs=2)

    runs = [("cpu", torch.device("cpu"), False)]
    if torch.cuda.is_available():
        runs += [("cuda bf16", torch.device("cuda"), False), ("cuda bf16 compiled", torch.device("cuda"), True)]
    print(
        f"preset {args.preset}, batch {args.batch_size}, {args.steps} steps after {args.warmup} warm-up, "
        f"{args.workers} workers"
    )
    print(f"{'device':<20} {'batches':<10} {'samples/s':>10} {'vs fixed 384':>13} {'data wait':>10}")
    for name, device, compile_ in runs:
        fixed = measure(shards, args, device, bucket=False, compile_=compile_)
        bucketed = measure(shards, args, device, bucket=True, compile_=compile_)
        for mode, r in (("fixed 384", fixed), ("bucketed", bucketed)):
            ratio = r["samples/s"] / fixed["samples/s"]
            print(f"{name:<20} {mode:<10} {r['samples/s']:>10.0f} {ratio:>12.2f}x {r['data wait']:>9.1%}")


if __name__ == "__main__":
    main()
