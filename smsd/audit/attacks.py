"""Attacks of an honest-but-curious server on a token shard.

A shard token is ``t = W·patch + b + pos[j]`` (the head is linear), stored at a secret
slot. The attacks guess, for every slot of every image, the patch position ``j``:

* :func:`unshuffle_known_head` (the server has the head weights, e.g. the public seeded
  init): the cost of slot ``i`` at position ``j`` is the squared distance from the token to
  ``{W·p + b + pos[j] : p in the pixel range}``, approximated by clamping the
  least-squares patch ``W⁺(t - b - pos[j])``. When the patch has fewer values than the
  embedding (the demo: 16 < 64) the part of ``pos[j]`` outside ``W``'s column space is
  seen exactly, so the true position costs ~0 and the others do not.
* :func:`unshuffle_known_positions` (``W`` secret, position embedding known, e.g. a secret
  head seed with the public sin-cos table): nearest position embedding, then optionally
  re-estimate ``W``'s column space from the residuals and rescore as above.

Each image's slots go to distinct positions by a minimum-cost assignment (Hungarian).
:func:`reconstruct` then inverts the head at the guessed positions.
"""

from __future__ import annotations

import numpy as np
import torch

from ..checks import non_negative_int, positive_int
from ..extras import require
from ..models import PatchHead
from .knowledge import check_tokens

__all__ = ["assign", "reconstruct", "unshuffle_known_head", "unshuffle_known_positions"]

_CHUNK_ELEMENTS = 1 << 22  # bounds the [images, slots, positions, patch] scratch tensor


def assign(cost: torch.Tensor) -> torch.Tensor:
    """Per image, the one-to-one slot → position map of minimum total cost.

    ``cost`` ``[n, N, N]`` (slot, position); returns int64 ``[n, N]`` positions.
    """
    require("audit")
    from scipy.optimize import linear_sum_assignment

    if cost.dim() != 3 or cost.shape[1] != cost.shape[2]:
        raise ValueError(f"cost must be [n, N, N], got {list(cost.shape)}")
    out = np.empty(cost.shape[:2], dtype=np.int64)
    for b, matrix in enumerate(cost.double().cpu().numpy()):
        rows, cols = linear_sum_assignment(matrix)
        out[b, rows] = cols
    return torch.from_numpy(out)


def _head_parts(head: PatchHead) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W ``[D, P]``, b ``[D]``, pos ``[N, D]``) in fp64: the head as one affine map."""
    proj = head.patch_embed.proj
    weight = proj.weight.detach().double().reshape(proj.weight.shape[0], -1)
    bias = proj.bias.detach().double() if proj.bias is not None else weight.new_zeros(len(weight))
    return weight, bias, head.pos_embed.detach().double()[0]


def _complement(basis: torch.Tensor) -> torch.Tensor:
    """Projector onto the orthogonal complement of ``basis``'s column space ``[D, D]``."""
    u, s, _ = torch.linalg.svd(basis, full_matrices=False)
    rank = int((s > s.max() * basis.shape[0] * torch.finfo(s.dtype).eps).sum())
    u = u[:, :rank]
    return torch.eye(basis.shape[0], dtype=basis.dtype) - u @ u.T


def _box_cost(tokens: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
              pixel_range: tuple[float, float]) -> torch.Tensor:
    """``[n, N, N]``: squared distance of token ``i`` to ``W·clamp(p) + offsets[j]`` where
    ``p`` is the least-squares patch (the affine set clipped to the pixel box)."""
    lo, hi = pixel_range
    pinv = torch.linalg.pinv(weight)
    perp = _complement(weight)
    outside = torch.cdist(tokens @ perp, (offsets @ perp)[None]).pow(2)  # P⊥ part, exact
    gram = weight.T @ weight
    a, c = tokens @ pinv.T, offsets @ pinv.T  # [n, N, P], [N, P]
    n, slots, p = a.shape
    step = max(1, _CHUNK_ELEMENTS // (slots * len(c) * p))
    inside = []
    for start in range(0, n, step):
        patch = a[start:start + step, :, None, :] - c[None, None]  # [b, i, j, P]
        excess = patch - patch.clamp(lo, hi)
        inside.append(torch.einsum("bijp,pq,bijq->bij", excess, gram, excess))
    return outside + torch.cat(inside)


def _check_range(pixel_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in pixel_range)
    if not lo < hi:
        raise ValueError(f"pixel_range must be (low, high) with low < high, got {pixel_range}")
    return lo, hi


@torch.no_grad()
def unshuffle_known_head(tokens: torch.Tensor, head: PatchHead,
                         pixel_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Guess every slot's patch position with the head's weights: int64 ``[n, N]``."""
    weight, bias, pos = _head_parts(head)
    t = check_tokens(tokens, len(pos), len(bias))
    return assign(_box_cost(t, weight, pos + bias, _check_range(pixel_range)))


@torch.no_grad()
def unshuffle_known_positions(tokens: torch.Tensor, pos_embed: torch.Tensor, patch_dim: int,
                              refine_steps: int = 0) -> torch.Tensor:
    """Guess positions knowing only the position embedding ``[N, D]`` (not ``W``).

    Start from the nearest position embedding; each refine step takes the top
    ``patch_dim`` principal directions of ``token - pos[guess]`` as ``W``'s column space
    and rescores by the distance outside it. Returns int64 ``[n, N]``.
    """
    non_negative_int("refine_steps", refine_steps)
    positive_int("patch_dim", patch_dim)
    pos = pos_embed.detach().double().cpu().reshape(-1, pos_embed.shape[-1])
    t = check_tokens(tokens, *pos.shape)
    guess = assign(torch.cdist(t, pos[None]).pow(2))
    if patch_dim >= pos.shape[1]:
        return guess  # W spans every direction: nothing lies outside it
    for _ in range(refine_steps):
        residual = (t - pos[guess]).reshape(-1, pos.shape[1])
        _, _, vh = torch.linalg.svd(residual - residual.mean(0), full_matrices=False)
        # The mean residual (bias + mean patch) also lies in W's column space.
        basis = torch.cat([vh[:patch_dim - 1].T, residual.mean(0)[:, None]], dim=1)
        perp = _complement(basis)
        guess = assign(torch.cdist(t @ perp, (pos @ perp)[None]).pow(2))
    return guess


@torch.no_grad()
def reconstruct(tokens: torch.Tensor, positions: torch.Tensor, head: PatchHead,
                pixel_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """fp32 images ``[n, C, H, W]`` from the least-squares patch of each token at its guessed
    position, clipped to the pixel range (the pseudo-inverse of the head)."""
    weight, bias, pos = _head_parts(head)
    t = check_tokens(tokens, len(pos), len(bias))
    lo, hi = _check_range(pixel_range)
    if positions.shape != t.shape[:2]:
        raise ValueError(f"positions must have shape {list(t.shape[:2])}, "
                         f"got {list(positions.shape)}")
    positions = positions.long().cpu()
    if positions.min() < 0 or positions.max() >= len(pos):
        raise ValueError(f"positions must lie in [0, {len(pos)})")
    patches = ((t - bias - pos[positions]) @ torch.linalg.pinv(weight).T).clamp(lo, hi)
    ordered = torch.empty_like(patches).scatter_(
        1, positions[..., None].expand_as(patches), patches)  # slot → its grid position
    c = head.config
    grid, size = c.grid, c.patch_size
    images = ordered.reshape(-1, grid, grid, c.in_chans, size, size)
    images = images.permute(0, 3, 1, 4, 2, 5).reshape(-1, c.in_chans, c.img_size, c.img_size)
    return images.float()
