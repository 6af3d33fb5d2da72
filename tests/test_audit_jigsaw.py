"""The jigsaw attack: without a position embedding, a known head still gives the server
every patch, and solving the puzzle puts the digits back (up to a small shift)."""

from __future__ import annotations

import math

import pytest
import torch

from smsd.audit.defences import simulate_upload
from smsd.audit.jigsaw import best_shift, best_shift_positions, jigsaw
from smsd.audit.knowledge import Knowledge, images_to_patches, patches_to_images
from smsd.audit.metrics import psnr, ssim
from smsd.data import load_digits
from smsd.models import PatchHead, ViTConfig, model_config

N_DIGITS = 30
MAX_SHIFT = 2  # whole patches: a digit's blank border leaves its placement free by that much


def _upload(images: torch.Tensor, config: ViTConfig, seed: int = 0):
    head = PatchHead(config).eval()
    tokens, truth = simulate_upload(images, head, generator=torch.Generator().manual_seed(seed))
    return tokens, truth, Knowledge(config=config, head=head, public_images=images[:1])


def _smooth(n: int, c: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random low-frequency images (half-periods 0..2 per axis) spanning [-0.9, 0.9]."""
    y = torch.arange(size, dtype=torch.float64)[:, None] + 0.5
    out = torch.zeros(n, c, size, size, dtype=torch.float64)
    for ky in range(3):
        for kx in range(3):
            amp = torch.randn(n, c, 1, 1, generator=gen, dtype=torch.float64)
            phase = 2 * math.pi * torch.rand(n, c, 1, 1, generator=gen, dtype=torch.float64)
            out += amp * torch.cos(math.pi * (ky * y + kx * y.T) / size + phase)
    out -= out.amin((2, 3), keepdim=True)
    return (out / out.amax((2, 3), keepdim=True) * 1.8 - 0.9).float()


def test_jigsaw_rebuilds_digits_without_position_embedding():
    config = model_config("demo").replace(pos_embed_scale=0.0)
    digits = load_digits(config.img_size)[0]
    images = digits[-N_DIGITS:]
    tokens, truth, knowledge = _upload(images, config)
    attempt = jigsaw(tokens, knowledge)
    n, count = truth.shape
    assert attempt.positions.dtype == torch.int64
    assert torch.equal(attempt.positions.sort(1).values, torch.arange(count).expand(n, -1))
    assert attempt.images.shape == images.shape

    rebuilt = best_shift(attempt.images, images, config, MAX_SHIFT, background=-1.0)
    patches = images_to_patches(images, config)
    shuffled = patches_to_images(patches[:, torch.randperm(count)], config)
    random_order = best_shift(shuffled, images, config, MAX_SHIFT, background=-1.0)
    mean_image = digits[:-N_DIGITS].mean(0, keepdim=True).expand_as(images)
    # Measured: 30.5 dB / SSIM 0.90, 73 % of slots up to shift; a random order 7.9 dB / 0.06,
    # the mean digit 13.4 dB / 0.14. Broken solvers: random placement 8.2 dB, transposed
    # compatibility 11 dB, left/above swapped 9 dB, MGC only 11 dB, no tie-breakers 21 dB.
    floor = max(psnr(random_order, images, 2.0), psnr(mean_image, images, 2.0))
    assert psnr(rebuilt, images, 2.0) > max(27.0, floor + 12)
    assert ssim(rebuilt, images, 2.0) > 0.8 > ssim(mean_image, images, 2.0) + 0.5
    shifted = best_shift_positions(attempt.positions, truth, config.grid, MAX_SHIFT)
    assert (shifted == truth).double().mean() > 0.6


@pytest.mark.parametrize("mgc_weight", [0.0, 0.01])
def test_smooth_images_are_put_back_exactly(mgc_weight):
    config = ViTConfig(img_size=16, patch_size=4, in_chans=2, embed_dim=48, depth=1,
                       num_heads=4, pos_embed_scale=0.0)  # 4×4 grid, 32 values per patch
    images = _smooth(8, 2, 16, torch.Generator().manual_seed(0))
    tokens, truth, knowledge = _upload(images, config, seed=1)
    attempt = jigsaw(tokens, knowledge, mgc_weight=mgc_weight)
    assert torch.equal(best_shift_positions(attempt.positions, truth, config.grid, 1), truth)
    assert torch.equal(attempt.positions, truth)  # no blank border: no shift either
    assert (attempt.images - images).abs().max() < 0.02  # fp16 tokens


def test_jigsaw_needs_the_head():
    config = model_config("demo").replace(pos_embed_scale=0.0)
    tokens = torch.zeros(2, config.n_tokens, config.embed_dim)
    with pytest.raises(ValueError, match="head"):
        jigsaw(tokens, Knowledge(config=config, head=None, public_images=torch.zeros(1)))


def test_best_shift_undoes_a_translation():
    config = model_config("demo")
    p, background = config.patch_size, -1.0
    images = torch.full((2, 1, 32, 32), background)
    images[:, :, 3 * p:5 * p, 2 * p:6 * p] = torch.rand(2, 1, 2 * p, 4 * p)
    moved = torch.full_like(images, background)
    moved[:, :, p:, :-2 * p] = images[:, :, :-p, 2 * p:]  # 1 patch down, 2 left
    moved[1] = images[1]
    back = best_shift(moved, images, config, 2, background)
    assert torch.equal(back, images)
    assert not torch.equal(best_shift(moved, images, config, 1, background), images)

    g = config.grid
    truth = torch.stack([torch.randperm(g * g) for _ in range(3)])
    r, c = truth // g, truth % g
    guess = ((r + 1) % g) * g + (c - 2) % g  # shifted by (1, -2), wrapped around
    shifted = best_shift_positions(guess, truth, g, 2)
    assert (shifted == truth).double().mean() == (g - 1) * (g - 2) / g**2
    assert ((shifted == truth) | (shifted == -1)).all()
    assert torch.equal(best_shift_positions(truth, truth, g, 2), truth)
