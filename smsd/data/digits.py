"""The embedded default data set: scikit-learn's bundled handwritten digits (ships offline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["load_digits"]


def load_digits(img_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """1797 grayscale digits, 8×8 upscaled (bilinear) to ``img_size``.

    Returns ``images`` fp32 ``[n, 1, img_size, img_size]`` normalized to [-1, 1] and
    ``labels`` int64 ``[n]`` in 0..9.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a declared extra
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") \
            from exc
    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images).float()[:, None] / 16.0
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear",
                           align_corners=False)
    return (images - 0.5) / 0.5, torch.from_numpy(bunch.target).long()
