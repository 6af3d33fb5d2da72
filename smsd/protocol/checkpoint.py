"""Pre-training checkpoints: everything needed to resume a :class:`Server` run."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SmsdError
from ..io import atomic_write

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(SmsdError, ValueError):
    """A checkpoint is missing, unreadable, or for another run."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` atomically."""
    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None
