"""Prior-aware attack with the head known: likelihood un-shuffling + linear MMSE.

The attacker fits a Gaussian model of the images from public ones (same kind, disjoint
from the attacked ones). Per grid position ``j`` a patch is ``N(μ_j, Σ_j)``, so a token
there is ``N(W μ_j + b + pos_j, W Σ_j Wᵀ + s² I)`` with ``s²`` the noise variance plus the
fp16 rounding of the shard. Each slot's cost at position ``j`` is its negative
log-likelihood; each image's slots go to distinct positions by a minimum-cost
assignment. The image is then the linear MMSE (Wiener) estimate under a whole-image
Gaussian prior (Ledoit–Wolf covariance of the public images), which also uses the
correlation between neighbouring patches:
``x̂ = μ + (Σ⁻¹ + Aᵀ A / s²)⁻¹ Aᵀ (y − A μ − c) / s²``, ``A = I_N ⊗ W``.
"""

from __future__ import annotations

import torch

from ..extras import require
from .attacks import _head_parts, assign
from .knowledge import Attempt, Knowledge, check_tokens, patches_to_images, place

__all__ = ["GaussianPrior", "prior_mmse", "token_variance"]

_RIDGE = 1e-4  # per-position patch covariance ridge: blank patches have Σ_j = 0


class GaussianPrior:
    """Gaussian image model from public patches ``[m, N, P]`` (fp64, grid order)."""

    def __init__(self, patches: torch.Tensor) -> None:
        require("audit", "sklearn", purpose="the prior-aware attack (Ledoit–Wolf covariance)")
        from sklearn.covariance import LedoitWolf

        m, n_pos, p = patches.shape
        if m < 2:
            raise ValueError(f"the prior needs at least 2 public images, got {m}")
        self.patch_mean = patches.mean(0)  # [N, P]
        centred = patches - self.patch_mean
        eye = torch.eye(p, dtype=patches.dtype)
        self.patch_cov = torch.einsum("mnp,mnq->npq", centred, centred) / (m - 1) + _RIDGE * eye
        flat = patches.reshape(m, n_pos * p)
        self.mean = flat.mean(0)
        self.cov = torch.from_numpy(LedoitWolf().fit(flat.numpy()).covariance_)


def token_variance(tokens: torch.Tensor, noise_std: float) -> float:
    """Per-value variance of what the head does not explain: the client's noise plus the
    shard's fp16 rounding (uniform over half an ulp ≈ 2⁻¹¹ of the value)."""
    rms = tokens.pow(2).mean().sqrt().item()
    return noise_std**2 + (rms * 2.0**-11) ** 2 / 3


def _likelihood_cost(tokens: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                     prior: GaussianPrior, variance: float) -> torch.Tensor:
    """``[n, N, N]``: negative log-likelihood (up to a constant) of slot ``i`` at ``j``."""
    n, slots, d = tokens.shape
    flat = tokens.reshape(-1, d)
    cost = torch.empty(n * slots, len(offsets), dtype=tokens.dtype)
    eye = torch.eye(d, dtype=tokens.dtype)
    for j in range(len(offsets)):
        cov = weight @ prior.patch_cov[j] @ weight.T + variance * eye
        chol = torch.linalg.cholesky(cov)
        mean = weight @ prior.patch_mean[j] + offsets[j]
        white = torch.linalg.solve_triangular(chol, (flat - mean).T, upper=False)
        cost[:, j] = white.pow(2).sum(0) + 2 * chol.diagonal().log().sum()
    return cost.reshape(n, slots, len(offsets))


def wiener(tokens_in_grid: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
           prior: GaussianPrior, variance: float) -> torch.Tensor:
    """Linear MMSE patches ``[n, N, P]`` from tokens already in grid order ``[n, N, D]``."""
    n, n_pos, _ = tokens_in_grid.shape
    p = weight.shape[1]
    gram = weight.T @ weight
    precision = torch.linalg.inv(prior.cov) + torch.block_diag(*[gram] * n_pos) / variance
    mean = prior.mean.reshape(n_pos, p)
    residual = tokens_in_grid - offsets - mean @ weight.T  # y − A μ − c
    back = (residual @ weight).reshape(n, n_pos * p) / variance  # Aᵀ(...) / s²
    update = torch.linalg.solve(precision, back.T).T
    return (prior.mean + update).reshape(n, n_pos, p)


@torch.no_grad()
def prior_mmse(tokens: torch.Tensor, knowledge: Knowledge) -> Attempt:
    """Un-shuffle by per-position likelihood, reconstruct by linear MMSE (head known)."""
    if knowledge.head is None:
        raise ValueError("prior_mmse needs the head weights (knowledge.head is None)")
    weight, bias, pos = _head_parts(knowledge.head)
    t = check_tokens(tokens, len(pos), len(bias))
    prior = GaussianPrior(knowledge.public_patches())
    variance = token_variance(t, knowledge.noise_std)
    offsets = pos + bias
    positions = assign(_likelihood_cost(t, weight, offsets, prior, variance))
    patches = wiener(place(t, positions), weight, offsets, prior, variance)
    lo, hi = knowledge.pixel_range
    images = patches_to_images(patches.clamp(lo, hi), knowledge.config)
    return Attempt(positions=positions, images=images.float())
