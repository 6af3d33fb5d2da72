"""An :class:`~smsd.protocol.clinical.Evaluation` as a text table, JSON and PNG plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..io import atomic_write_bytes, write_with
from .clinical import Evaluation

__all__ = ["CONFUSION_PNG", "ROC_PNG", "format_report", "json_text", "write_json",
           "write_plots"]

CONFUSION_PNG, ROC_PNG = "confusion_matrix.png", "roc_curve.png"
JSON_FORMAT = "smsd-evaluation"


def _f(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


def format_report(ev: Evaluation, title: str | None = None) -> str:
    """Per-class rows, the averages, the overall rows, the two-class block and the
    confusion matrix, as aligned text."""
    w = max(14, *(len(c) + 2 for c in ev.classes))
    lines = [title, ""] if title else []
    lines.append(f"{'class':<{w}}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}")
    for c in (*ev.per_class, ev.macro, ev.weighted):
        lines.append(f"{c.name:<{w}}{_f(c.precision):>10}{_f(c.recall):>8}{_f(c.f1):>8}"
                     f"{c.support:>9}")
    lines += ["", f"{'accuracy':<20}{_f(ev.accuracy):>8}  on {ev.images} images",
              f"{'balanced accuracy':<20}{_f(ev.balanced_accuracy):>8}  mean recall of the "
              "classes present"]
    b = ev.binary
    if b is not None:
        how = " (default: the second class in sorted order)" if b.positive_is_default else ""
        rows = [(f"sensitivity (recall of {b.positive})", b.sensitivity),
                (f"specificity (recall of {b.negative})", b.specificity),
                (f"PPV (precision of {b.positive})", b.ppv),
                (f"NPV (precision of {b.negative})", b.npv),
                (f"ROC-AUC (softmax P({b.positive}))", b.roc_auc)]
        lw = max(len(label) for label, _ in rows) + 2
        lines += ["", f"positive class: {b.positive}{how}"]
        lines += [f"{label:<{lw}}{_f(value):>8}" for label, value in rows]
        if b.note:
            lines.append(b.note)
    cw = [max(5, len(c)) + 2 for c in ev.classes]
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)",
              f"{'':<{w}}" + "".join(f"{c:>{n}}" for c, n in zip(ev.classes, cw, strict=True))]
    for name, row in zip(ev.classes, ev.confusion, strict=True):
        lines.append(f"{name:<{w}}" + "".join(f"{v:>{n}}" for v, n in zip(row, cw, strict=True)))
    never = [c.name for c in ev.per_class if not math.isfinite(c.precision)]
    notes = [f"no recall for {', '.join(ev.absent)}: no images in the data"] if ev.absent else []
    notes += [f"no precision for {', '.join(never)}: never predicted"] if never else []
    if notes:
        lines += ["", f"n/a: undefined, left out of the averages ({'; '.join(notes)})"]
    return "\n".join(lines)


def json_text(ev: Evaluation, **context: object) -> str:
    """All the numbers as JSON (strict: no NaN), after ``context`` (model, data...)."""
    payload = {"format": JSON_FORMAT, "version": 1, **context, **ev.to_dict()}
    return json.dumps(payload, indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, ev: Evaluation, **context: object) -> Path:
    """:func:`json_text` written atomically to ``path``."""
    atomic_write_bytes(path, json_text(ev, **context).encode())
    return Path(path)


def write_plots(ev: Evaluation, folder: str | os.PathLike) -> list[Path]:
    """``confusion_matrix.png`` and, for a two-class model with both classes in the data,
    ``roc_curve.png`` in ``folder`` (created); returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [_save(_confusion_figure(ev), folder / CONFUSION_PNG)]
    if ev.binary is not None and ev.binary.roc is not None:
        written.append(_save(_roc_figure(ev), folder / ROC_PNG))
    return written


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)  # no pyplot: the caller's backend and figures stay as they are
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path


def _confusion_figure(ev: Evaluation):
    k = len(ev.classes)
    side = 2.5 + 0.6 * k
    fig = _figure((side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(ev.confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    top = max(max(row) for row in ev.confusion)
    for i, row in enumerate(ev.confusion):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center",
                    color="white" if count > top / 2 else "black")
    ax.set_xticks(range(k), ev.classes, rotation=45 if k > 3 else 0,
                  ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), ev.classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix ({ev.images} images)")
    return fig


def _roc_figure(ev: Evaluation):
    b = ev.binary
    fig = _figure((4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot(b.roc.fpr, b.roc.tpr, label=f"ROC (AUC {b.roc_auc:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="chance")
    ax.plot([1 - b.specificity], [b.sensitivity], "o", color="C3",
            label="the model's predictions (argmax)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"ROC: {b.positive} (positive) vs {b.negative}")
    ax.legend(loc="lower right", fontsize=8)
    return fig
