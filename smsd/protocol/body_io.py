"""Save and load a trained body (what the server sends back) as safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import SmsdError
from ..io import write_with
from ..models import ViTBody, ViTConfig

__all__ = ["BODY_FORMAT", "BodyFileError", "load_body", "save_body"]

BODY_FORMAT = "smsd-vit-body"


class BodyFileError(SmsdError, ValueError):
    """A body file is missing, malformed, or does not match the model."""


def save_body(path: str | os.PathLike, body: ViTBody, *, head_fingerprint: str) -> Path:
    """Write ``body``'s weights and model config atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in body.state_dict().items()}
    metadata = {"format": BODY_FORMAT, "version": "1", "model_config": body.config.to_json(),
                "head_fingerprint": head_fingerprint}
    path = Path(path)
    write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return path


def read_safetensors(
    path: Path, what: str
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a safetensors file; ``what`` names it in errors."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise BodyFileError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise BodyFileError(f"{what} {path} cannot be read: {exc}") from None
    return meta, state


def load_body(path: str | os.PathLike,
              config: ViTConfig | None = None) -> tuple[ViTBody, ViTConfig, str]:
    """Read a body file → ``(body, model config, head fingerprint)``.

    With ``config`` given, the file must have been trained for that same config.
    """
    path = Path(path)
    meta, state = read_safetensors(path, "body file")
    if meta.get("format") != BODY_FORMAT:
        raise BodyFileError(f"{path} is not a smsd body file (format {meta.get('format')!r})")
    try:
        stored = ViTConfig.from_json(meta.get("model_config", ""))
    except (ValueError, TypeError) as exc:
        raise BodyFileError(f"body file {path} has a bad model config: {exc}") from None
    if config is not None and (stored.replace(num_classes=0) != config.replace(num_classes=0)):
        raise BodyFileError(f"body file {path} was trained for another model config: {stored}")
    body = ViTBody(stored)
    try:
        body.load_state_dict(state)
    except RuntimeError as exc:
        raise BodyFileError(f"body file {path} does not fit its config: {exc}") from None
    return body, stored, meta.get("head_fingerprint", "")
