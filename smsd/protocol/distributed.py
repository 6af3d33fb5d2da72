"""Data-parallel training across processes (``torchrun``): process group, ranks, batch split.

The server samples every global batch (image order and views) from one generator seeded
alike on every rank; each rank then trains on its contiguous block of rows. A run on
``W`` ranks is therefore the single-process run with the same global batch, split in ``W``:
DDP averages the gradients (each rank's loss is a mean over its rows) and
:class:`smsd.nn.DINOLoss` all-reduces the center's batch mean.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Ranks", "barrier", "current_ranks", "mean_across_ranks", "process_group_from_env",
           "rank_device"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job (``rank 0 of 1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and the body; the others only train."""
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's block of a global batch of ``batch`` rows."""
        if batch % self.world_size:
            raise ValueError(f"batch size {batch} is not divisible by the world size "
                             f"{self.world_size}; pick a multiple of it")
        local = batch // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)


def current_ranks() -> Ranks:
    """The ranks of the initialized process group (or a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Ranks(dist.get_rank(), dist.get_world_size(), local)


def rank_device(device: str, ranks: Ranks) -> torch.device:
    """``cuda`` without an index means this rank's GPU (``LOCAL_RANK``) when distributed."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and ranks.distributed:
        dev = torch.device("cuda", ranks.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over all ranks (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def process_group_from_env(device: str) -> Iterator[Ranks]:
    """Join the job ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``...), with NCCL for CUDA devices and gloo otherwise; leave it on exit.
    Without ``WORLD_SIZE`` > 1 (a plain run) nothing is initialized."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield current_ranks()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "gloo"
    if torch.device(device).type == "cuda":
        backend = "nccl"
        # Bind the GPU before NCCL starts, so no collective lands on cuda:0 by default.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://")
    try:
        yield current_ranks()
        # On a normal exit every rank waits for the others before tearing its
        # connections down, so none closes them while a peer is in its last collective.
        dist.barrier()
    finally:
        dist.destroy_process_group()
