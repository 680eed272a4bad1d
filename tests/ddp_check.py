"""Run by the tests under torchrun: train a few steps with DDP, then compare ranks.

    python ddp_check.py SHARDS OUT [REPORTS]

Writes REPORTS/ddp_rank{r}.json (REPORTS defaults to OUT) with the batches this rank consumed,
the epoch's batch count and a checksum of its weights, so the test can check equal batch counts
and identical weights. SHARDS may be any shard location (a directory, an http URL...).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from train.config import TrainConfig
from train.loop import train


def main(shards: str, out: str, reports: str | None = None) -> None:
    reports = reports or out
    cfg = TrainConfig(shards=shards, out=out, preset="tiny", epochs=1, batch_size=16, workers=0, device="cpu")
    result = train(cfg)
    flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    rank = dist.get_rank()
    report = {
        "rank": rank,
        "world": dist.get_world_size(),
        "batches": result.batches,
        "step": result.metrics["step"],
        "val_samples": result.metrics["val_samples"],
        "out": out,
        "sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
    }
    Path(reports, f"ddp_rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    if rank == 0:  # the checkpoint holds each rank's own RNG states, for an exact resume of every rank
        states = torch.load(Path(out) / "last.pt", weights_only=True)["rng"]
        same = [torch.equal(states[0][k], states[1][k]) for k in ("torch", "augment")]
        Path(out, "ddp_rng.json").write_text(json.dumps({"ranks": len(states), "augment_equal": same[1]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
