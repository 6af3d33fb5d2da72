"""The torch loader's image transforms, written to give what the DALI pipelines give.

Deterministic path (encode, eval): resize the shorter side to ``round(img_size /
crop_ratio)``, center-crop ``img_size``, normalize with mean 0.5 and std 0.5 (to [-1, 1]).
The resize is DALI's linear filter with antialiasing: a triangle whose radius is the
scale factor when shrinking (1 when enlarging), borders clamped. That differs from
PIL/``F.interpolate(antialias=True)`` only in the border ring (they renormalize the
weights there instead of clamping), so the filter is built here as a resampling matrix.
Sizes and crop offsets round half up, as DALI does.

Training path: random resized crop, horizontal flip, brightness/contrast, optional
Gaussian blur; the same distributions as the DALI pipeline, not the same random draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Augment",
    "center_crop",
    "channels_last",
    "eval_transform",
    "normalize",
    "resize",
    "resize_matrix",
    "shorter_side_size",
    "to_channels",
    "train_transform",
]

MEAN = 0.5
STD = 0.5


@dataclass(frozen=True)
class Augment:
    """Fine-tuning augmentation. ``scale``: crop area fraction range; ``ratio``: crop
    aspect-ratio range; ``flip``: probability of a horizontal flip; ``brightness`` and
    ``contrast``: factors drawn from ``1 ± value``; ``blur_sigma``: Gaussian blur sigma
    range, ``None`` for no blur."""

    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    blur_sigma: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")
        if not 0 <= self.flip <= 1:
            raise ValueError(f"flip must be a probability, got {self.flip}")
        for name in ("brightness", "contrast"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.blur_sigma is not None and not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` fp64 weights of DALI's antialiased linear resize along one axis."""
    scale = n_in / n_out
    radius = max(scale, 1.0)
    centers = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5
    taps = torch.floor(centers - radius).long()[:, None] + torch.arange(
        math.ceil(2 * radius) + 2)[None]
    weights = (1 - (taps - centers[:, None]).abs() / radius).clamp(min=0)
    weights /= weights.sum(1, keepdim=True)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    # Taps outside the image read its edge pixel (clamped border).
    return matrix.scatter_add_(1, taps.clamp(0, n_in - 1), weights)


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize fp32 ``[C, H, W]`` to ``size = (h, w)``."""
    rows = resize_matrix(img.shape[1], size[0]).to(img.dtype)
    cols = resize_matrix(img.shape[2], size[1]).to(img.dtype)
    return rows @ img @ cols.T


def shorter_side_size(h: int, w: int, shorter: int) -> tuple[int, int]:
    """Output ``(h, w)`` when the shorter side becomes ``shorter`` (aspect kept)."""
    if h <= w:
        return shorter, _round_half_up(w * shorter / h)
    return _round_half_up(h * shorter / w), shorter


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    top = _round_half_up((img.shape[1] - size) / 2)
    left = _round_half_up((img.shape[2] - size) / 2)
    return img[:, top:top + size, left:left + size]


def normalize(img: torch.Tensor) -> torch.Tensor:
    return (img - MEAN) / STD


def channels_last(pixels: np.ndarray, in_chans: int, name: str) -> np.ndarray:
    """``[H, W]``/``[H, W, C]`` pixels as fp32 ``[H, W, in_chans]``: gray is repeated,
    color is averaged for one-channel models. Raises ``ValueError`` naming ``name``
    otherwise. (numpy: it also runs inside DALI's external-source callback, where small
    torch ops would wait on torch's thread pool.)"""
    img = np.asarray(pixels, dtype=np.float32)
    img = img[..., None] if img.ndim == 2 else img
    if img.shape[2] == in_chans:
        return np.ascontiguousarray(img)
    if img.shape[2] == 1:
        return np.ascontiguousarray(np.broadcast_to(img, (*img.shape[:2], in_chans)))
    if in_chans == 1:
        return img.mean(2, keepdims=True, dtype=np.float32)
    raise ValueError(f"image {name} has {img.shape[2]} channels, the model takes {in_chans}")


def to_channels(pixels: np.ndarray, in_chans: int, name: str) -> torch.Tensor:
    """:func:`channels_last` as a ``[in_chans, H, W]`` tensor."""
    return torch.from_numpy(channels_last(pixels, in_chans, name)).permute(2, 0, 1)


def eval_transform(img: torch.Tensor, img_size: int, crop_ratio: float = 1.0) -> torch.Tensor:
    """``[C, H, W]`` in [0, 1] → resized, center-cropped, normalized ``[C, S, S]``."""
    size = shorter_side_size(img.shape[1], img.shape[2], _round_half_up(img_size / crop_ratio))
    return normalize(center_crop(resize(img, size), img_size))


def _random_crop_box(h: int, w: int, augment: Augment, gen: torch.Generator
                     ) -> tuple[int, int, int, int]:
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))

    for _ in range(10):  # DALI's and torchvision's number of attempts
        area = uniform(*augment.scale) * h * w
        ratio = math.exp(uniform(math.log(augment.ratio[0]), math.log(augment.ratio[1])))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            return top, left, ch, cw
    side = min(h, w)  # no valid draw: the largest centered square
    return (h - side) // 2, (w - side) // 2, side, side


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    c = img.shape[0]
    out = img[None]
    for weight, pad in ((kernel.view(1, 1, 1, -1), (radius, radius, 0, 0)),
                        (kernel.view(1, 1, -1, 1), (0, 0, radius, radius))):
        mode = "reflect" if min(out.shape[-2:]) > radius else "replicate"
        out = F.conv2d(F.pad(out, pad, mode=mode), weight.expand(c, 1, -1, -1), groups=c)
    return out[0]


def train_transform(img: torch.Tensor, img_size: int, augment: Augment,
                    gen: torch.Generator) -> torch.Tensor:
    """``[C, H, W]`` in [0, 1] → one random augmented, normalized ``[C, S, S]`` view."""
    top, left, ch, cw = _random_crop_box(img.shape[1], img.shape[2], augment, gen)
    img = resize(img[:, top:top + ch, left:left + cw], (img_size, img_size))
    draws = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
    brightness = 1 + augment.brightness * (2 * draws[0] - 1)
    contrast = 1 + augment.contrast * (2 * draws[1] - 1)
    img = brightness * (0.5 + contrast * (img - 0.5))  # DALI's brightness_contrast
    if augment.blur_sigma is not None:
        low, high = augment.blur_sigma
        img = _gaussian_blur(img, low + (high - low) * draws[2])
    if draws[3] < augment.flip:
        img = img.flip(-1)
    return normalize(img)
