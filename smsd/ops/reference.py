"""Pure-PyTorch reference of every smsd op: the oracle the kernels are tested against.

Each function is written for clarity, not speed, and defines the op's semantics,
edge cases included. Autograd through these functions gives the reference
gradients.
"""

from __future__ import annotations

import torch

__all__ = ["masked_sample"]


def masked_sample(
    x: torch.Tensor, index: torch.Tensor, perm: torch.Tensor | None = None
) -> torch.Tensor:
    """Sample tokens: ``out[b, j] = x[b, index[b, j]]``, or ``x[b, perm[b, index[b, j]]]``.

    With ``perm`` the tokens are first put in the order ``perm`` gives (a client's
    secret permutation) and then sampled. Duplicate indices are allowed: each
    occurrence is an independent copy in the output, and their gradients add up
    in the backward pass (as ``torch.gather``'s do). Rows of ``x`` that no index
    selects receive a zero gradient.
    """
    if perm is not None:
        x = torch.gather(x, 1, perm.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.gather(x, 1, index.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))
