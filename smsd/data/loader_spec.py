"""What a loader produces (:class:`LoaderSpec`) and what it yields (:class:`Batch`),
shared by the torch loader (:mod:`.loaders`) and the DALI pipelines (:mod:`.dali`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..checks import positive_int
from .transforms import Augment

__all__ = ["LAST_BATCH", "MODES", "Batch", "LoaderSpec"]

MODES = ("encode", "finetune", "eval")
LAST_BATCH = ("partial", "drop")


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor  # positions in the source, e.g. to look up ids


@dataclass(frozen=True)
class LoaderSpec:
    """What a loader produces. ``encode``/``eval`` modes: deterministic transforms in
    source order; ``finetune``: ``augment`` and a new order every epoch (seeded).
    ``last_batch``: ``"partial"`` keeps a smaller last batch, ``"drop"`` drops it.
    ``device``: ``"cpu"`` (DALI CPU-only, ``device_id=None``) or ``"cuda[:N]"`` (DALI
    decodes with ``mixed``)."""

    img_size: int
    in_chans: int
    mode: str = "eval"
    batch_size: int = 64
    shard_id: int = 0
    num_shards: int = 1
    last_batch: str = "partial"
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    num_threads: int = 2
    seed: int = 0
    crop_ratio: float = 1.0
    augment: Augment = field(default_factory=Augment)

    def __post_init__(self) -> None:
        for name in ("img_size", "batch_size", "num_shards", "num_threads"):
            positive_int(name, getattr(self, name))
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.shard_id, bool) or not isinstance(self.shard_id, int) \
                or not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id must be an int in [0, {self.num_shards}), "
                             f"got {self.shard_id!r}")
        if self.last_batch not in LAST_BATCH:
            raise ValueError(f"last_batch must be one of {LAST_BATCH}, got {self.last_batch!r}")
        if self.dtype not in (torch.float32, torch.float16):
            raise TypeError(f"dtype must be torch.float32 or torch.float16, got {self.dtype}")
        if not 0 < self.crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {self.crop_ratio!r}")
        if not isinstance(self.augment, Augment):
            raise TypeError(f"augment must be an Augment, got {type(self.augment).__name__}")
        torch.device(self.device)  # raises on a malformed device string

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def num_batches(self, shard_size: int) -> int:
        if self.last_batch == "drop":
            return shard_size // self.batch_size
        return -(-shard_size // self.batch_size)
