"""A jigsaw solver: put back the patches of an upload without a position embedding.

Assumes the server knows the head (``W``, ``b``: the public seeded init) but not the patch
order, and the position embedding is zero (``pos_embed_scale = 0``), so the order-based
attacks of :mod:`smsd.audit.attacks` have nothing to match. Every slot's patch is then
recovered up to the fp16 rounding, ``clamp(W⁺(t - b))``, and the attack solves the puzzle.

* Compatibility of two patches side by side (``i`` left of ``j``; ``i`` above ``j``), both
  sides' views summed: the prediction term (squared error of linearly extrapolating each
  patch's last two rows across the seam, Pomeranz et al., CVPR 2011) and, optionally,
  Gallagher's Mahalanobis gradient compatibility (MGC, A. C. Gallagher, "Jigsaw puzzles
  with pieces of unknown orientation", CVPR 2012: the seam gradient under the mean and
  covariance + eps·I of the gradients along the patch's own edge). Measured on 100 demo
  digits (4×4 patches, best-shift PSNR): prediction 34 dB, MGC 10.5 dB, any mix worse than
  prediction alone. With 4 rows per edge MGC charges every textured true seam ~p - 1
  whatever its fit (the rows' spread is what normalizes it), while bilinear digits
  continue linearly across seams, so the prediction is ~0 on true seams. The default is
  prediction only (``mgc_weight=0``).
* Placement: greedy growth in a bounded ``g×g`` frame: start with the most textured patch
  (highest variance), then repeatedly place the (free cell, unplaced patch) pair of least
  mean dissimilarity to the cell's placed neighbours; a free cell touches a placed one and
  keeps the placed cells' bounding box within ``g×g``. Exact fits tie (background next to
  background), so tiny bonuses rank cells with more placed neighbours and textured
  patches first: blank patches go last. All images step together (``N - 1`` steps).

Limits: a blank border leaves the whole image's placement free up to a translation (score
with :func:`best_shift` / :func:`best_shift_positions`), and near-blank outer columns fit
on either side (the digits' puzzle is nearly cyclic); the token noise is not modelled.
"""

from __future__ import annotations

import itertools

import torch

from ..models import ViTConfig
from .attacks import _check_range, _head_parts
from .knowledge import Attempt, Knowledge, check_tokens, patches_to_images, place

__all__ = ["best_shift", "best_shift_positions", "compatibility", "jigsaw"]

_CHUNK_ELEMENTS = 1 << 22  # bounds the [images, N, N, C, p] scratch tensor
# Tie-breakers, far below a real mismatch, above the fp16 rounding (measured on digits):
_NEIGHBOUR_BONUS = 3e-4  # per placed neighbour of the cell
_TEXTURE_BONUS = 3e-3  # times the patch's pixel std


def _half(x: torch.Tensor, mgc_weight: float, eps: float) -> torch.Tensor:
    """One side's dissimilarity ``[n, N, N]`` of ``i`` left of ``j`` for ``x``
    ``[n, N, C, p, p]``, judged from ``i``'s right edge: prediction + weighted MGC."""
    n, count, c, p, _ = x.shape
    edge, grad = x[..., -1], x[..., -1] - x[..., -2]  # [n, N, C, rows]
    mean = grad.mean(-1, keepdim=True)  # [n, N, C, 1]
    dev = grad - mean
    cov = dev @ dev.transpose(-1, -2) / max(p - 1, 1) + eps * torch.eye(c, dtype=x.dtype)
    whiten = torch.linalg.inv(torch.linalg.cholesky(cov))  # [n, N, C, C]: S⁻¹ = whitenᵀwhiten
    out = []
    step = max(1, _CHUNK_ELEMENTS // (count * count * c * p))
    for s in range(0, n, step):
        part = slice(s, s + step)
        cross = x[part, None, ..., 0] - edge[part, :, None]  # seam gradients [b, i, j, C, rows]
        d = (cross - grad[part, :, None]).pow(2).sum((-1, -2))
        if mgc_weight:
            z = whiten[part, :, None] @ (cross - mean[part, :, None])
            d = d + mgc_weight * z.pow(2).sum((-1, -2))
        out.append(d)
    return torch.cat(out)


def compatibility(patches: torch.Tensor, config: ViTConfig, mgc_weight: float = 0.0,
                  eps: float = 1e-2) -> torch.Tensor:
    """Dissimilarity ``[n, 2, N, N]`` of grid-free patches ``[n, N, C·p·p]``: ``[:, 0, i, j]``
    for ``i`` left of ``j``, ``[:, 1, i, j]`` for ``i`` above ``j`` (lower is better;
    ``inf`` on the diagonal): prediction + ``mgc_weight`` · MGC (covariance + ``eps``·I),
    each summed over both patches' sides of the seam."""
    c, p = config.in_chans, config.patch_size
    x = patches.double().reshape(*patches.shape[:2], c, p, p)
    out = []
    for view in (x, x.transpose(-1, -2)):  # transposed: "above" becomes "left of"
        from_j = _half(view.flip(-1), mgc_weight, eps)  # j's left edge, seen from inside j
        out.append(_half(view, mgc_weight, eps) + from_j.transpose(1, 2))
    d = torch.stack(out, 1)
    return d.masked_fill(torch.eye(d.shape[-1], dtype=torch.bool), float("inf"))


def _grow(d: torch.Tensor, texture: torch.Tensor, g: int) -> torch.Tensor:
    """Greedy placement from dissimilarity ``d`` ``[n, 2, N, N]`` and patch ``texture``
    ``[n, N]`` (the first patch: the most textured). Returns grid positions ``[n, N]``."""
    n, _, count, _ = d.shape
    f = 2 * g + 1  # frame: any g×g box grown from the centre fits, with a free margin
    ar, inf = torch.arange(n), float("inf")
    cost = d.new_zeros(n, f * f, count)  # summed over each cell's placed neighbours
    seen = d.new_zeros(n, f * f)  # placed neighbours
    score = torch.full_like(cost, inf)  # of open (cell, unplaced patch) pairs, else inf
    dead = torch.zeros(n, f * f, dtype=torch.bool)  # placed, or outside every future box
    unplaced = torch.ones(n, count, dtype=torch.bool)
    rows, cols = torch.zeros(n, count, dtype=torch.long), torch.zeros(n, count, dtype=torch.long)
    lo = torch.full((n, 2), g, dtype=torch.long)
    hi = lo.clone()
    frame_r, frame_c = torch.arange(f).repeat_interleave(f), torch.arange(f).repeat(f)

    def put(cell: torch.Tensor, patch: torch.Tensor) -> None:
        r, c = cell // f, cell % f
        rows[ar, patch], cols[ar, patch] = r, c
        dead[ar, cell], unplaced[ar, patch] = True, False
        score[ar, cell], score[ar, :, patch] = inf, inf
        lo[:, 0], lo[:, 1] = lo[:, 0].minimum(r), lo[:, 1].minimum(c)
        hi[:, 0], hi[:, 1] = hi[:, 0].maximum(r), hi[:, 1].maximum(c)
        for offset, costs in ((1, d[ar, 0, patch]), (-1, d[ar, 0, :, patch]),
                              (f, d[ar, 1, patch]), (-f, d[ar, 1, :, patch])):
            nb = cell + offset
            cost[ar, nb] += costs
            seen[ar, nb] += 1
            k = seen[ar, nb, None]
            mean = cost[ar, nb] / k - _NEIGHBOUR_BONUS * k - _TEXTURE_BONUS * texture
            score[ar, nb] = mean.masked_fill(dead[ar, nb, None] | ~unplaced, inf)

    put(torch.full((n,), g * f + g, dtype=torch.long), texture.argmax(1))
    for _ in range(count - 1):
        fits = ((frame_r.maximum(hi[:, :1]) - frame_r.minimum(lo[:, :1]) < g)
                & (frame_c.maximum(hi[:, 1:]) - frame_c.minimum(lo[:, 1:]) < g))
        dead |= ~fits  # the box only grows: a cell that does not fit never will
        score.masked_fill_(~fits[..., None], inf)
        best = score.flatten(1).argmin(1)
        put(best // count, best % count)
    return (rows - rows.min(1, keepdim=True).values) * g + cols - cols.min(1, keepdim=True).values


@torch.no_grad()
def jigsaw(tokens: torch.Tensor, knowledge: Knowledge, *, mgc_weight: float = 0.0) -> Attempt:
    """Put back every image's patches by solving the jigsaw (see the module docstring).

    ``tokens`` ``[n, N, D]``; needs ``knowledge.head``. Returns the guessed grid position
    of every slot (a permutation per image, up to a translation of the whole image when
    the border is blank) and the placed patches as images.
    """
    if knowledge.head is None:
        raise ValueError("jigsaw needs the head's weights (knowledge.head is None): it "
                         "inverts the head to get each slot's patch")
    config = knowledge.config
    weight, bias, _ = _head_parts(knowledge.head)
    t = check_tokens(tokens, config.n_tokens, len(bias))
    lo, hi = _check_range(knowledge.pixel_range)
    patches = ((t - bias) @ torch.linalg.pinv(weight).T).clamp(lo, hi)  # [n, N, P]
    d = compatibility(patches, config, mgc_weight)
    positions = _grow(d, patches.std(-1), config.grid)
    images = patches_to_images(place(patches, positions), config).float()
    return Attempt(positions=positions, images=images)


def _shifts(max_shift: int) -> list[tuple[int, int]]:
    """Every (dy, dx) in ``[-max_shift, max_shift]²``, smallest first (ties: no shift)."""
    r = range(-max_shift, max_shift + 1)
    return sorted(itertools.product(r, r), key=lambda s: (abs(s[0]) + abs(s[1]), s))


def _translate(images: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    h, w = images.shape[-2:]
    out = torch.full_like(images, fill)
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def best_shift(images: torch.Tensor, originals: torch.Tensor, config: ViTConfig,
               max_shift: int, background: float) -> torch.Tensor:
    """Each of ``images`` ``[n, C, H, W]`` translated by the whole-patch shift (dy, dx) in
    ``[-max_shift, max_shift]²`` (vacated pixels set to ``background``) of least MSE against
    its original; ties go to the smaller shift."""
    p = config.patch_size
    moved = torch.stack([_translate(images, dy * p, dx * p, background)
                         for dy, dx in _shifts(max_shift)])  # [S, n, C, H, W]
    mse = (moved.double() - originals.double()).pow(2).flatten(2).mean(2)  # [S, n]
    return moved[mse.argmin(0), torch.arange(len(images))]


def best_shift_positions(positions: torch.Tensor, truth: torch.Tensor, grid: int,
                         max_shift: int) -> torch.Tensor:
    """``positions`` ``[n, N]`` each translated by the whole-patch shift (dy, dx) in
    ``[-max_shift, max_shift]²`` that makes the most slots equal ``truth`` (ties: the
    smaller shift). Slots shifted off the grid get -1 (never correct), so
    ``(best_shift_positions(...) == truth).mean()`` is the accuracy up to that shift."""
    r, c = positions.long() // grid, positions.long() % grid
    candidates = []
    for dy, dx in _shifts(max_shift):
        rr, cc = r + dy, c + dx
        inside = (rr >= 0) & (rr < grid) & (cc >= 0) & (cc < grid)
        candidates.append(torch.where(inside, rr * grid + cc, -1))
    moved = torch.stack(candidates)  # [S, n, N]
    best = (moved == truth.long()).sum(2).argmax(0)  # first maximum: the smallest shift
    return moved[best, torch.arange(len(positions))]
