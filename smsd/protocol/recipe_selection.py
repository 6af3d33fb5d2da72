"""A client picks its fine-tuning setting on its own labels.

The client holds out a stratified part of its labeled images, trains every candidate
setting on the rest, scores each on the held-out part, and then trains the winner on all
its labels. Nothing but the client's own labeled images decides, so the same selection
can be offered to every method (a pre-trained body, a random one, FedAvg's global model)
without favouring one.

The candidates (:data:`CANDIDATES`) span what a client would try with a body it did not
train: the body adapted at the full LR or at a fraction of it, a shorter run, a frozen
body with a linear probe on top, and training on random token subsets (the views the
body was pre-trained on). A client that received a pre-trained body may also decline it
(:data:`OWN_BODY`: train its own random body instead, as if it had not taken part;
:data:`RETURNED_BODY_CANDIDATES`), so the body is used only where the client's own
held-out labels do not show it to be a handicap. The winner is the highest held-out
accuracy; a tie goes to the higher balanced accuracy, then to the candidate that leaves
the recipe's setting as it is (a few held-out images must show a setting better before
it replaces the tuned one), then to the earlier candidate (so declining the body needs a
strictly better score).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from .training import FinetuneConfig, TokenClassifier, balanced_accuracy, classify, train_classifier

__all__ = ["CANDIDATES", "HOLDOUT_FRACTION", "OWN_BODY", "RETURNED_BODY_CANDIDATES",
           "Candidate", "Selection", "best_candidate", "holdout_split", "select_finetune"]

# The share of every class's labeled images a client holds out to pick its setting.
HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class Candidate:
    """One fine-tuning setting: ``body_lr_scale`` (``None``: the recipe's), the share of
    the recipe's epochs, whether the body is frozen (a linear probe), the share of tokens
    each training step shows (``None``: the recipe's), and ``own_body``: start from the
    client's own random body instead of the one it was given."""

    name: str
    body_lr_scale: float | None = None
    epochs_share: float = 1.0
    freeze_body: bool = False
    token_keep: float | None = None
    own_body: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.epochs_share <= 1:
            raise ValueError(f"epochs_share must be in (0, 1], got {self.epochs_share!r}")
        if self.token_keep is not None and not 0 < self.token_keep <= 1:
            raise ValueError(f"token_keep must be in (0, 1], got {self.token_keep!r}")
        if self.body_lr_scale is not None and not self.body_lr_scale > 0:
            raise ValueError(f"body_lr_scale must be positive, got {self.body_lr_scale!r}")

    def apply(self, config: FinetuneConfig) -> FinetuneConfig:
        """``config`` with this candidate's changes."""
        epochs = max(round(config.epochs * self.epochs_share), 1)
        return replace(config, epochs=epochs,
                       warmup_epochs=min(config.warmup_epochs, epochs - 1),
                       body_lr_scale=(config.body_lr_scale if self.body_lr_scale is None
                                      else self.body_lr_scale),
                       freeze_body=self.freeze_body,
                       token_keep=(config.token_keep if self.token_keep is None
                                   else self.token_keep))


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("body lr x1", body_lr_scale=1.0),
    Candidate("body lr x0.3", body_lr_scale=0.3),
    Candidate("body lr x0.3, 30% epochs", body_lr_scale=0.3, epochs_share=0.3),
    Candidate("linear probe", freeze_body=True),
    Candidate("token subsets 50%", token_keep=0.5),
)

# Declining the returned body: the client's own random body at the full LR (a random body
# trains best at the full LR; :data:`~smsd.protocol.training.PRETRAINED_BODY_LR_SCALE`).
OWN_BODY = Candidate("own random body", body_lr_scale=1.0, own_body=True)

# What a client that received a pre-trained body tries (SMSD's clients, smsd finetune).
RETURNED_BODY_CANDIDATES: tuple[Candidate, ...] = (*CANDIDATES, OWN_BODY)


@dataclass(frozen=True)
class Selection:
    """What a client picked and why: each candidate's held-out accuracy and balanced
    accuracy (fractions), the number of held-out images; ``picked`` is the candidate's
    name (the first candidate when nothing could be held out); ``own_body``: the pick
    starts from the client's own random body (the given body declined)."""

    picked: str
    validation: dict[str, dict[str, float]]
    n_validation: int
    own_body: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def holdout_split(labels: torch.Tensor, fraction: float, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, validation)``: about ``fraction`` of every class held out (at least
    one image of each class keeps training; a class with one image is never held out)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    gen = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in labels.unique():
        where = torch.nonzero(labels == c).flatten()
        where = where[torch.randperm(where.numel(), generator=gen)]
        n_held = min(round(fraction * where.numel()), where.numel() - 1)
        held.append(where[:n_held])
        train.append(where[n_held:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def select_finetune(new_model: Callable[[], TokenClassifier], tokens: torch.Tensor,
                    labels: torch.Tensor, config: FinetuneConfig, *,
                    candidates: Sequence[Candidate] = CANDIDATES,
                    fraction: float = HOLDOUT_FRACTION,
                    train: Callable[[TokenClassifier, torch.Tensor, torch.Tensor,
                                     FinetuneConfig], object] | None = None,
                    new_own_model: Callable[[], TokenClassifier] | None = None,
                    ) -> tuple[FinetuneConfig, Selection]:
    """The setting (``config`` changed by the winning candidate) to train on all labels,
    and the record of the choice (``Selection.own_body``: build the final model with
    ``new_own_model``).

    ``new_model()`` gives a fresh model (the body to start from with its new tail) for every
    trial; ``new_own_model()`` likewise from the client's own random body, for candidates
    with ``own_body`` (required when there are any); ``train(model, tokens, labels,
    config)`` trains one (default: :func:`~smsd.protocol.training.train_classifier`;
    FedAvg passes its federated loop).
    """
    if not candidates:
        raise ValueError("candidates is empty: there is nothing to choose from")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be distinct, got {names}")
    if new_own_model is None and any(c.own_body for c in candidates):
        raise ValueError("a candidate starts from the client's own body (own_body=True): "
                         "pass new_own_model")
    train = train or train_classifier
    fit, held = holdout_split(labels, fraction, config.seed)
    if held.numel() == 0:
        first = candidates[0]
        return first.apply(config), Selection(first.name, {}, 0, own_body=first.own_body)
    scores: dict[str, dict[str, float]] = {}
    for candidate in candidates:
        model = new_own_model() if candidate.own_body else new_model()
        train(model, tokens[fit], labels[fit], candidate.apply(config))
        pred = classify(model, tokens[held])
        scores[candidate.name] = {
            "accuracy": float((pred == labels[held]).float().mean()),
            "balanced": balanced_accuracy(pred, labels[held])}
    best = best_candidate(candidates, scores, recipe=config)
    return best.apply(config), Selection(best.name, scores, int(held.numel()),
                                         own_body=best.own_body)


def best_candidate(candidates: Sequence[Candidate], scores: dict[str, dict[str, float]],
                   recipe: FinetuneConfig | None = None) -> Candidate:
    """The candidate of highest held-out ``accuracy``; ties: higher ``balanced``, then a
    candidate that leaves ``recipe`` unchanged (``c.apply(recipe) == recipe``, on the given
    body), then the earlier candidate."""
    def key(i: int) -> tuple:
        c = candidates[i]
        keeps_recipe = recipe is not None and not c.own_body and c.apply(recipe) == recipe
        return scores[c.name]["accuracy"], scores[c.name]["balanced"], keeps_recipe, -i

    return candidates[max(range(len(candidates)), key=key)]
