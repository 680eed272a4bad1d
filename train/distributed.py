"""Agreement between ranks on data errors: a failure on one rank stops every rank, with the same message.

Without it, a rank whose shard is short or corrupt raises while the others wait in the next
gradient all-reduce until the process group times out (30 minutes by default), or die in a
gloo/NCCL abort that names no shard. Every rank calls the same collectives in the same order
(one small all-reduce per step), so the failing rank's message reaches all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from pipeline.shards import ShardError
from train.batch import Batch
from train.data import DataError, checked


def first_error(error: str | None, device: torch.device, world: int) -> str | None:
    """The message of the lowest failing rank, on every rank, or None. A collective when `world > 1`."""
    if world == 1:
        return error
    failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
    dist.all_reduce(failed)
    if not failed.item():
        return None
    messages: list[Any] = [None] * world
    dist.all_gather_object(messages, error)
    rank = next(r for r, m in enumerate(messages) if m is not None)
    return f"rank {rank}: {messages[rank]}"


def agreed_batches(loader: Iterable[Batch | DataError], steps: int, device: torch.device,
                   world: int) -> Iterator[Batch]:  # fmt: skip
    """Exactly `steps` batches of the loader on every rank, or a ShardError raised on every rank.

    A `DataError`, any exception of the loader (a worker killed, say) and a loader that ends
    early all count as failures; with one process, the loader's own exceptions pass unchanged.
    """
    if world == 1:
        batches = checked(loader)
        for i in range(steps):
            batch = next(batches, None)
            if batch is None:
                raise ShardError(f"the loader ended after {i} of {steps} batches (fewer samples than the manifest)")
            yield batch
        return
    it = iter(loader)
    for i in range(steps):
        item, error = None, None
        try:
            item = next(it)
            error = item.message if isinstance(item, DataError) else None
        except StopIteration:
            error = f"the loader ended after {i} of {steps} batches (fewer samples than the manifest)"
        except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, or they hang
            error = f"{type(exc).__name__}: {exc}"
        error = first_error(error, device, world)
        if error is not None:
            raise ShardError(error)
        yield item
