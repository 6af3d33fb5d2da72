"""The privacy budget ε of the token noise, as a Gaussian mechanism.

A client releases ``W·patch + b + pos + N(0, σ² I)`` once. With pixels in
``[lo, hi]`` (the loaders normalize to it; this is the clipping bound), two patches differ
by at most ``(hi − lo)·√P`` in L2, so a token by ``‖W‖₂·(hi − lo)·√P`` (``‖W‖₂``: the
spectral norm of the client's head); a whole image (all ``N`` tokens) by
``‖W‖₂·(hi − lo)·√(N·P)``. The permutation and the fp16 rounding are ignored (they add no
guarantee). ε at δ comes from Google's ``dp-accounting`` (its RDP accountant: an upper
bound, exact enough here and fast for the tiny noise multipliers of this use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..extras import require
from ..models import PatchHead

__all__ = ["NoiseBudget", "gaussian_epsilon", "noise_budget"]

DELTA = 1e-5


def gaussian_epsilon(noise_multiplier: float, delta: float = DELTA) -> float:
    """ε of one Gaussian mechanism with noise std = ``noise_multiplier`` × L2 sensitivity."""
    require("audit", "dp_accounting", purpose="the noise rows' ε")
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    if not noise_multiplier > 0:
        return float("inf")
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier))
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class NoiseBudget:
    """ε per patch and per image at ``delta``, and the sensitivities they use."""

    noise_std: float
    delta: float
    patch_sensitivity: float
    image_sensitivity: float
    epsilon_per_patch: float
    epsilon_per_image: float


def noise_budget(head: PatchHead, noise_std: float,
                 pixel_range: tuple[float, float] = (-1.0, 1.0),
                 delta: float = DELTA) -> NoiseBudget:
    """The budget of ``noise_std`` on the tokens of ``head`` (the client's head)."""
    weight = head.patch_embed.proj.weight.detach().double()
    weight = weight.reshape(weight.shape[0], -1)
    norm = torch.linalg.matrix_norm(weight, ord=2).item()
    width = pixel_range[1] - pixel_range[0]
    patch = norm * width * weight.shape[1] ** 0.5
    image = patch * head.config.n_tokens ** 0.5
    return NoiseBudget(noise_std, delta, patch, image,
                       gaussian_epsilon(noise_std / patch, delta) if noise_std else float("inf"),
                       gaussian_epsilon(noise_std / image, delta) if noise_std else float("inf"))
