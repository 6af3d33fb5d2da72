"""The auditor's ground truth: the original images (and their ids) and the client's key."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import SmsdError
from ..models import ViTConfig

__all__ = ["AuditError", "load_images"]


class AuditError(SmsdError, ValueError):
    """The audit's inputs are missing, malformed or do not match each other."""


def _load_npz(path: Path, config: ViTConfig) -> tuple[torch.Tensor, list]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data:
                raise AuditError(f"{path} has no 'images' array (has {sorted(data.files)})")
            images = data["images"]
            ids = data["ids"].tolist() if "ids" in data else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise AuditError(f"{path} is not a readable .npz file: {exc}") from None
    expected = (config.in_chans, config.img_size, config.img_size)
    if images.ndim != 4 or images.shape[1:] != expected or images.dtype.kind != "f":
        shape = ", ".join(map(str, expected))
        raise AuditError(f"{path}: 'images' must be a float array [n, {shape}], "
                         f"got {images.dtype} {list(images.shape)}")
    if ids is not None and len(ids) != len(images):
        raise AuditError(f"{path}: 'ids' has {len(ids)} entries for {len(images)} images")
    tensor = torch.from_numpy(images.astype(np.float32))
    if not torch.isfinite(tensor).all():
        raise AuditError(f"{path}: 'images' holds non-finite values")
    return tensor, ids if ids is not None else list(range(len(images)))


def load_images(spec: str, config: ViTConfig) -> tuple[torch.Tensor, list]:
    """Images ``[n, C, H, W]`` (the model's pixel range) and the ids that chose their
    permutations, as the client encoded them.

    ``spec``: ``digits`` (the bundled set; ids 0..n-1), an image folder ``ROOT/<class>/``
    (ids = paths relative to ROOT, as ``smsd encode`` uses) or an ``.npz`` with ``images``
    and optionally ``ids`` (default 0..n-1).
    """
    if spec == "digits":
        from ..data import load_digits

        images, _ = load_digits(config.img_size)
        if config.in_chans != 1:
            images = images.expand(-1, config.in_chans, -1, -1).contiguous()
        return images, list(range(len(images)))
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise AuditError(f"images file {path} does not exist")
        return _load_npz(path, config)
    if path.is_dir():
        from ..data import load_image_folder

        images, _, _, files = load_image_folder(path, config.img_size, config.in_chans)
        return images, [str(f.relative_to(path)) for f in files]
    raise AuditError(f"--images must be 'digits', an image folder or a .npz file; {spec!r} "
                     "is none of them")
