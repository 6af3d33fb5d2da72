"""The audit's rows, verdicts and outputs: a Markdown table, JSON and a figure."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..io import atomic_write_bytes, write_with

__all__ = ["AuditReport", "AuditRow", "Verdict", "format_table"]

# "At chance" margins over the mean-image reference (issue #13's rule).
PSNR_MARGIN_DB = 0.5
SSIM_MARGIN = 0.02
POSITION_CHANCE_FACTOR = 2.0


@dataclass(frozen=True)
class AuditRow:
    """One attack (or reference) on one defence's upload; a metric is ``None`` where the
    attack does not produce it. ``positions_textured``: over the patches whose pixel
    variance is above the report's threshold (swapping blank patches leaks nothing)."""

    defence: str
    attack: str
    server_knows: str
    positions_correct: float | None = None
    positions_textured: float | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    seconds: float | None = None
    reference: bool = False


@dataclass(frozen=True)
class Verdict:
    """Whether every attack on a defence stayed at the reference levels."""

    defence: str
    best_attack: str | None
    best_psnr_db: float | None
    at_chance: bool
    reasons: tuple[str, ...]


@dataclass
class AuditReport:
    rows: list[AuditRow]
    verdicts: list[Verdict]
    budgets: dict[str, dict]  # defence → NoiseBudget fields
    context: dict
    figure_images: dict[str, torch.Tensor] = field(default_factory=dict)  # label → [k,C,H,W]

    def rows_of(self, defence: str) -> list[AuditRow]:
        return [r for r in self.rows if r.defence == defence]

    def to_json(self) -> str:
        return json.dumps({**self.context, "rows": [asdict(r) for r in self.rows],
                           "verdicts": [asdict(v) for v in self.verdicts],
                           "budgets": self.budgets}, indent=2, default=_finite) + "\n"

    def write(self, out: Path) -> list[Path]:
        """``audit.json``, ``audit.md`` and (with matplotlib) ``audit.png`` in ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "audit.json", self.to_json().encode())
        atomic_write_bytes(out / "audit.md", (format_table(self) + "\n").encode())
        written = [out / "audit.json", out / "audit.md"]
        if self.figure_images:
            from ..extras import available

            if available("matplotlib"):
                _figure(self.figure_images, self.context.get("pixel_range", (-1.0, 1.0)),
                        out / "audit.png")
                written.append(out / "audit.png")
        return written


def _finite(value: object) -> object:
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _cell(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "—" if value is None or math.isnan(value) else f"{value * scale:.{digits}f}"


def _epsilon(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.3g}"


def verdict(defence: str, rows: list[AuditRow], mean_row: AuditRow, n_tokens: int) -> Verdict:
    """At chance iff every attack has PSNR ≤ mean image + 0.5 dB, SSIM ≤ mean image +
    0.02 and textured positions ≤ 2/N."""
    attacks = [r for r in rows if not r.reference]
    reasons = []
    for r in attacks:
        if r.psnr_db is not None and r.psnr_db > mean_row.psnr_db + PSNR_MARGIN_DB:
            reasons.append(f"{r.attack}: PSNR {r.psnr_db:.1f} dB > mean image "
                           f"{mean_row.psnr_db:.1f} + {PSNR_MARGIN_DB}")
        if r.ssim is not None and r.ssim > mean_row.ssim + SSIM_MARGIN:
            reasons.append(f"{r.attack}: SSIM {r.ssim:.3f} > mean image "
                           f"{mean_row.ssim:.3f} + {SSIM_MARGIN}")
        chance = POSITION_CHANCE_FACTOR / n_tokens
        if r.positions_textured is not None and r.positions_textured > chance:
            reasons.append(f"{r.attack}: {100 * r.positions_textured:.1f} % of textured "
                           f"positions > {100 * chance:.1f} % (2/N)")
    scored = [r for r in attacks if r.psnr_db is not None]
    best = max(scored, key=lambda r: r.psnr_db) if scored else None
    return Verdict(defence, best.attack if best else None, best.psnr_db if best else None,
                   not reasons, tuple(reasons))


def format_table(report: AuditReport) -> str:
    """Markdown: the references, then every defence's rows and verdict."""
    header = ["| defence | attack | server knows | positions % | textured % | PSNR dB | SSIM | s |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    lines = []
    for r in report.rows:
        lines.append(f"| {r.defence} | {r.attack} | {r.server_knows} | "
                     f"{_cell(r.positions_correct, 100)} | {_cell(r.positions_textured, 100)} | "
                     f"{_cell(r.psnr_db)} | {_cell(r.ssim, digits=3)} | "
                     f"{_cell(r.seconds, digits=0)} |")
    verdicts = ["", "| defence | verdict | best attack (PSNR dB) | ε per patch | ε per image |",
                "|---|---|---|---:|---:|"]
    for v in report.verdicts:
        budget = report.budgets.get(v.defence)
        eps = (_epsilon(budget["epsilon_per_patch"]), _epsilon(budget["epsilon_per_image"])) \
            if budget else ("—", "—")
        state = "at chance for these attacks" if v.at_chance else "**images leak**"
        best = f"{v.best_attack} ({v.best_psnr_db:.1f})" if v.best_attack else "—"
        verdicts.append(f"| {v.defence} | {state} | {best} | {eps[0]} | {eps[1]} |")
    return "\n".join(header + lines + (verdicts if report.verdicts else []))


def _figure(images: dict[str, torch.Tensor], pixel_range: tuple[float, float],
            path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(images)
    k = len(next(iter(images.values())))
    fig, axes = plt.subplots(len(labels), k, figsize=(1.1 * k + 2.2, 1.1 * len(labels)),
                             squeeze=False)
    lo, hi = pixel_range
    for row, label in enumerate(labels):
        for col in range(k):
            ax = axes[row][col]
            img = images[label][col].float()
            if img.shape[0] == 1:
                ax.imshow(img[0].clamp(lo, hi).numpy(), cmap="gray", vmin=lo, vmax=hi)
            else:
                ax.imshow(img.permute(1, 2, 0).sub(lo).div(hi - lo).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
