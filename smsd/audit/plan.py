"""What one audit runs: defences, attacks, sizes and seeds."""

from __future__ import annotations

from dataclasses import dataclass

from .defences import DEFAULT_DEFENCES, Defence

__all__ = ["AuditPlan"]


@dataclass(frozen=True)
class AuditPlan:
    """What to run. ``attacks``: names in :data:`~.catalog.ATTACKS` (default: all);
    ``quick``: the small inverse network and fewer restarts of the blind attack's moment
    fit (CI); ``colluder_images``: known pairs of the colluding client (0: no collusion
    row); ``textured_variance``: the pixel variance above which a patch counts as
    textured; ``max_shift``: the shift, in patches, the jigsaw is also scored up to;
    ``figure_images``: originals shown in the figure; ``seed``: the simulated client's
    secrets and the attacks' restarts; ``device``: where the inverse network trains;
    ``expensive_only_on``: see :meth:`runs`."""

    defences: tuple[Defence, ...] = DEFAULT_DEFENCES
    attacks: tuple[str, ...] | None = None
    quick: bool = False
    colluder_images: int = 100
    textured_variance: float = 0.01
    max_shift: int = 2
    figure_images: int = 8
    seed: int = 0
    device: str = "cpu"
    expensive_only_on: tuple[tuple[str, str], ...] | None = None

    def runs(self, defence: str, attack: str, expensive: bool) -> bool:
        """Whether ``attack`` runs on ``defence``: every attack of the plan does, except
        that an ``expensive`` one is limited to the (defence, attack) pairs of
        ``expensive_only_on`` when that is given (``--quick``: where it is checked)."""
        return not expensive or self.expensive_only_on is None or \
            (defence, attack) in self.expensive_only_on
