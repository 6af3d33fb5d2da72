"""Accuracy rules shared by the tests and ``smsd check``.

The rule compares a kernel with a float64 reference computed from the same (rounded)
inputs. A kernel passes when its max error is at most

    max(2 x the error of plain PyTorch in the same dtype, the fp32 rounding floor)
    + one unit in the last place of the output's scale.

* **2 x PyTorch** is flash-attention's rule. In half precision the baseline's own
  rounding dominates and the rule adapts to each dtype without magic numbers.
* **The fp32 rounding floor** (:func:`rounding_floor`) is what any backward-stable
  algorithm that accumulates ``n`` terms in fp32 may be off by. Such an algorithm
  returns the exact result of inputs perturbed by about ``sqrt(n) * u`` in relative
  terms (the probabilistic bound of Higham and Mary, 2019; ``u = 2**-24``). So the
  floor is measured, not guessed: the fp64 reference is evaluated again on inputs
  perturbed by ``sqrt(n) * u * N(0, 1)`` and the floor is the largest change of its
  output. This ties the floor to the accumulation length (``n``) and to the problem's
  conditioning (a softmax at temperature 0.1 amplifies its inputs' rounding tenfold,
  and so does the perturbation). Without it, in fp32 the rule compares two
  summation orders: PyTorch's error then depends on which BLAS kernel the CPU gets
  (AVX2 or AVX-512, MKL's CNR modes), and a kernel that sums in another order fails
  on one machine and passes on another.
* **One ulp** of the output's scale lets two exact results pass.

The floor is about 1e-6 relative for the shapes the tests use. A planted bug (a key
dropped by an off-by-one mask, a missing center, a lost rescale) moves outputs by
1e-3 relative or more, far above it (``tests/test_testing.py`` keeps that proven).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["FP32_UNIT_ROUNDOFF", "Accuracy", "accuracy", "max_error", "rounding_floor"]

FP32_UNIT_ROUNDOFF = 2.0**-24


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
    floor: float = 0.0  # the fp32 rounding floor that went into the bound

    @property
    def ok(self) -> bool:
        return self.error == self.error and self.error <= self.bound  # NaN fails

    def __str__(self) -> str:
        floor = f", fp32 floor {self.floor:.3g}" if self.floor else ""
        return (f"err {self.error:.3g} <= {self.bound:.3g} "
                f"(torch err {self.baseline_error:.3g}{floor})")


def accuracy(
    value: torch.Tensor,
    baseline: torch.Tensor,
    reference: torch.Tensor,
    factor: float = 2.0,
    floor: float = 0.0,
) -> Accuracy:
    """Apply the rule: ``value`` and ``baseline`` (plain PyTorch, same dtype) vs float64.

    ``floor`` is the fp32 rounding floor of this output (:func:`rounding_floor`).
    """
    err = max_error(value, reference)
    base = max_error(baseline, reference)
    finite = reference[torch.isfinite(reference)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    ulp = torch.finfo(value.dtype).eps * scale if value.dtype.is_floating_point else 0.0
    return Accuracy(err, base, max(factor * base, floor) + ulp, floor)


def rounding_floor(
    fn: Callable[..., Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    accumulation_length: int,
    *,
    samples: int = 3,
    seed: int = 0,
) -> list[float]:
    """The fp32 rounding floor of each output of ``fn`` (see the module docstring).

    Args:
        fn: the float64 reference, ``fn(*inputs) -> outputs``.
        inputs: float64 tensors, already rounded to the kernel's dtype; only floating
            ones are perturbed (indices pass through).
        accumulation_length: the longest sum an fp32 implementation accumulates
            (the reduction length: K for a loss over K logits, max(N, d) for attention).
        samples: perturbations tried; the floor is the largest change seen.

    Returns:
        One floor per output of ``fn``: the max change of that output.
    """
    if accumulation_length < 1:
        raise ValueError(f"accumulation_length must be >= 1, got {accumulation_length}")
    gen = torch.Generator().manual_seed(seed)
    rel = accumulation_length**0.5 * FP32_UNIT_ROUNDOFF
    exact = [t.detach() for t in fn(*inputs)]
    floors = [0.0] * len(exact)
    for _ in range(samples):
        perturbed = [
            x * (1 + rel * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device))
            if x.is_floating_point() else x
            for x in inputs
        ]
        for i, (a, b) in enumerate(zip(fn(*perturbed), exact, strict=True)):
            floors[i] = max(floors[i], max_error(a.detach(), b))
    return floors
