"""What a loader reads: the files of an image folder, or images already in memory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .folder import list_image_folder, read_pixels

__all__ = ["ENCODED_SUFFIXES", "ImageSource", "shard_range"]

# What DALI's image decoder reads; DICOM is decoded on the host by pydicom.
ENCODED_SUFFIXES = (".png", ".jpg", ".jpeg")


def shard_range(n: int, shard_id: int, num_shards: int) -> range:
    """Sample indices of one shard: contiguous, as DALI's readers split a data set."""
    return range(n * shard_id // num_shards, n * (shard_id + 1) // num_shards)


@dataclass(frozen=True, eq=False)
class ImageSource:
    """Images with int labels, class names and one id each (the id picks the image's
    secret permutation in :meth:`~smsd.protocol.Client.encode`).

    Build with :meth:`from_folder` or :meth:`from_arrays`.
    """

    labels: np.ndarray
    classes: tuple[str, ...]
    ids: tuple
    files: tuple[Path, ...] = ()
    arrays: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_folder(cls, root: str | os.PathLike) -> ImageSource:
        """Every image under ``root/<class>/`` (PNG, JPEG, DICOM); ids are the paths
        relative to ``root``."""
        root = Path(root)
        files, labels, classes = list_image_folder(root)
        return cls(labels=np.asarray(labels, dtype=np.int64), classes=tuple(classes),
                   ids=tuple(str(f.relative_to(root)) for f in files), files=tuple(files))

    @classmethod
    def from_arrays(cls, images: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray,
                    classes: Sequence[str] | None = None) -> ImageSource:
        """In-memory images ``[n, H, W]`` or ``[n, H, W, C]``: uint8, or floating point
        in [0, 1]. Ids are ``0..n-1``."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        if not isinstance(images, np.ndarray) or images.ndim not in (3, 4):
            raise TypeError("images must be an array [n, H, W] or [n, H, W, C]")
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        elif np.issubdtype(images.dtype, np.floating):
            if images.size and not (np.isfinite(images).all() and images.min() >= 0
                                    and images.max() <= 1):
                raise ValueError("floating-point images must be finite and lie in [0, 1]")
            images = images.astype(np.float32)
        else:
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        if len(images) == 0:
            raise ValueError("images is empty")
        if classes is None:
            classes = [str(c) for c in range(int(labels.max()) + 1)]
        return cls(labels=labels, classes=tuple(classes), ids=tuple(range(len(images))),
                   arrays=images)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def encoded(self) -> bool:
        """True when every image is a PNG/JPEG file (DALI reads and decodes them itself)."""
        return bool(self.files) and all(f.suffix.lower() in ENCODED_SUFFIXES
                                        for f in self.files)

    def name(self, index: int) -> str:
        return str(self.files[index]) if self.files else f"array image {index}"

    def pixels(self, index: int) -> np.ndarray:
        """Image ``index`` as fp32 in [0, 1], ``[H, W]`` or ``[H, W, C]``."""
        if self.arrays is not None:
            return self.arrays[index]
        return read_pixels(self.files[index])
