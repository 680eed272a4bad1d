"""Processes and devices: the process group, the device, every rank's RNG states, and agreement on errors.

Agreement between ranks: a failure on one rank stops every rank, with the same message. Without it,
a rank whose shard is short or corrupt raises while the others wait in the next gradient all-reduce
until the process group times out (30 minutes by default), or die in a gloo/NCCL abort that names
no shard. Every rank calls the same collectives in the same order
(one small all-reduce per step), so the failing rank's message reaches all of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import AslError
from pipeline.shards import ShardError
from train.batch import Batch
from train.config import ConfigError
from train.data import DataError, checked


class DeviceError(AslError, RuntimeError):
    """A device that was asked for and is not there."""


def resolve_device(name: str) -> torch.device:
    """The device `name` (auto: CUDA when available, else the CPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda requested but CUDA is not available")
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


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def restore_rng(
    states: list[dict[str, torch.Tensor]], rank: int, world: int, generator: torch.Generator, device: torch.device
) -> None:
    """Give this rank its RNG states of `gathered_rng` back."""
    if len(states) != world:
        # another world size also changes the batches per epoch, so the saved position would be wrong
        raise ConfigError(f"the checkpoint was written by {len(states)} rank(s); resume with that many processes")
    state = states[rank]
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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
