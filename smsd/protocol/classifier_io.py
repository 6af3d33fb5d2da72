"""Save and load a fine-tuned classifier (body + linear tail) with its class names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..io import write_with
from ..models import ClassifierTail, ViTBody, ViTConfig
from .body_io import FILE_VERSION, BodyFileError, build_model, read_model_file
from .training import TokenClassifier

__all__ = ["CLASSIFIER_FORMAT", "load_classifier", "save_classifier"]

CLASSIFIER_FORMAT = "smsd-vit-classifier"
_FIELDS = frozenset({"format", "version", "model_config", "classes", "head_fingerprint"})


def save_classifier(path: str | os.PathLike, model: TokenClassifier, *, classes: list[str],
                    head_fingerprint: str) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in model.state_dict().items()}
    metadata = {"format": CLASSIFIER_FORMAT, "version": FILE_VERSION,
                "model_config": model.body.config.to_json(), "classes": json.dumps(classes),
                "head_fingerprint": head_fingerprint}
    path = Path(path)
    write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return path


def load_classifier(path: str | os.PathLike) -> tuple[TokenClassifier, ViTConfig, list[str], str]:
    """→ ``(model, model config, class names, head fingerprint)``."""
    path = Path(path)
    meta, state = read_model_file(path, "model file", format=CLASSIFIER_FORMAT, fields=_FIELDS,
                                  kind="smsd classifier file", hint="; fine-tune a body first")
    try:
        config = ViTConfig.from_json(meta["model_config"])
        classes = json.loads(meta["classes"])
    except (ValueError, TypeError) as exc:
        raise BodyFileError(f"model file {path} is malformed: {exc}") from None
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes)):
        raise BodyFileError(f"model file {path} has malformed class names (a list of "
                            "distinct strings is expected)")
    model = build_model(
        lambda: TokenClassifier(ViTBody(config), ClassifierTail(config.embed_dim, len(classes))),
        config, state, path, "model file")
    return model.eval(), config, classes, meta["head_fingerprint"]
