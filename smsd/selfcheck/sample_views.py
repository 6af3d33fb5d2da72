"""Self-check of sample_views: sizes, no repeats, range, reproducibility."""

from __future__ import annotations

import torch

from ..ops import sample_views, view_size
from . import Result

BACKENDS = ("torch",)  # plain PyTorch on every device


def checks(backend: str, device: torch.device) -> list[Result]:
    keep = [0.5, 0.5, *[0.2] * 8]
    n_tokens, batch = 197, 5
    gen = torch.Generator(device=device).manual_seed(7)
    views = sample_views(batch, n_tokens, keep, generator=gen, device=device)
    again = sample_views(batch, n_tokens, keep,
                         generator=torch.Generator(device=device).manual_seed(7), device=device)
    problems = []
    for v, (ratio, idx) in enumerate(zip(keep, views, strict=True)):
        if tuple(idx.shape) != (batch, view_size(n_tokens, ratio)):
            problems.append(f"view {v} shape {tuple(idx.shape)}")
        if idx.min() < 0 or idx.max() >= n_tokens:
            problems.append(f"view {v} out of range")
        if (idx.sort(1).values.diff(dim=1) == 0).any():
            problems.append(f"view {v} repeats a token")
    if not all(torch.equal(a, b) for a, b in zip(views, again, strict=True)):
        problems.append("same seed gave different views")
    return [Result("sample_views", backend, device.type, "int64", f"N={n_tokens} 10 views",
                   not problems, "; ".join(problems) or "sizes, range, no repeats, seeded")]
