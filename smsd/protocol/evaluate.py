"""Accuracy of a fine-tuned model file on a labeled image loader (``smsd evaluate``)."""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

import torch

from ..data import ImageSource, collect, make_loader
from ..errors import SmsdError
from .classifier_io import load_classifier
from .client import Client
from .training import accuracy

__all__ = ["Evaluation", "evaluate_model_file"]


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    images: int


def evaluate_model_file(path: str | PathLike, data: str | PathLike, *,
                        loader: str = "auto") -> Evaluation:
    """Load ``path`` (from ``smsd finetune``), check its head, and score it on the labeled
    folder ``data`` (read by ``loader`` at the model's size). The folder's classes are
    matched to the model's by name; a class the model never saw is an error."""
    model, config, classes, fingerprint = load_classifier(path)
    client = Client.for_trained(config, fingerprint, str(path))
    source = ImageSource.from_folder(data)
    found = list(source.classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise SmsdError(f"{data} has classes the model was not trained on: {unknown}")
    # Map the folder's label numbers onto the model's class order.
    remap = torch.tensor([classes.index(name) for name in found])
    batch = collect(make_loader(source, img_size=config.img_size, in_chans=config.in_chans,
                                mode="eval", loader=loader))
    acc = accuracy(model, client.tokens(batch.images), remap[batch.labels])
    return Evaluation(acc, int(batch.labels.numel()))
