"""Data sets by name: the bundled digits or textures, or a folder of images (one sub-folder
per class)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .digits import load_digits
from .loaders import collect, make_loader
from .source import ImageSource
from .textures import load_textures

__all__ = ["Dataset", "load_dataset"]


class Dataset(NamedTuple):
    images: torch.Tensor  # [n, C, H, W] float in [0, 1]
    labels: torch.Tensor  # [n] int64
    num_classes: int


def load_dataset(spec: str, *, img_size: int, in_chans: int, loader: str = "auto") -> Dataset:
    """``"digits"`` (scikit-learn's 8x8 digits, resized), ``"textures"`` (patches of the
    photographs bundled with scikit-image and scikit-learn,
    :func:`~smsd.data.textures.load_textures`) or ``"folder:PATH"`` (read through
    :func:`~smsd.data.make_loader` with ``loader``), at the model's size and channels."""
    if spec in ("digits", "textures"):
        if spec == "digits":
            (images, labels), num_classes = load_digits(img_size), 10
        else:
            images, labels, names = load_textures(img_size)
            num_classes = len(names)
        if in_chans != 1:
            images = images.expand(-1, in_chans, -1, -1).contiguous()
        return Dataset(images, labels, num_classes)
    if spec.startswith("folder:"):
        source = ImageSource.from_folder(spec[len("folder:"):])
        batch = collect(make_loader(source, img_size=img_size, in_chans=in_chans, loader=loader))
        return Dataset(batch.images, batch.labels, len(source.classes))
    raise ValueError(f"dataset must be 'digits', 'textures' or 'folder:PATH', got {spec!r}")
