"""A fine-tuned model file scored on a labeled image folder (``smsd evaluate``)."""

from __future__ import annotations

from os import PathLike

import numpy as np
import torch

from ..data import ImageSource, make_loader
from ..errors import SmsdError
from .classifier_io import load_classifier
from .client import Client
from .clinical import Evaluation, evaluate_predictions, resolve_positive
from .training import TokenClassifier

__all__ = ["Evaluation", "evaluate_model_file", "score_loader"]


def evaluate_model_file(path: str | PathLike, data: str | PathLike, *, loader: str = "auto",
                        positive: str | None = None, progress: bool = False) -> Evaluation:
    """Load ``path`` (from ``smsd finetune``), check its head, and score it on the labeled
    folder ``data`` (read by ``loader`` at the model's size): every metric of
    :func:`~smsd.protocol.clinical.evaluate_predictions`. The folder's classes are matched
    to the model's by name; a class the model never saw is an error, one missing from the
    folder keeps its row. ``positive``: the positive class of a two-class model (default:
    the second in sorted order). ``progress``: a progress bar on a terminal's stderr."""
    model, config, classes, fingerprint = load_classifier(path)
    resolve_positive(classes, positive)  # checked before any image is read
    client = Client.for_trained(config, fingerprint, str(path))
    source = ImageSource.from_folder(data)
    found = list(source.classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise SmsdError(f"{data} has classes the model was not trained on: {unknown}")
    images = make_loader(source, img_size=config.img_size, in_chans=config.in_chans,
                         mode="eval", loader=loader)
    labels, probabilities = score_loader(model, client, images, progress=progress)
    # Map the folder's label numbers onto the model's class order.
    remap = np.array([classes.index(name) for name in found])
    return evaluate_predictions(remap[labels], probabilities, classes, positive=positive)


@torch.no_grad()
def score_loader(model: TokenClassifier, client: Client, loader, *,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(labels [n], softmax probabilities [n, K])`` of one pass over ``loader``, batch
    by batch (a tqdm bar when ``progress`` and stderr is a terminal)."""
    from tqdm.auto import tqdm

    model.eval()
    labels, probabilities = [], []
    with tqdm(total=loader.num_samples, desc="evaluate", unit="img",
              disable=None if progress else True) as bar:
        for batch in loader:
            logits = model(client.tokens(batch.images).float())
            probabilities.append(torch.softmax(logits.double(), dim=-1).cpu())
            labels.append(batch.labels.cpu())
            bar.update(len(batch.labels))
    if not labels:
        raise ValueError("the loader yielded no images: there is nothing to evaluate")
    return torch.cat(labels).numpy(), torch.cat(probabilities).numpy()


def probe_model_file(path: str | PathLike, reference: str | PathLike, data: str | PathLike, *,
                     linear: bool = False, loader: str = "auto",
                     progress: bool = False) -> dict:
    """k-NN (and with ``linear`` a linear probe) of the body of ``path`` on frozen CLS
    features: the labeled folder ``reference`` votes / trains, ``data`` is scored
    (:mod:`smsd.protocol.probes`). Classes are matched by name. Returns accuracies in %."""
    from .probes import KNN_K, KNN_TEMPERATURE, cls_features, knn_accuracy, linear_probe_accuracy

    model, config, _, fingerprint = load_classifier(path)
    client = Client.for_trained(config, fingerprint, str(path))
    sources = {name: ImageSource.from_folder(folder)
               for name, folder in (("reference", reference), ("data", data))}
    names = sorted(set(sources["reference"].classes) | set(sources["data"].classes))
    feats = {}
    for name, source in sources.items():
        images = make_loader(source, img_size=config.img_size, in_chans=config.in_chans,
                             mode="eval", loader=loader)
        tokens, labels = client._tokens_and_labels(images, None,
                                                   f"read {name}" if progress else None)
        remap = torch.tensor([names.index(c) for c in source.classes])
        feats[name] = (cls_features(model.body, tokens), remap[labels])
    result = {"knn": {"k": KNN_K, "temperature": KNN_TEMPERATURE,
                      "accuracy": round(100 * knn_accuracy(*feats["reference"],
                                                           *feats["data"]), 2)},
              "reference_images": int(feats["reference"][1].numel()),
              "data_images": int(feats["data"][1].numel())}
    if linear:
        result["linear"] = {"accuracy": round(100 * linear_probe_accuracy(
            *feats["reference"], *feats["data"]), 2)}
    return result
