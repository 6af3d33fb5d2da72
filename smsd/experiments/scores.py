"""Scores of ``smsd simulate`` that the label prior cannot win.

A client's local test split has its own label skew (Dirichlet), so a model that only
learned the local prior scores high on it. Besides that accuracy, each client's model is
scored by its balanced accuracy there (mean recall over the classes present) and by its
accuracy on one class-balanced test set shared by every client and method: the clients'
local test images pooled (no method trains on them) and subsampled to the same count per
class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..protocol.training import balanced_accuracy

__all__ = ["ClientScore", "SharedTestSet", "balanced_accuracy", "label_coverage", "score"]


@dataclass(frozen=True)
class SharedTestSet:
    """Token sequences and labels of the shared class-balanced test set."""

    tokens: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def balanced(cls, tokens: torch.Tensor, labels: torch.Tensor, seed: int) -> SharedTestSet:
        """The same number of images of every class present (the rarest class's count),
        drawn with a generator seeded by ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        classes, counts = labels.unique(return_counts=True)
        per_class = int(counts.min())
        picks = []
        for c in classes:
            where = torch.nonzero(labels == c).flatten()
            picks.append(where[torch.randperm(where.numel(), generator=gen)[:per_class]])
        index = torch.cat(picks).sort().values
        return cls(tokens[index], labels[index])

    @property
    def per_class(self) -> int:
        return int(self.labels.unique(return_counts=True)[1].min())


@dataclass(frozen=True)
class ClientScore:
    """One client's model: accuracy and balanced accuracy on its local test split,
    accuracy on the shared balanced set."""

    local: float
    balanced: float
    shared: float


def score(predict, local_tokens: torch.Tensor, local_labels: torch.Tensor,
          shared: SharedTestSet) -> ClientScore:
    """Scores of ``predict`` (token sequences -> predicted classes)."""
    local_pred = predict(local_tokens)
    return ClientScore(local=float((local_pred == local_labels).float().mean()),
                       balanced=balanced_accuracy(local_pred, local_labels),
                       shared=float((predict(shared.tokens) == shared.labels).float().mean()))


def label_coverage(labeled: torch.Tensor, test: torch.Tensor) -> float:
    """The share of the classes in ``test`` that have at least one image in ``labeled``:
    the most balanced accuracy a classifier that learned from ``labeled`` alone can be
    expected to reach (it has no reason to predict a class it never saw)."""
    if test.numel() == 0:
        raise ValueError("cannot score zero test images")
    classes = test.unique()
    return float(torch.isin(classes, labeled.unique()).float().mean())
