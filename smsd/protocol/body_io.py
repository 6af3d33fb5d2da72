"""Save and load a trained body (what the server sends back) as safetensors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from .. import safe_files
from ..errors import SmsdError
from ..io import write_with
from ..models import ViTBody, ViTConfig
from ..sealing.files import check_public, open_maybe_sealed, seal_tensors
from ..sealing.keys import RecipientPrivateKey, RecipientPublicKey

__all__ = ["BODY_FORMAT", "BodyFileError", "body_privacy", "load_body", "read_safetensors",
           "save_body"]

BODY_FORMAT = "smsd-vit-body"
FILE_VERSION = "1"
_BODY_FIELDS = frozenset({"format", "version", "model_config", "head_fingerprint"})
M = TypeVar("M", bound=torch.nn.Module)


class BodyFileError(SmsdError, ValueError):
    """A body file is missing, malformed, or does not match the model."""


def save_body(path: str | os.PathLike, body: ViTBody, *, head_fingerprint: str,
              seal_to: Sequence[RecipientPublicKey] = (), privacy: dict | None = None) -> Path:
    """Write ``body``'s weights and model config atomically; with ``seal_to``, sealed
    to those recipients (each client that may open it), never in the clear.
    ``privacy``: the differential-privacy guarantee it was trained under (metadata
    ``privacy``, JSON; :func:`body_privacy` reads it back)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in body.state_dict().items()}
    metadata = {"format": BODY_FORMAT, "version": FILE_VERSION,
                "model_config": body.config.to_json(), "head_fingerprint": head_fingerprint}
    if privacy is not None:
        metadata["privacy"] = json.dumps(privacy, sort_keys=True)
    path = Path(path)
    if seal_to:
        return seal_tensors(path, state, metadata, seal_to)
    write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return path


def read_safetensors(
    path: Path, what: str, *, dtypes: Collection[str] = safe_files.ALL_DTYPES,
    finite: bool = True,
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a safetensors file, checked by
    :func:`smsd.safe_files.read_safetensors` (any dtype it knows unless ``dtypes``
    narrows them; float values finite unless ``finite=False``); ``what`` names it in
    errors, which are :class:`BodyFileError`."""
    return safe_files.read_safetensors(path, what, error=BodyFileError, dtypes=dtypes,
                                       finite=finite)


def read_model_file(
    path: Path, what: str, *, format: str, fields: frozenset[str], kind: str, hint: str = "",
    key: RecipientPrivateKey | None = None,
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read a body or classifier file: header, metadata fields, format version and
    head fingerprint are checked before the tensors are read. A sealed file needs the
    private ``key`` it was sealed to."""
    source, public = open_maybe_sealed(path, key, what=what, error=BodyFileError,
                                       content=format)
    # save_body and save_classifier write fp32 only; any other dtype is not ours.
    header = safe_files.read_header(source, what, error=BodyFileError, dtypes={"F32"})
    if public is not None:
        check_public(header, public)
    if format == BODY_FORMAT and "privacy" in header.metadata:
        fields = fields | {"privacy"}
    meta = safe_files.check_metadata(header, format=format, version=FILE_VERSION,
                                     fields=fields, kind=kind, hint=hint)
    safe_files.check_fingerprint(header, meta["head_fingerprint"])
    return meta, safe_files.read_tensors(header)


def load_body(path: str | os.PathLike, config: ViTConfig | None = None, *,
              key: RecipientPrivateKey | None = None) -> tuple[ViTBody, ViTConfig, str]:
    """Read a body file → ``(body, model config, head fingerprint)``.

    With ``config`` given, the file must have been trained for that same config. A
    sealed body needs this client's private ``key``.
    """
    path = Path(path)
    meta, state = read_model_file(path, "body file", format=BODY_FORMAT, fields=_BODY_FIELDS,
                                  kind="smsd body file", key=key)
    try:
        stored = ViTConfig.from_json(meta["model_config"])
    except (ValueError, TypeError) as exc:
        raise BodyFileError(f"body file {path} has a bad model config: {exc}") from None
    if config is not None and (stored.replace(num_classes=0) != config.replace(num_classes=0)):
        raise BodyFileError(f"body file {path} was trained for another model config: {stored}")
    body = build_model(lambda: ViTBody(stored), stored, state, path, "body file")
    return body, stored, meta["head_fingerprint"]


def build_model(factory: Callable[[], M], config: ViTConfig, state: dict[str, torch.Tensor],
                path: Path, what: str) -> M:
    """``factory()`` with ``state`` loaded; the file must hold exactly the model's tensors.

    A file's config cannot make us build a model bigger than the weights it holds: the
    size is bounded first, then names and shapes are compared on the meta device.
    """
    held = sum(t.numel() for t in state.values())
    # A lower bound of a block's weights (qkv, proj, fc1, fc2); -1 covers the rounding
    # of the MLP width.
    hidden = config.embed_dim * config.mlp_ratio - 1
    smallest = config.depth * (4 * config.embed_dim**2 + 2 * config.embed_dim * hidden)
    if config.depth > len(state) or not smallest <= held:
        raise BodyFileError(f"{what} {path} declares a model larger than the "
                            f"{held} weights it holds")
    try:
        with torch.device("meta"):
            expected = factory().state_dict()
    except (ValueError, TypeError, OverflowError) as exc:
        raise BodyFileError(f"{what} {path} has a bad model config: {exc}") from None
    if set(state) != set(expected):
        odd = sorted(set(state) ^ set(expected))
        raise BodyFileError(f"{what} {path} does not fit its config: tensors {odd[:5]} "
                            "are missing or unexpected")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise BodyFileError(f"{what} {path} does not fit its config: {name} has shape "
                                f"{list(tensor.shape)}, expected {list(expected[name].shape)}")
    model = factory()
    model.load_state_dict(state)
    return model


def body_privacy(path: str | os.PathLike, *, key: RecipientPrivateKey | None = None,
                 ) -> dict | None:
    """The differential-privacy record a body file carries (None: not private)."""
    path = Path(path)
    meta, _ = read_model_file(path, "body file", format=BODY_FORMAT, fields=_BODY_FIELDS,
                              kind="smsd body file", key=key)
    if "privacy" not in meta:
        return None
    try:
        record = json.loads(meta["privacy"])
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise BodyFileError(f"body file {path} has a malformed privacy record")
    return record
