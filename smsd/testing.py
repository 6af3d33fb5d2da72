"""Accuracy rules shared by the tests and ``smsd check``.

The rule (flash-attention's): against a float64 reference, a kernel's max error may
be at most twice the max error of plain PyTorch computing the same thing in the
same dtype, plus one unit in the last place of the output's scale (so that two
exact results, or two that differ only by summation order, both pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Accuracy", "accuracy", "max_error"]


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Max absolute difference in float64; NaN where the NaN pattern differs, inf for shapes."""
    if value.shape != reference.shape:
        return float("inf")
    a, b = value.detach().double().cpu(), reference.detach().double().cpu()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("nan")
    a, b = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)
    if not torch.equal(torch.isinf(a), torch.isinf(b)) or not torch.equal(
        a[torch.isinf(a)], b[torch.isinf(b)]
    ):
        return float("nan")
    finite = torch.isfinite(b)
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


@dataclass(frozen=True)
class Accuracy:
    error: float  # the kernel's max error against the float64 reference
    baseline_error: float  # plain PyTorch's, same dtype
    bound: float

    @property
    def ok(self) -> bool:
        return self.error == self.error and self.error <= self.bound  # NaN fails

    def __str__(self) -> str:
        return f"err {self.error:.3g} <= {self.bound:.3g} (torch err {self.baseline_error:.3g})"


def accuracy(
    value: torch.Tensor, baseline: torch.Tensor, reference: torch.Tensor, factor: float = 2.0
) -> Accuracy:
    """Apply the rule: ``value`` and ``baseline`` (plain PyTorch, same dtype) vs float64."""
    err = max_error(value, reference)
    base = max_error(baseline, reference)
    finite = reference[torch.isfinite(reference)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    ulp = torch.finfo(value.dtype).eps * scale if value.dtype.is_floating_point else 0.0
    return Accuracy(err, base, factor * base + ulp)
