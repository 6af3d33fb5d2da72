"""How well an attack did: positions put back, PSNR and SSIM of reconstructed images."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["position_accuracy", "psnr", "ssim"]


def position_accuracy(guess: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of shard slots whose guessed patch position equals the true one."""
    if guess.shape != truth.shape:
        raise ValueError(f"guess has shape {list(guess.shape)}, truth {list(truth.shape)}")
    return (guess == truth).double().mean().item()


def _check_pair(x: torch.Tensor, y: torch.Tensor, data_range: float) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"images must both be [n, C, H, W] of one shape, got {list(x.shape)} "
                         f"and {list(y.shape)}")
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range!r}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float) -> float:
    """Mean over images of 10·log10(range² / MSE), in dB (capped at 100 dB for exact copies)."""
    _check_pair(x, y, data_range)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).clamp(max=100.0).mean().item()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g /= g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float) -> float:
    """Mean SSIM (Wang et al. 2004: 11×11 Gaussian window, σ 1.5, K1 0.01, K2 0.03), each
    channel separately, over the window positions that fit in the image ("valid")."""
    _check_pair(x, y, data_range)
    c, h, w = x.shape[1:]
    size = min(11, h, w)
    size -= 1 - size % 2  # an odd window that fits small images
    window = _gaussian_window(size, 1.5 * size / 11)[None, None].expand(c, 1, -1, -1)
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean().item()
