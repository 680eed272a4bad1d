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


def first_error(error: str | None, world: int) -> str | None:
    """The message of the lowest failing rank, on every rank, or None. A collective when `world > 1`.

    It runs on a gloo group of CPU tensors, so that under NCCL the per-step check never waits
    for the GPU (a CUDA flag read back with `.item()` would sync the device every step).
    """
    if world == 1:
        return error
    group = _cpu_group()
    failed = torch.tensor([error is not None], dtype=torch.int32)
    dist.all_reduce(failed, group=group)
    if not failed.item():
        return None
    messages: list[Any] = [None] * world
    dist.all_gather_object(messages, error, group=group)
    rank = next(r for r, m in enumerate(messages) if m is not None)
    return f"rank {rank}: {messages[rank]}"


_CPU_GROUPS: dict[int, Any] = {}


def _cpu_group() -> Any:
    """The default group when it is gloo, else a gloo group of every rank (made once per process group)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _CPU_GROUPS:  # every rank reaches the first agreement at the same point: a collective call
        _CPU_GROUPS[key] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[key]


def agreed_batches(loader: Iterable[Batch | DataError], steps: int, world: int) -> Iterator[Batch]:
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
        error = first_error(error, world)
        if error is not None:
            raise ShardError(error)
        yield item
