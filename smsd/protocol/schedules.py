"""Per-iteration schedules (DINO's ``cosine_scheduler``)."""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_schedule"]


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, start_warmup: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``start_warmup`` to ``base``, then cosine decay to ``final``;
    one value per iteration (``epochs * steps_per_epoch`` values)."""
    total = epochs * steps_per_epoch
    warmup_iters = min(warmup_epochs * steps_per_epoch, total)
    warmup = np.linspace(start_warmup, base, warmup_iters, endpoint=False) \
        if warmup_iters else np.array([])
    iters = np.arange(total - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cosine))
