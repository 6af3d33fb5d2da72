"""Accuracy rules shared by the tests and ``smsd check``.

The rule compares an implementation with a float64 oracle computed from the same
(rounded) inputs. It passes when, element by element,

    |value - oracle| <= max(2 x the baseline's max error, the fp32 rounding floor)
                        + one ulp of the output's scale (in the baseline's dtype)
                        + the roundings the implementation makes by design.

* **The baseline** is plain PyTorch computing the same thing **in the precision the
  implementation computes in**. Kernels that accumulate in fp32 whatever their input
  dtype (the losses, masked_sample's sums, attention's accumulators) are compared with
  PyTorch in fp32 on the inputs upcast to fp32 (``baseline.dtype == torch.float32``);
  only an implementation that really computes in fp16/bf16 (plain PyTorch itself, the
  ``torch`` backend) gets a baseline in that dtype, flash-attention's rule. A bf16
  baseline's error (0.03-0.08 on a DINO loss of ~38) hid a loss 0.1 % off; an fp32 one
  (~1e-6 relative) does not.
* **The fp32 rounding floor** (:func:`rounding_floor`) is what any backward-stable
  algorithm that accumulates ``n`` terms in fp32 may be off by. Such an algorithm
  returns the exact result of inputs perturbed by about ``sqrt(n) * u`` in relative
  terms (the probabilistic bound of Higham and Mary, 2019; ``u = 2**-24``). So the
  floor is measured, not guessed: the fp64 oracle is evaluated again on inputs
  perturbed by ``sqrt(n) * u * N(0, 1)`` and the floor is the largest change of its
  output. This ties the floor to the accumulation length (``n``) and to the problem's
  conditioning (a softmax at temperature 0.1 amplifies its inputs' rounding tenfold,
  and so does the perturbation). Without it, in fp32 the rule compares two
  summation orders: PyTorch's error then depends on which BLAS kernel the CPU gets
  (AVX2 or AVX-512, MKL's CNR modes), and a kernel that sums in another order fails
  on one machine and passes on another.
* **One ulp** of the output's scale, in the dtype the baseline computes in, lets two
  exact results pass.
* **Roundings by design**, per element. An output stored in a dtype narrower than the
  baseline's (a bf16 gradient computed in fp32) carries one rounding,
  ``|round(x) - x| < eps_dtype |value|`` (to nearest, or toward zero as the Triton
  interpreter's bf16 cast does): the rule adds ``eps_dtype * |value| + eps_dtype *
  tiny_dtype`` (the last term covers subnormals) by itself. A kernel that rounds
  intermediates to the input dtype on purpose (attention's P and dS, as flash-attention
  does) passes their first-order bound as ``rounding`` (componentwise, Higham's
  ``|fl(a.b) - a.b| <= u |a|.|b|``).
* For an output that is a long sum of same-sign terms (a loss), the perturbation floor
  misses the rounding of the sum itself; :func:`summation_floor` (``sqrt(n) u`` times
  the terms' absolute sum) is the floor there.

The floors are 1e-6 to 3e-5 relative for the shapes the tests use. A planted bug (a key
dropped by an off-by-one mask, a missing center, a lost rescale, a loss 0.1 % off, a
gradient 2 % off in bf16) moves outputs far above the bound (``tests/test_testing.py``
keeps that proven).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "FP32_UNIT_ROUNDOFF",
    "Accuracy",
    "accuracy",
    "max_error",
    "output_rounding",
    "rounding_floor",
    "summation_floor",
]

FP32_UNIT_ROUNDOFF = 2.0**-24


def _differences(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor | float:
    """``|value - reference|`` in float64 over the reference's finite entries; NaN where
    the NaN or inf pattern differs, inf for shapes."""
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
    return torch.where(finite, (a - b).abs(), 0.0)


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Max absolute difference in float64; NaN where the NaN pattern differs, inf for shapes."""
    diff = _differences(value, reference)
    if isinstance(diff, float):
        return diff
    return float(diff.max()) if diff.numel() else 0.0


def output_rounding(value: torch.Tensor) -> torch.Tensor:
    """Per element, what one rounding into ``value.dtype`` may have moved it: ``eps |value|``
    plus ``eps * tiny`` for the subnormal range. A rounding to nearest moves ``x`` by at
    most ``u |x| = eps / 2 |x|``; ``eps |value|`` also covers a rounding toward zero (less
    than one ulp of ``value``'s binade), which is what the Triton interpreter's fp32 ->
    bf16 cast does (GPUs round to nearest). float64, same shape as ``value``."""
    info = torch.finfo(value.dtype)
    v = torch.nan_to_num(value.detach().double().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    return info.eps * v.abs() + info.eps * info.tiny


@dataclass(frozen=True)
class Accuracy:
    error: float  # the max error against the float64 oracle
    baseline_error: float  # plain PyTorch's, in the precision the implementation computes in
    bound: float  # on each element's error beyond its rounding allowance
    floor: float = 0.0  # the fp32 rounding floor that went into the bound
    excess: float | None = None  # max over elements of error - allowance (None: no allowance)
    worst: tuple[float, float] = (0.0, 0.0)  # (error, allowance) of the element nearest failing
    baseline_dtype: str = ""
    allowance: str = ""  # what the per-element allowance covers, for the message

    @property
    def ok(self) -> bool:
        err = self.error if self.excess is None else self.excess
        return err == err and err <= self.bound  # NaN fails

    def __str__(self) -> str:
        floor = f", floor {self.floor:.3g}" if self.floor else ""
        if self.excess is None:
            return (f"err {self.error:.3g} <= {self.bound:.3g} "
                    f"(torch err {self.baseline_error:.3g}{floor})")
        err, allowed = self.worst
        return (f"err {self.error:.3g} <= {self.bound:.3g} + {self.allowance} per element "
                f"(torch {self.baseline_dtype} err {self.baseline_error:.3g}{floor}; worst "
                f"element: err {err:.3g} vs {self.bound:.3g} + {allowed:.3g})")


def accuracy(
    value: torch.Tensor,
    baseline: torch.Tensor,
    reference: torch.Tensor,
    factor: float = 2.0,
    floor: float = 0.0,
    *,
    rounding: torch.Tensor | None = None,
) -> Accuracy:
    """Apply the rule (module docstring): ``value`` and ``baseline`` vs the float64 oracle.

    Args:
        value: the implementation's output.
        baseline: plain PyTorch's, computed in the precision the implementation computes
            in (fp32 on upcast inputs for fp32-accumulating kernels). When ``value``'s
            dtype is narrower than the baseline's, one rounding of the output is allowed
            per element (:func:`output_rounding`) and the ulp term is the baseline's.
        reference: the float64 oracle.
        floor: the fp32 rounding floor of this output (:func:`rounding_floor`).
        rounding: extra per-element allowance (float64, ``reference``'s shape) for
            intermediates the implementation rounds to its input dtype by design.
    """
    diff = _differences(value, reference)
    err = diff if isinstance(diff, float) else (float(diff.max()) if diff.numel() else 0.0)
    base = max_error(baseline, reference)
    finite = reference[torch.isfinite(reference)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    computed_in = baseline.dtype if baseline.dtype.is_floating_point else value.dtype
    ulp = torch.finfo(computed_in).eps * scale if computed_in.is_floating_point else 0.0
    bound = max(factor * base, floor) + ulp
    narrower = (value.dtype.is_floating_point and computed_in.is_floating_point
                and torch.finfo(value.dtype).eps > torch.finfo(computed_in).eps)
    if not narrower and rounding is None:
        return Accuracy(err, base, bound, floor)
    allowance = torch.zeros(reference.shape, dtype=torch.float64)
    what = []
    if narrower:
        allowance = allowance + output_rounding(value)
        what.append(f"one {str(value.dtype).removeprefix('torch.')} rounding")
    if rounding is not None:
        allowance = allowance + rounding.detach().double().cpu().abs()
        what.append("the rounded intermediates")
    if isinstance(diff, float):
        return Accuracy(err, base, bound, floor, diff, (diff, 0.0),
                        str(computed_in).removeprefix("torch."), " + ".join(what))
    if diff.numel() == 0:
        excess, worst = 0.0, (0.0, 0.0)
    else:
        excess = float((diff - allowance).max())
        at = int((diff / (bound + allowance)).flatten().nan_to_num(nan=0.0).argmax())
        worst = (float(diff.flatten()[at]), float(allowance.flatten()[at]))
    return Accuracy(err, base, bound, floor, excess, worst,
                    str(computed_in).removeprefix("torch."), " + ".join(what))


def rounding_floor(
    fn: Callable[..., Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    accumulation_length: int,
    *,
    samples: int = 3,
    seed: int = 0,
    unit_roundoff: float = FP32_UNIT_ROUNDOFF,
) -> list[float]:
    """The fp32 rounding floor of each output of ``fn`` (see the module docstring).

    Args:
        fn: the float64 oracle, ``fn(*inputs) -> outputs``.
        inputs: float64 tensors, already rounded to the kernel's dtype; only floating
            ones are perturbed (indices pass through).
        accumulation_length: the longest sum an fp32 implementation accumulates
            (the reduction length: K for a loss over K logits, max(N, d) for attention).
        samples: perturbations tried; the floor is the largest change seen.
        unit_roundoff: of the precision the implementation accumulates in (fp32's by
            default; ``2**-53`` for an fp64 kernel).

    Returns:
        One floor per output of ``fn``: the max change of that output.
    """
    if accumulation_length < 1:
        raise ValueError(f"accumulation_length must be >= 1, got {accumulation_length}")
    gen = torch.Generator().manual_seed(seed)
    rel = accumulation_length**0.5 * unit_roundoff
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


def summation_floor(abs_sum: float, n: int, unit_roundoff: float = FP32_UNIT_ROUNDOFF) -> float:
    """What a sum of ``n`` terms whose absolute values add up to ``abs_sum`` may be off by
    in fp32, in any order: ``sqrt(n) * u * abs_sum`` (the probabilistic forward bound of
    Higham and Mary, 2019). :func:`rounding_floor` perturbs the inputs and misses it where
    an output is less sensitive to its inputs than to the rounding of its own terms: a
    DINO loss is a sum of K * rows non-negative terms ``-q log p`` (about 40 each at
    temperature 0.1) whose change under input perturbations is far smaller when the
    teacher is one-hot; every fp32 implementation is then off by a few ulps of the loss.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return n**0.5 * unit_roundoff * abs(abs_sum)
