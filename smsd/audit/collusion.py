"""A colluding client: its known plaintext–token pairs give the server the shared head.

Every client of a federation encodes with the same head (the server trains one body on
all uploads), so a secret head seed is only as secret as the least trustworthy client.
A colluder knows its own images, tokens and key (so each token's position): per
position ``j`` the tokens are ``W·patch + c_j``; least squares on position-centred pairs
gives ``W``, the per-position means give ``c_j``.
"""

from __future__ import annotations

import torch

from ..models import PatchHead, ViTConfig
from .knowledge import images_to_patches

__all__ = ["estimate_head"]

_RCOND = 1e-6


@torch.no_grad()
def estimate_head(images: torch.Tensor, tokens_in_grid: torch.Tensor,
                  config: ViTConfig) -> PatchHead:
    """The head ``[W, b + pos]`` fit to ``images`` ``[m, C, H, W]`` and their tokens in
    grid order ``[m, N, D]`` (bias 0; the offsets go into the position embedding)."""
    if tokens_in_grid.shape[:2] != (len(images), config.n_tokens):
        raise ValueError(f"tokens must have shape [{len(images)}, {config.n_tokens}, D], "
                         f"got {list(tokens_in_grid.shape)}")
    patches = images_to_patches(images.double(), config)
    tokens = tokens_in_grid.double()
    p_mean, t_mean = patches.mean(0), tokens.mean(0)
    x = (patches - p_mean).reshape(-1, patches.shape[2])
    y = (tokens - t_mean).reshape(-1, tokens.shape[2])
    # Minimum-norm least squares: directions the colluder's patches never vary in (the
    # demo's upscaled digits span 9 of 16) stay 0 instead of fitting rounding noise.
    weight = torch.linalg.lstsq(x, y, rcond=_RCOND, driver="gelsd").solution.T  # [D, P]
    head = PatchHead(config).eval()
    proj = head.patch_embed.proj
    proj.weight.copy_(weight.reshape(proj.weight.shape).float())
    if proj.bias is not None:
        proj.bias.zero_()
    head.pos_embed.copy_((t_mean - p_mean @ weight.T)[None].float())
    return head
