"""The metrics clinicians ask for, from a classifier's labels and softmax probabilities.

Everything is computed by :mod:`sklearn.metrics` over the model's classes (``labels=``),
so a class with no image in the data keeps its row (support 0). A value that is
undefined (a class without images has no recall, one never predicted has no precision,
ROC-AUC needs both classes) is ``nan`` here and ``null`` in :meth:`Evaluation.to_dict`;
averages leave it out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import SmsdError

__all__ = ["BinaryMetrics", "ClassMetrics", "Evaluation", "RocCurve", "default_positive",
           "evaluate_predictions", "resolve_positive"]


@dataclass(frozen=True)
class ClassMetrics:
    """One class's row (or an average's: ``name`` is then ``"macro avg"``...)."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class RocCurve:
    """sklearn's ``roc_curve``; the first threshold is ``inf`` (nothing is positive)."""

    fpr: tuple[float, ...]
    tpr: tuple[float, ...]
    thresholds: tuple[float, ...]


@dataclass(frozen=True)
class BinaryMetrics:
    """A two-class model's view: ``positive`` is the condition looked for."""

    positive: str
    negative: str
    positive_is_default: bool  # chosen by default_positive, not given
    sensitivity: float  # recall of the positive class
    specificity: float  # recall of the negative class
    ppv: float  # precision of the positive class (positive predictive value)
    npv: float  # precision of the negative class (negative predictive value)
    roc_auc: float  # on P(positive) from the softmax; nan when undefined
    roc: RocCurve | None
    note: str | None = None  # why ROC-AUC is undefined


@dataclass(frozen=True)
class Evaluation:
    """A classifier scored on labeled images; predictions are the softmax's argmax."""

    accuracy: float
    images: int
    classes: tuple[str, ...]  # the model's, in its output order
    balanced_accuracy: float  # mean recall over the classes present in the data
    per_class: tuple[ClassMetrics, ...]
    macro: ClassMetrics
    weighted: ClassMetrics
    confusion: tuple[tuple[int, ...], ...]  # [true][predicted], in ``classes`` order
    binary: BinaryMetrics | None  # two-class models only

    @property
    def absent(self) -> tuple[str, ...]:
        """The model's classes with no image in the data."""
        return tuple(c.name for c in self.per_class if c.support == 0)

    def to_dict(self) -> dict:
        """Every number, JSON-ready (undefined values and ``inf`` are ``None``)."""
        out = {"images": self.images, "classes": list(self.classes),
               "absent_classes": list(self.absent), "accuracy": _num(self.accuracy),
               "balanced_accuracy": _num(self.balanced_accuracy),
               "per_class": {c.name: _row(c) for c in self.per_class},
               "macro_avg": _row(self.macro), "weighted_avg": _row(self.weighted),
               "confusion_matrix": {"rows": "true class", "columns": "predicted class",
                                    "labels": list(self.classes),
                                    "matrix": [list(r) for r in self.confusion]},
               "binary": None}
        b = self.binary
        if b is not None:
            out["binary"] = {
                "positive": b.positive, "negative": b.negative,
                "positive_chosen": ("default: the second class in sorted order"
                                    if b.positive_is_default else "given"),
                "sensitivity": _num(b.sensitivity), "specificity": _num(b.specificity),
                "ppv": _num(b.ppv), "npv": _num(b.npv), "roc_auc": _num(b.roc_auc),
                "roc_score": f"softmax probability of {b.positive}", "note": b.note,
                "roc_curve": None if b.roc is None else {
                    "fpr": [_num(v) for v in b.roc.fpr], "tpr": [_num(v) for v in b.roc.tpr],
                    "thresholds": [_num(v) for v in b.roc.thresholds]}}
        return out


def _num(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _row(c: ClassMetrics) -> dict:
    return {"precision": _num(c.precision), "recall": _num(c.recall), "f1": _num(c.f1),
            "support": c.support}


def default_positive(classes: Sequence[str]) -> str:
    """The positive class of a two-class model when none is given: the second class in
    sorted order (``benign``/``malignant`` → ``malignant``, ``0``/``1`` → ``1``)."""
    return sorted(classes)[1]


def resolve_positive(classes: Sequence[str], positive: str | None) -> str | None:
    """``positive`` checked against the model's classes, or the default for two classes;
    ``None`` for a model with another number of classes."""
    if len(classes) != 2:
        if positive is not None:
            raise SmsdError(f"positive: {positive!r} was given, but a positive class (sensitivity, "
                            f"specificity, ROC-AUC) needs a two-class model; this one has "
                            f"{len(classes)} classes {list(classes)}")
        return None
    if positive is None:
        return default_positive(classes)
    if positive not in classes:
        raise SmsdError(f"positive must be one of the model's classes {list(classes)}, "
                        f"got {positive!r}")
    return positive


def evaluate_predictions(labels, probabilities, classes: Sequence[str], *,
                         positive: str | None = None) -> Evaluation:
    """Score softmax ``probabilities`` ``[n, K]`` against true ``labels`` ``[n]`` (indices
    into ``classes``, the model's K class names). ``positive``: the positive class of a
    two-class model (default: :func:`default_positive`)."""
    from sklearn import metrics
    from sklearn.exceptions import UndefinedMetricWarning

    classes = tuple(classes)
    y = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(probabilities, dtype=np.float64)
    k = len(classes)
    if y.ndim != 1 or y.size == 0 or scores.shape != (y.size, k):
        raise ValueError(f"need labels [n > 0] and probabilities [n, {k}], got labels "
                         f"{list(y.shape)} and probabilities {list(scores.shape)}")
    if y.min() < 0 or y.max() >= k or not np.isfinite(scores).all():
        raise ValueError(f"labels must lie in 0..{k - 1} and probabilities must be finite")
    chosen = resolve_positive(classes, positive)
    pred = scores.argmax(axis=1)
    every = list(range(k))
    with warnings.catch_warnings():  # undefined values are reported as nan, by design
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")

        def prfs(average: str | None):
            return metrics.precision_recall_fscore_support(
                y, pred, labels=every, average=average, zero_division=np.nan)

        p, r, f, s = prfs(None)
        per_class = tuple(ClassMetrics(name, float(p[i]), float(r[i]), float(f[i]), int(s[i]))
                          for i, name in enumerate(classes))
        macro, weighted = (ClassMetrics(f"{avg} avg", *map(float, prfs(avg)[:3]), int(y.size))
                           for avg in ("macro", "weighted"))
        balanced = float(metrics.balanced_accuracy_score(y, pred))
    binary = None
    if chosen is not None:
        binary = _binary(y, scores, classes, chosen, per_class,
                         positive_is_default=positive is None)
    return Evaluation(
        accuracy=float(metrics.accuracy_score(y, pred)), images=int(y.size), classes=classes,
        balanced_accuracy=balanced, per_class=per_class, macro=macro, weighted=weighted,
        confusion=tuple(tuple(int(v) for v in row)
                        for row in metrics.confusion_matrix(y, pred, labels=every)),
        binary=binary)


def _binary(y: np.ndarray, scores: np.ndarray, classes: tuple[str, ...], positive: str,
            per_class: tuple[ClassMetrics, ...], *, positive_is_default: bool) -> BinaryMetrics:
    from sklearn import metrics

    pos = classes.index(positive)
    neg = 1 - pos
    truth = (y == pos).astype(np.int64)
    auc, roc, note = math.nan, None, None
    if 0 < truth.sum() < truth.size:
        auc = float(metrics.roc_auc_score(truth, scores[:, pos]))
        fpr, tpr, thresholds = metrics.roc_curve(truth, scores[:, pos])
        roc = RocCurve(tuple(map(float, fpr)), tuple(map(float, tpr)),
                       tuple(map(float, thresholds)))
    else:
        only = classes[pos] if truth.sum() else classes[neg]
        note = f"ROC-AUC is undefined: the data has only {only} images (it needs both classes)"
    return BinaryMetrics(
        positive=positive, negative=classes[neg], positive_is_default=positive_is_default,
        sensitivity=per_class[pos].recall, specificity=per_class[neg].recall,
        ppv=per_class[pos].precision, npv=per_class[neg].precision, roc_auc=auc, roc=roc,
        note=note)
