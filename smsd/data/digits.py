"""The embedded default data set: scikit-learn's bundled handwritten digits (ships offline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..extras import require

__all__ = ["load_digits"]


def load_digits(img_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """1797 grayscale digits, 8×8 upscaled (bilinear) to ``img_size``.

    Returns ``images`` fp32 ``[n, 1, img_size, img_size]`` normalized to [-1, 1] and
    ``labels`` int64 ``[n]`` in 0..9.
    """
    require("data", "sklearn", purpose="the bundled digits data set")
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images).float()[:, None] / 16.0
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear",
                           align_corners=False)
    return (images - 0.5) / 0.5, torch.from_numpy(bunch.target).long()
