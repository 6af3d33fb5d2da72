"""What an attacker knows, and what an attack returns.

Every attack in :mod:`smsd.audit` is a function ``attack(tokens, knowledge) -> Attempt``:
``tokens`` ``[n, N, D]`` is one client's upload (each image's tokens in a secret order),
``knowledge`` is everything the server has besides it. The audit states the knowledge of
every row it reports, so a reader can judge which attacker the row describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import PatchHead, ViTConfig

__all__ = ["Attempt", "Knowledge", "check_tokens", "images_to_patches", "patches_to_images",
           "place"]


@dataclass(frozen=True)
class Knowledge:
    """The attacker's side information.

    ``config``: the public model config (architecture, ``pos_embed_scale``, the public
    ``head_seed``). ``head``: the head's weights when the attacker has them (the public
    seeded head, or one a colluding client gave away); ``None`` when the client's head is
    secret, in which case ``config.head_seed`` is *not* the client's seed.
    ``public_images`` ``[m, C, H, W]`` (and ``public_labels`` ``[m]``): images of the same
    kind, disjoint from the attacked ones. ``noise_std``: the std of the Gaussian noise the
    client adds to every token value (a public parameter of the mechanism).
    ``pixel_range``: the model's input range.
    """

    config: ViTConfig
    head: PatchHead | None
    public_images: torch.Tensor
    public_labels: torch.Tensor | None = None
    noise_std: float = 0.0
    pixel_range: tuple[float, float] = (-1.0, 1.0)

    @property
    def head_known(self) -> bool:
        return self.head is not None

    @property
    def has_position_embedding(self) -> bool:
        return self.config.pos_embed_scale > 0

    def public_patches(self) -> torch.Tensor:
        """The public images as fp64 patches ``[m, N, C·p·p]`` in grid order."""
        return images_to_patches(self.public_images.double(), self.config)


@dataclass(frozen=True)
class Attempt:
    """An attack's output: ``positions`` int64 ``[n, N]`` (the guessed grid position of
    every slot) and/or ``images`` fp32 ``[n, C, H, W]`` (the reconstructions); ``None``
    where the attack does not produce it."""

    positions: torch.Tensor | None = None
    images: torch.Tensor | None = None


def check_tokens(tokens: torch.Tensor, n_pos: int, dim: int) -> torch.Tensor:
    """An upload ``[n, n_pos, dim]`` as fp64 on the CPU; TypeError/ValueError otherwise."""
    if not isinstance(tokens, torch.Tensor) or not tokens.dtype.is_floating_point:
        raise TypeError(f"tokens must be a floating-point torch.Tensor [n, {n_pos}, {dim}]")
    if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (n_pos, dim):
        raise ValueError(f"tokens must have shape [n, {n_pos}, {dim}] for this model, "
                         f"got {list(tokens.shape)}")
    return tokens.detach().double().cpu()


def images_to_patches(images: torch.Tensor, config: ViTConfig) -> torch.Tensor:
    """``[n, C, H, W]`` → ``[n, N, C·p·p]``, grid row-major, each patch flattened as the
    head's convolution reads it (channel, row, column)."""
    n, c = images.shape[:2]
    g, p = config.grid, config.patch_size
    x = images.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, g * g, c * p * p)


def patches_to_images(patches: torch.Tensor, config: ViTConfig) -> torch.Tensor:
    """Inverse of :func:`images_to_patches`: ``[n, N, C·p·p]`` in grid order → images."""
    n = patches.shape[0]
    g, p, c = config.grid, config.patch_size, config.in_chans
    x = patches.reshape(n, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, g * p, g * p)


def place(patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Slot-ordered ``patches`` ``[n, N, P]`` put at their guessed grid ``positions``
    ``[n, N]`` (a permutation per image): grid-ordered ``[n, N, P]``."""
    index = positions.long()[..., None].expand_as(patches)
    return torch.empty_like(patches).scatter_(1, index, patches)
