"""What the audit's attacks must achieve on the defences they are known to break.

``smsd audit --quick`` (run in CI) fails when one of these stops holding: a broken
attack must not look like privacy. Each bound sits well below what the attack reaches
on the demo configuration (docs/privacy.md has the figures) and far above the
reference levels, so only a real regression trips it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .report import AuditReport

__all__ = ["EXPECTATIONS", "Expectation", "failed_expectations"]


@dataclass(frozen=True)
class Expectation:
    """On ``defence``, ``attack`` puts back at least ``positions`` of the textured patches
    and reconstructs at least ``psnr_over_mean`` dB above the mean-image reference."""

    defence: str
    attack: str
    positions: float | None = None
    psnr_over_mean: float | None = None


EXPECTATIONS: tuple[Expectation, ...] = (
    Expectation("permutation only", "pseudo-inverse", positions=0.95, psnr_over_mean=30.0),
    Expectation("permutation only", "nearest position", positions=0.9),
    Expectation("permutation only", "prior + linear MMSE", positions=0.95, psnr_over_mean=30.0),
    Expectation("permutation only", "inverse network", positions=0.9, psnr_over_mean=10.0),
    Expectation("noise σ=0.5", "prior + linear MMSE", positions=0.6, psnr_over_mean=5.0),
    Expectation("secret head seed", "blind", positions=0.8, psnr_over_mean=5.0),
    Expectation("secret head seed", "prior + linear MMSE, colluder's head", positions=0.95,
                psnr_over_mean=15.0),
    Expectation("no position embedding", "jigsaw, best shift ≤ 2", psnr_over_mean=10.0),
)


def failed_expectations(report: AuditReport,
                        expectations: tuple[Expectation, ...] = EXPECTATIONS) -> list[str]:
    """One line per expectation that does not hold (or whose row is missing) in
    ``report``; expectations on defences or attacks the report did not run are skipped."""
    rows = {(r.defence, r.attack): r for r in report.rows}
    defences = {r.defence for r in report.rows}
    attacks = set(report.context.get("attacks", ()))
    mean = rows.get(("reference", "mean image"))
    failures = []
    for e in expectations:
        if e.defence not in defences or e.attack.split(", ")[0] not in attacks:
            continue
        row = rows.get((e.defence, e.attack))
        if row is None:
            failures.append(f"{e.defence} / {e.attack}: the row is missing")
            continue
        if e.positions is not None and (row.positions_textured or 0.0) < e.positions:
            failures.append(f"{e.defence} / {e.attack}: {100 * (row.positions_textured or 0):.1f}"
                            f" % of textured positions < {100 * e.positions:.0f} %")
        if e.psnr_over_mean is not None and mean is not None:
            floor = mean.psnr_db + e.psnr_over_mean
            if row.psnr_db is None or row.psnr_db < floor:
                failures.append(f"{e.defence} / {e.attack}: PSNR {row.psnr_db} dB < "
                                f"{floor:.1f} (mean image + {e.psnr_over_mean})")
    return failures
