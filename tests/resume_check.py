"""Run by the tests, alone or under torchrun: train or resume a run, recording the sample ids each step trained.

    python resume_check.py RECORD CONFIG_JSON [RESUME_DIR]

Appends one JSON line per step to RECORD.rank{r}.jsonl: {"epoch", "step", "ids"} (the step after it was taken),
so a test can count how often every sample of an epoch was trained across an interrupted run and its resume.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from train import loop
from train.config import TrainConfig


def main(record: str, config: str, resume: str | None = None) -> None:
    cfg = TrainConfig(**json.loads(config))
    step = loop._step

    def recorded(run: loop.Run, batch: loop.Batch):  # noqa: ANN202 - the patched function's own result
        result = step(run, batch)
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(f"{record}.rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": run.epoch, "step": run.step, "ids": batch.ids.tolist()}) + "\n")
        return result

    loop._step = recorded
    loop.train(cfg, resume=Path(resume) if resume else None)


if __name__ == "__main__":
    main(*sys.argv[1:])
