"""An offline "textures" data set: small random patches of the photographs bundled inside
scikit-image and scikit-learn (no download); the class of a patch is its source photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..extras import require

__all__ = ["SKIMAGE_PHOTOS", "SKLEARN_PHOTOS", "load_textures"]

# skimage.data images whose files ship in the wheel (no pooch download) and that are
# natural photographs or textures; text/page (documents), horse (a binary silhouette),
# logo and the synthetic images are left out, as are hubble_deep_field (mostly black
# patches) and cat (chelsea again).
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass",
                  "gravel", "moon", "rocket")
# sklearn.datasets.load_sample_images(), by file name.
SKLEARN_PHOTOS = ("china", "flower")


def _gray(image: np.ndarray) -> np.ndarray:
    """Any skimage/sklearn image (uint8, bool or float; gray, RGB or RGBA) as 2-D float64
    in [0, 1]."""
    from skimage.color import rgb2gray, rgba2rgb
    from skimage.util import img_as_float

    image = img_as_float(np.asarray(image))
    if image.ndim == 3:
        if image.shape[-1] == 4:
            image = rgba2rgb(image)
        image = rgb2gray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a gray or RGB(A) image, got shape {image.shape}")
    return np.clip(image, 0.0, 1.0)


def _photos() -> list[tuple[str, np.ndarray]]:
    require("data", "skimage", purpose="the textures data set")
    require("data", "sklearn", "PIL", purpose="the textures data set")
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [(name, _gray(getattr(skimage.data, name)())) for name in SKIMAGE_PHOTOS]
    bunch = load_sample_images()
    by_name = {Path(f).stem: im for f, im in zip(bunch.filenames, bunch.images, strict=True)}
    photos += [(name, _gray(by_name[name])) for name in SKLEARN_PHOTOS]
    return photos


def load_textures(img_size: int = 32, *, crops_per_class: int = 180, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``crops_per_class`` random square patches of each bundled photograph.

    A patch's side is a quarter of its photo's shorter side (at least ``img_size``, at
    most the shorter side), at a uniformly random position (``torch.Generator`` seeded
    with ``seed``: deterministic), resized (bilinear, antialiased) to ``img_size``.

    Returns ``images`` fp32 ``[n, 1, img_size, img_size]`` normalized to [-1, 1],
    ``labels`` int64 ``[n]`` (class-major: the photo's index) and the class names.
    """
    if img_size < 1 or crops_per_class < 1:
        raise ValueError(f"img_size and crops_per_class must be >= 1, got {img_size}, "
                         f"{crops_per_class}")
    gen = torch.Generator().manual_seed(seed)
    photos = _photos()
    images, labels = [], []
    for label, (_, photo) in enumerate(photos):
        h, w = photo.shape
        side = min(max(min(h, w) // 4, img_size), h, w)
        tops = torch.randint(0, h - side + 1, (crops_per_class,), generator=gen).tolist()
        lefts = torch.randint(0, w - side + 1, (crops_per_class,), generator=gen).tolist()
        source = torch.from_numpy(photo).float()
        crops = torch.stack([source[t:t + side, s:s + side]
                             for t, s in zip(tops, lefts, strict=True)])[:, None]
        if side != img_size:
            crops = F.interpolate(crops, size=(img_size, img_size), mode="bilinear",
                                  align_corners=False, antialias=True)
        images.append(crops.clamp_(0.0, 1.0))
        labels.append(torch.full((crops_per_class,), label, dtype=torch.long))
    images = torch.cat(images)
    return (images - 0.5) / 0.5, torch.cat(labels), [name for name, _ in photos]
