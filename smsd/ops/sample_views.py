"""sample_views: the random token subsets ("views") of masked sampling distillation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import positive_int

__all__ = ["sample_views", "view_size"]


def view_size(n_tokens: int, ratio: float) -> int:
    """Tokens kept by a view: ``round(ratio * n_tokens)`` (Python's round, half to even)."""
    return round(ratio * n_tokens)


def sample_views(
    batch: int,
    n_tokens: int,
    keep: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Draw one random token subset per image and view.

    Args:
        batch: images in the batch.
        n_tokens: tokens per image (N).
        keep: keep ratio of each view, in (0, 1]; e.g. ``[0.5] * 2 + [0.2] * 8``.
        generator: source of randomness (must live on ``device``); the same generator
            state gives the same views.
        device: where the indices are drawn and returned (default: the generator's
            device, else CPU).

    Returns:
        One int64 tensor ``[batch, view_size(n_tokens, ratio)]`` per view: for each
        image an independent, uniformly random subset of ``range(n_tokens)`` without
        repeats, in random order.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got {batch!r}")
    positive_int("n_tokens", n_tokens)
    if isinstance(keep, (int, float)) or len(keep) == 0:
        raise ValueError(f"keep must be a non-empty sequence of ratios, got {keep!r}")
    sizes = []
    for v, ratio in enumerate(keep):
        if not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep[{v}] must be a ratio in (0, 1], got {ratio!r}")
        size = view_size(n_tokens, ratio)
        if size < 1:
            raise ValueError(
                f"keep[{v}]={ratio} keeps round({ratio} * {n_tokens}) = 0 tokens; "
                "raise the ratio"
            )
        sizes.append(size)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator lives on {generator.device} but device is {device}")
    views = []
    for size in sizes:
        # argsort of i.i.d. uniform keys is a uniformly random permutation (MAE's masking);
        # its first `size` entries are a uniformly random subset.
        noise = torch.rand(batch, n_tokens, generator=generator, device=device)
        views.append(noise.argsort(dim=1)[:, :size])
    return views
