"""The auditor's images: the originals (with their ids and, where known, classes) and the
attacker's public images."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SmsdError
from ..models import ViTConfig

__all__ = ["AuditError", "LoadedImages", "load_images"]


class AuditError(SmsdError, ValueError):
    """The audit's inputs are missing, malformed or do not match each other."""


@dataclass(frozen=True)
class LoadedImages:
    """``images`` ``[n, C, H, W]``, the ``ids`` that chose their permutations and their
    class ``labels`` ``[n]`` (``None`` where the source has none)."""

    images: torch.Tensor
    ids: list
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: slice) -> LoadedImages:
        labels = None if self.labels is None else self.labels[index]
        return LoadedImages(self.images[index], self.ids[index], labels)


def _load_npz(path: Path, config: ViTConfig) -> LoadedImages:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data:
                raise AuditError(f"{path} has no 'images' array (has {sorted(data.files)})")
            images = data["images"]
            ids = data["ids"].tolist() if "ids" in data else None
            labels = data.get("labels")
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise AuditError(f"{path} is not a readable .npz file: {exc}") from None
    expected = (config.in_chans, config.img_size, config.img_size)
    if images.ndim != 4 or images.shape[1:] != expected or images.dtype.kind != "f":
        shape = ", ".join(map(str, expected))
        raise AuditError(f"{path}: 'images' must be a float array [n, {shape}], "
                         f"got {images.dtype} {list(images.shape)}")
    if ids is not None and len(ids) != len(images):
        raise AuditError(f"{path}: 'ids' has {len(ids)} entries for {len(images)} images")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        raise AuditError(f"{path}: 'labels' must be integers [{len(images)}], got "
                         f"{labels.dtype} {list(labels.shape)}")
    tensor = torch.from_numpy(images.astype(np.float32))
    if not torch.isfinite(tensor).all():
        raise AuditError(f"{path}: 'images' holds non-finite values")
    return LoadedImages(tensor, ids if ids is not None else list(range(len(images))),
                        None if labels is None else torch.from_numpy(labels.astype(np.int64)))


def load_images(spec: str, config: ViTConfig) -> LoadedImages:
    """Images ``[n, C, H, W]`` (the model's pixel range), the ids that chose their
    permutations (as the client encoded them) and their classes.

    ``spec``: ``digits`` (the bundled set; ids 0..n-1), an image folder ``ROOT/<class>/``
    (ids = paths relative to ROOT, as ``smsd encode`` uses) or an ``.npz`` with ``images``
    and optionally ``ids`` (default 0..n-1) and ``labels``.
    """
    if spec == "digits":
        from ..data import load_digits

        images, labels = load_digits(config.img_size)
        if config.in_chans != 1:
            images = images.expand(-1, config.in_chans, -1, -1).contiguous()
        return LoadedImages(images, list(range(len(images))), labels)
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise AuditError(f"images file {path} does not exist")
        return _load_npz(path, config)
    if path.is_dir():
        from ..data import load_image_folder

        images, labels, _, files = load_image_folder(path, config.img_size, config.in_chans)
        return LoadedImages(images, [str(f.relative_to(path)) for f in files], labels)
    raise AuditError(f"--images must be 'digits', an image folder or a .npz file; {spec!r} "
                     "is none of them")
