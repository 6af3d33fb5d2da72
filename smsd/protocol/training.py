"""Supervised training of body + classifier on (unpermuted) tokens.

Used by :meth:`Client.finetune` and by every baseline of ``smsd simulate``, so that all
methods share one recipe and differ only in where the body starts and what it sees.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checks import positive_ints
from ..models import ClassifierTail
from ..ops import masked_sample, sample_views
from .schedules import cosine_schedule

__all__ = ["PRETRAINED_BODY_LR_SCALE", "FinetuneConfig", "TokenClassifier", "accuracy",
           "balanced_accuracy", "classify", "train_classifier"]

# A pre-trained body is adapted at a fraction of the new tail's LR, as is usual when
# fine-tuning a pre-trained backbone (a random body trains best at the full LR).
# 0.3 came from a 12-epoch probe (docs/simulate-experiments.md); with the demo's defaults
# it gives SMSD +4.3 points on seed 0 and -0.3 (noise) on seed 1 over the full LR.
PRETRAINED_BODY_LR_SCALE = 0.3


@dataclass(frozen=True)
class FinetuneConfig:
    """Local supervised training: AdamW, linear warm-up then cosine LR.

    ``body_lr_scale`` multiplies the body's LR (the new linear tail keeps ``lr``), so a
    pre-trained body is adapted rather than overwritten. ``token_keep`` below 1 trains on
    token subsets: every step shows each image as a fresh random subset of that share of
    its tokens (the views MS-DINO pre-trains on; a position-free body accepts any count);
    evaluation always sees every token.
    """

    epochs: int = 30
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    batch_size: int = 32
    warmup_epochs: int = 2
    freeze_body: bool = False
    body_lr_scale: float = 1.0
    token_keep: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        positive_ints(self, "epochs", "batch_size")
        if not 0 < self.token_keep <= 1:
            raise ValueError(f"token_keep must be in (0, 1], got {self.token_keep!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.body_lr_scale > 0:
            raise ValueError(f"body_lr_scale must be positive, got {self.body_lr_scale!r}")


class TokenClassifier(nn.Module):
    """body → classifier, on head tokens ``[B, N, D]``."""

    def __init__(self, body: nn.Module, tail: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.tail = tail

    @classmethod
    def from_body(cls, body: nn.Module, num_classes: int, *, seed: int) -> TokenClassifier:
        """A copy of ``body`` with a new linear tail whose init is drawn from ``seed``
        (without touching the global RNG), so every method starts from the same tail."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tail = ClassifierTail(body.config.embed_dim, num_classes)
        return cls(copy.deepcopy(body), tail)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(tokens))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Biases, norms and the CLS token are not decayed (DINO/timm convention).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith("cls_token") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def train_classifier(model: TokenClassifier, tokens: torch.Tensor, labels: torch.Tensor,
                     config: FinetuneConfig, *,
                     epoch_data: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
                     progress: bool = False) -> list[float]:
    """Train in place; returns the mean loss of each epoch (``progress``: a bar over the
    epochs, on a terminal).

    ``epoch_data(epoch) -> (tokens, labels)``, when given, supplies each epoch's training
    set instead of ``tokens``/``labels`` (e.g. freshly augmented images); it must hold as
    many images as ``tokens``.
    """
    if tokens.shape[0] != labels.shape[0] or tokens.shape[0] == 0:
        raise ValueError(f"need as many labels as images (>0), got {tokens.shape[0]} images "
                         f"and {labels.shape[0]} labels")
    model.body.requires_grad_(not config.freeze_body)
    groups = [dict(g, lr_scale=config.body_lr_scale)
              for g in param_groups(model.body, config.weight_decay)]
    groups += [dict(g, lr_scale=1.0) for g in param_groups(model.tail, config.weight_decay)]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
    n = tokens.shape[0]
    steps = -(-n // config.batch_size)
    lrs = cosine_schedule(config.lr, config.min_lr, config.epochs, steps, config.warmup_epochs)
    gen = torch.Generator().manual_seed(config.seed)
    model.train()
    history, it = [], 0
    bar = tqdm(range(config.epochs), desc="finetune", unit="epoch",
               disable=None if progress else True)
    for epoch in bar:
        if epoch_data is not None:
            tokens, labels = epoch_data(epoch)
            if tokens.shape[0] != n or labels.shape[0] != n:
                raise ValueError(f"epoch_data({epoch}) gave {tokens.shape[0]} images and "
                                 f"{labels.shape[0]} labels; the training set has {n}")
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, config.batch_size):
            batch = order[start:start + config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[it]) * group["lr_scale"]
            loss = F.cross_entropy(model(_subset(tokens[batch].float(), config.token_keep,
                                                 gen)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            it += 1
        history.append(total / n)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    bar.close()
    model.body.requires_grad_(True)
    model.eval()
    return history


def _subset(tokens: torch.Tensor, keep: float, gen: torch.Generator) -> torch.Tensor:
    """``tokens`` ``[B, N, D]`` as one random subset of ``keep`` of each image's tokens."""
    if keep >= 1:
        return tokens
    index = sample_views(tokens.shape[0], tokens.shape[1], [keep], generator=gen)[0]
    return masked_sample(tokens, index, unique=True)


@torch.no_grad()
def classify(model: nn.Module, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class of each token sequence."""
    model.eval()
    return torch.cat([model(tokens[i:i + batch_size].float()).argmax(-1)
                      for i in range(0, tokens.shape[0], batch_size)])


def accuracy(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions."""
    if tokens.shape[0] == 0:
        raise ValueError("cannot evaluate on zero images")
    return float((classify(model, tokens) == labels).float().mean())


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in ``labels`` of the fraction of that class predicted
    right (scikit-learn's ``balanced_accuracy_score``)."""
    if labels.numel() == 0:
        raise ValueError("cannot score zero images")
    classes = labels.unique()
    recalls = [(pred[labels == c] == c).float().mean() for c in classes]
    return float(torch.stack(recalls).mean())
