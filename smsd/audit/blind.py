"""Blind attack: neither the head weights nor the position embedding are known.

A token is ``t = W·patch + c_j`` with ``W`` (``[D, P]``) and the per-position offsets
``c_j = b + pos_j`` secret. The attack needs only the public patch size and public images
of the same kind (Carlini et al.'s "NeuraCrypt is not private", 2021, broke a secret
random encoder plus position embedding plus shuffling the same way):

1. **Cluster positions across images.** Tokens of one position share ``c_j``; each image
   holds one token per position. Constrained k-medians: each image's slots go to
   distinct clusters by a minimum-cost assignment, and the distance is measured outside
   the content subspace (robust within-cluster PCA: ``t − centroid`` lies in
   ``span(W)``, rank ``P``), where the offsets differ and the image content does not.
2. **Content coordinates.** ``z = Uᵀ(t − m_a)`` (``U``: that subspace, ``m_a``: the
   cluster mean) is ``M·(patch − μ_j)`` for one unknown invertible ``M`` shared by all
   positions.
3. **Graph matching to the grid.** The canonical correlations between two clusters'
   content coordinates do not depend on ``M``; they are matched (quadratic assignment)
   to those between grid positions in the public patches.
4. **Moment matching for the content map.** ``M⁻¹`` is fit so that the reconstructed
   patches have the public second and third moments at every position; the patch is
   ``M⁻¹ z + μ_j``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..extras import require
from .attacks import assign
from .knowledge import Attempt, Knowledge, check_tokens, patches_to_images, place

__all__ = ["blind"]

_CLUSTER_STEPS = 12
_IRLS_STEPS = 20
_QAP_RESTARTS = 200
_SWAP_STEPS = 2000
_CCA_RIDGE = 1e-3  # relative to the mean variance: blank positions have none
_MAX_CORRELATION = 0.999
_MOMENT_RESTARTS = 6


def _complement(u: torch.Tensor) -> torch.Tensor:
    return torch.eye(u.shape[0], dtype=u.dtype) - u @ u.T


def _content_basis(residual: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Robust PCA of the within-cluster residuals ``[M, D]``: the subspace of
    ``basis``'s rank minimizing the summed (not squared) distances to it, by iteratively
    reweighted least squares. A token put in the wrong cluster leaves a residual with an
    offset difference outside ``span(W)``; the unsquared loss keeps such outliers from
    turning the subspace."""
    rank = basis.shape[1]
    for _ in range(_IRLS_STEPS):
        outside = (residual - residual @ basis @ basis.T).norm(dim=1)
        weight = 1 / outside.clamp_min(1e-6 * outside.max().clamp_min(1e-300))
        _, vectors = torch.linalg.eigh((residual * weight[:, None]).T @ residual)
        basis = vectors[:, -rank:]
    return basis


def _cluster(t: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Constrained k-medians: (cluster of every slot ``[n, N]``, content basis
    ``[D, rank]``). Distances are measured outside the current estimate of the content
    subspace, which separates positions exactly once the estimate is right."""
    n, _, d = t.shape
    if rank >= d:  # W spans everything: no direction sees the offsets alone
        basis = torch.eye(d, dtype=t.dtype)
        labels = assign(torch.cdist(t, t[0][None].expand(n, -1, -1)).pow(2))
        return labels, basis
    # Each image's mean token is W·(its mean patch) + the mean offset: across images it
    # varies only inside span(W), where it gives the first estimate of the subspace.
    means = t.mean(1)
    _, _, vh = torch.linalg.svd(means - means.mean(0), full_matrices=False)
    basis = vh[:rank].T
    centroids = t[0].clone()
    best = (float("inf"), None, basis)
    for _ in range(_CLUSTER_STEPS):
        project = _complement(basis)
        a, c = t @ project, centroids @ project
        labels = assign(torch.cdist(a, c[None].expand(n, -1, -1)).pow(2))
        grouped = place(t, labels)  # [n, cluster, D]
        centroids = grouped.median(0).values
        residual = (grouped - centroids).reshape(-1, d)
        basis = _content_basis(residual, basis)
        # Right clusters leave residuals inside a rank-P subspace: keep the clustering
        # whose residuals lie closest to one (the iteration can drift away from it).
        misfit = (residual - residual @ basis @ basis.T).norm(dim=1).sum().item()
        if misfit < best[0]:
            best = (misfit, labels, basis)
    _, labels, basis = best
    return labels, basis


def _canonical_similarity(z: torch.Tensor) -> torch.Tensor:
    """``[K, K]``: the Gaussian mutual information ``−½ Σ log(1 − ρ²)`` of the canonical
    correlations ``ρ`` between the coordinates ``z`` ``[n, K, r]`` of every pair of
    clusters (positions); invariant to ``z → M z``. (Of the similarities tried — summed
    ρ², the top one or two ρ, this — it matched the demo's clusters to the grid best.)"""
    n, _, r = z.shape
    z = z - z.mean(0)
    cov = torch.einsum("nar,nas->ars", z, z) / (n - 1)
    scale = cov.diagonal(dim1=1, dim2=2).sum(1).mean() / r
    evals, evecs = torch.linalg.eigh(cov + _CCA_RIDGE * scale * torch.eye(r, dtype=z.dtype))
    white = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.transpose(1, 2)  # C_aa^-1/2
    w = torch.einsum("nar,ars->nas", z, white)  # whitened per cluster
    cross = torch.einsum("nar,nbs->abrs", w, w) / (n - 1)
    rho = torch.linalg.svdvals(cross).clamp(max=_MAX_CORRELATION)
    return -0.5 * torch.log1p(-rho.pow(2)).sum(-1)


def _grid_symmetries(grid: int) -> list[np.ndarray]:
    """The 8 symmetries of the square grid, as maps position → position."""
    idx = np.arange(grid * grid).reshape(grid, grid)
    turns = [np.rot90(idx, k) for k in range(4)]
    return [t.ravel() for t in turns + [t.T for t in turns]]


def _two_swap(a: np.ndarray, b: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Local search: swap the two assignments that raise ``Σ a[i, j]·b[p i, p j]`` most,
    until no swap does (``a``, ``b`` symmetric with zero diagonals)."""
    perm = perm.copy()
    for _ in range(_SWAP_STEPS):
        bp = b[np.ix_(perm, perm)]
        m = a @ bp
        diag = np.diag(m)
        gain = 2 * (m + m.T - diag[:, None] - diag[None, :] + 2 * a * bp)
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[i, j] <= 1e-12 * abs(m.trace()):
            break
        perm[[i, j]] = perm[[j, i]]
    return perm


def _match_to_grid(cluster_sim: torch.Tensor, grid_sim: torch.Tensor, grid: int,
                   seed: int, restarts: int = _QAP_RESTARTS) -> np.ndarray:
    """Cluster → grid position maximizing ``Σ S_cluster[a, b]·S_grid[π a, π b]``: FAQ
    (Vogelstein et al. 2015) from random starts; each solution is also tried under every
    symmetry of the grid (a local optimum is often a mirror image), each polished by
    pairwise swaps; the best is kept."""
    require("audit")
    from scipy.optimize import quadratic_assignment

    a = cluster_sim.numpy().copy()
    b = grid_sim.numpy().copy()
    np.fill_diagonal(a, 0)
    np.fill_diagonal(b, 0)
    rng = np.random.default_rng(seed)

    def solve(start: str | np.ndarray):
        return quadratic_assignment(a, b, method="faq",
                                    options={"maximize": True, "P0": start, "rng": rng})

    def score(perm: np.ndarray) -> float:
        return float((a * b[np.ix_(perm, perm)]).sum())

    starts = [solve("barycenter" if r == 0 else "randomized").col_ind
              for r in range(restarts)]
    candidates = [_two_swap(a, b, sym[perm]) for perm in starts
                  for sym in _grid_symmetries(grid)]
    return max(candidates, key=score)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Second moments between every pair of positions ``[N, N, r, r]`` and third moments
    per position ``[N, r, r, r]`` of ``x`` ``[n, N, r]`` (centred)."""
    n = x.shape[0]
    second = torch.einsum("nar,nbs->abrs", x, x) / n
    third = torch.einsum("nar,nas,nat->arst", x, x, x) / n
    return second, third


def _aligned_rotation(white_z: torch.Tensor, white_p: torch.Tensor, z2: torch.Tensor,
                      p2: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Orthogonal ``Q`` with ``Q·A_ab·Qᵀ ≈ B_ab`` for the whitened cross moments ``A`` (of
    ``z``) and ``B`` (of the public patches): eigenvectors of one random combination,
    their signs from a second."""
    a = torch.einsum("rs,abst,ut->abru", white_z, z2, white_z)
    b = torch.einsum("rs,abst,ut->abru", white_p, p2, white_p)
    c1, c2 = torch.randn(2, *a.shape[:2], generator=gen, dtype=a.dtype)
    a1, b1 = torch.einsum("ab,abrs->rs", c1, a), torch.einsum("ab,abrs->rs", c1, b)
    _, u = torch.linalg.eigh(a1 + a1.T)
    _, v = torch.linalg.eigh(b1 + b1.T)
    m1 = u.T @ torch.einsum("ab,abrs->rs", c2, a) @ u
    m2 = v.T @ torch.einsum("ab,abrs->rs", c2, b) @ v
    ref = int(m2.abs().sum(0).argmax())
    signs = torch.sign(m1[:, ref] * m2[:, ref])
    signs[signs == 0] = 1
    signs[ref] = 1
    return v @ torch.diag(signs) @ u.T


def _fit_content_map(z: torch.Tensor, public: torch.Tensor, seed: int,
                     restarts: int = _MOMENT_RESTARTS) -> torch.Tensor:
    """``R`` ``[P, r]`` with ``R z`` matching the public patches' moments: the second
    between every two positions (which pins ``R`` down to a sign) and the third at each
    position (which fixes the sign)."""
    z2, z3 = _moments(z)
    p2, p3 = _moments(public - public.mean(0))
    scale2, scale3 = p2.pow(2).sum(), p3.pow(2).sum().clamp_min(1e-30)

    def loss(r: torch.Tensor) -> torch.Tensor:
        m2 = torch.einsum("pr,abrs,qs->abpq", r, z2, r)
        m3 = torch.einsum("ut,arst->arsu", r, z3)
        m3 = torch.einsum("qs,arsu->arqu", r, m3)
        m3 = torch.einsum("pr,arqu->apqu", r, m3)
        return (m2 - p2).pow(2).sum() / scale2 + (m3 - p3).pow(2).sum() / scale3

    def sqrtm(c: torch.Tensor, power: float) -> torch.Tensor:
        e, v = torch.linalg.eigh(c)
        return v @ torch.diag(e.clamp_min(e.max() * 1e-6) ** power) @ v.T

    # R = P^½ Q Z^-½ matches the pooled second moments for any orthogonal Q; the starts
    # are Q from aligning the eigenvectors of random combinations of the whitened cross
    # moments (they are similar matrices, Q·A·Qᵀ = B), then random rotations.
    eye = torch.eye(z.shape[2], dtype=z.dtype)
    pooled_z = z2.diagonal(dim1=0, dim2=1).mean(-1) + 1e-9 * eye
    pooled_p = p2.diagonal(dim1=0, dim2=1).mean(-1)
    left, right = sqrtm(pooled_p, 0.5), sqrtm(pooled_z, -0.5)
    gen = torch.Generator().manual_seed(seed)
    starts = [_aligned_rotation(right, sqrtm(pooled_p, -0.5), z2, p2, gen)]
    starts += [torch.linalg.qr(torch.randn(len(eye), len(eye), generator=gen,
                                           dtype=z.dtype))[0] for _ in range(restarts - 1)]
    best, best_loss = None, float("inf")
    for q in starts:
        r0 = left @ q @ right
        r0 = min((r0, -r0), key=lambda r: loss(r).item())  # the sign: third moments
        r = r0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([r], max_iter=200, line_search_fn="strong_wolfe")

        def closure(r=r, opt=opt) -> torch.Tensor:
            opt.zero_grad()
            value = loss(r)
            value.backward()
            return value

        opt.step(closure)
        value = loss(r).item()
        if value < best_loss:
            best, best_loss = r.detach(), value
    return best


@torch.no_grad()
def blind(tokens: torch.Tensor, knowledge: Knowledge, seed: int = 0,
          quick: bool = False) -> Attempt:
    """Positions and images from tokens alone (plus public images and the public patch
    size): no head weights, no position embedding. ``quick``: fewer random restarts of
    the moment fit (CI)."""
    config = knowledge.config
    n_pos, rank = config.n_tokens, config.in_chans * config.patch_size**2
    t = check_tokens(tokens, n_pos, config.embed_dim)
    if len(t) < 2 * rank:
        raise ValueError(f"the blind attack needs at least {2 * rank} images, got {len(t)}")
    rank = min(rank, config.embed_dim)
    labels, basis = _cluster(t, rank)
    grouped = place(t, labels)  # [n, cluster, D]
    z = (grouped - grouped.mean(0)) @ basis  # [n, cluster, r]
    public = knowledge.public_patches()
    grid_of_cluster = torch.from_numpy(_match_to_grid(
        _canonical_similarity(z), _canonical_similarity(public - public.mean(0)), config.grid,
        seed))
    z = z[:, torch.argsort(grid_of_cluster)]  # clusters in grid order
    with torch.enable_grad():
        content_map = _fit_content_map(z, public, seed, 2 if quick else _MOMENT_RESTARTS)
    patches = z @ content_map.T + public.mean(0)
    lo, hi = knowledge.pixel_range
    positions = grid_of_cluster[labels]
    return Attempt(positions=positions,
                   images=patches_to_images(patches.clamp(lo, hi), config).float())
