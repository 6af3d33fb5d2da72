"""Save and load a fine-tuned classifier (body + linear tail) with its class names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..io import write_with
from ..models import ClassifierTail, ViTBody, ViTConfig
from .body_io import BodyFileError, read_safetensors
from .training import TokenClassifier

__all__ = ["CLASSIFIER_FORMAT", "load_classifier", "save_classifier"]

CLASSIFIER_FORMAT = "smsd-vit-classifier"


def save_classifier(path: str | os.PathLike, model: TokenClassifier, *, classes: list[str],
                    head_fingerprint: str) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in model.state_dict().items()}
    metadata = {"format": CLASSIFIER_FORMAT, "version": "1",
                "model_config": model.body.config.to_json(), "classes": json.dumps(classes),
                "head_fingerprint": head_fingerprint}
    path = Path(path)
    write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return path


def load_classifier(path: str | os.PathLike) -> tuple[TokenClassifier, ViTConfig, list[str], str]:
    """→ ``(model, model config, class names, head fingerprint)``."""
    path = Path(path)
    meta, state = read_safetensors(path, "model file")
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise BodyFileError(f"{path} is not a smsd classifier file (format "
                            f"{meta.get('format')!r}); fine-tune a body first")
    try:
        config = ViTConfig.from_json(meta["model_config"])
        classes = json.loads(meta["classes"])
        model = TokenClassifier(ViTBody(config), ClassifierTail(config.embed_dim, len(classes)))
        model.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise BodyFileError(f"model file {path} is malformed: {exc}") from None
    return model.eval(), config, classes, meta.get("head_fingerprint", "")
