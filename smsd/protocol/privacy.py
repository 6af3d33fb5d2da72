"""Differentially private pre-training: its settings and its privacy accounting.

What is private: the body the server sends back (and the teacher it is taken from),
with respect to adding or removing one image of any client. Each step is one Gaussian
mechanism on a Poisson sample of the images (each image in with probability
``q = batch_size / n``): per image, its gradient (all its views together) clipped to
``clip`` and its contribution to DINO's center clipped to ``center_clip``; Gaussian noise
of ``grad_noise × clip`` and ``center_noise × center_clip`` on the two sums. The teacher
(an EMA of the student) and the center's running average are post-processing of those
releases; KoLeo, which ties images of a batch together, is off. Two Gaussians on one
sample are one Gaussian on the concatenated vector with noise multiplier
``(grad_noise⁻² + center_noise⁻²)^(-1/2)``; ε after ``steps`` steps at ``delta`` comes from
Google's ``dp-accounting`` (RDP accountant, Poisson-subsampled Gaussian).

Not covered: the server's own logs (loss per epoch, stored with the server), and
anything about which clients took part or how many images each holds.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

from ..extras import require

__all__ = ["DPConfig", "calibrate_noise", "effective_noise", "epsilon_spent"]


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings of a pre-training run.

    Give ``epsilon`` (the noise is calibrated to spend it over the whole run) or
    ``noise_multiplier`` (ε is what it spends). ``noise_multiplier`` is the effective
    multiplier of the joint mechanism; the gradient gets ``grad_noise`` and the center
    ``center_noise = center_noise_ratio × grad_noise`` (a larger ratio spends less of
    the budget on the center).
    """

    epsilon: float | None = None
    delta: float = 1e-5
    noise_multiplier: float | None = None
    clip: float = 1.0
    center_clip: float = 1.0
    center_noise_ratio: float = 2.0

    def __post_init__(self) -> None:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of epsilon (--dp-epsilon) and noise_multiplier "
                             "(--dp-noise-multiplier)")
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"--dp-epsilon must be a positive number, got {self.epsilon!r}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"--dp-noise-multiplier must be > 0, got {self.noise_multiplier!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"--dp-delta must be in (0, 1), got {self.delta!r}")
        for name in ("clip", "center_clip", "center_noise_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"dp {name} must be > 0, got {getattr(self, name)!r}")


def _require() -> None:
    require("dp", "dp_accounting", purpose="differentially private pre-training's accountant")


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int,
                  delta: float) -> float:
    """ε at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps (RDP accountant)."""
    _require()
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    if steps == 0:
        return 0.0
    accountant = rdp_privacy_accountant.RdpAccountant()
    with _quiet_absl():
        accountant.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(
            sample_rate, dp_event.GaussianDpEvent(noise_multiplier)), steps))
        return float(accountant.get_epsilon(delta))


def calibrate_noise(epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest effective noise multiplier whose run spends at most ``epsilon``."""
    _require()
    from dp_accounting import dp_event, mechanism_calibration
    from dp_accounting.rdp import rdp_privacy_accountant

    def event(noise: float):
        return dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise)), steps)

    with _quiet_absl():
        return float(mechanism_calibration.calibrate_dp_mechanism(
            rdp_privacy_accountant.RdpAccountant, event, epsilon, delta,
            mechanism_calibration.LowerEndpointAndGuess(1e-2, 1.0), tol=1e-4))


@contextlib.contextmanager
def _quiet_absl():
    """At small noise multipliers some RDP orders do not converge and absl logs each;
    the accountant excludes those orders, which can only loosen (never break) the bound."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def effective_noise(grad_noise: float, center_noise: float) -> float:
    """The joint mechanism's noise multiplier (see the module docstring)."""
    return (grad_noise ** -2 + center_noise ** -2) ** -0.5


@dataclass(frozen=True)
class DPPlan:
    """A run's noise and its cost, fixed before the first step."""

    config: DPConfig
    sample_rate: float
    steps: int
    noise_multiplier: float  # effective, what the accountant sees
    grad_noise: float
    center_noise: float
    epsilon: float

    @classmethod
    def make(cls, config: DPConfig, sample_rate: float, steps: int) -> DPPlan:
        noise = config.noise_multiplier
        if noise is None:
            noise = calibrate_noise(config.epsilon, sample_rate, steps, config.delta)
        # effective = g / sqrt(1 + 1/ratio²)
        grad_noise = noise * math.sqrt(1 + config.center_noise_ratio ** -2)
        return cls(config, sample_rate, steps, noise, grad_noise,
                   grad_noise * config.center_noise_ratio,
                   epsilon_spent(noise, sample_rate, steps, config.delta))

    def spent(self, steps_done: int) -> float:
        return epsilon_spent(self.noise_multiplier, self.sample_rate, steps_done,
                             self.config.delta)

    def record(self) -> dict:
        """What the body's metadata and the metrics say about the guarantee."""
        return {"epsilon": self.epsilon, "delta": self.config.delta,
                "noise_multiplier": self.noise_multiplier, "grad_noise": self.grad_noise,
                "center_noise": self.center_noise, "clip": self.config.clip,
                "center_clip": self.config.center_clip, "sample_rate": self.sample_rate,
                "steps": self.steps, "unit": "one image",
                "accountant": "dp-accounting RDP, Poisson-subsampled Gaussian"}
