"""Image files for the tests: odd-sized PNG/JPEG folders, separable class folders and
pydicom's samples."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

# Odd sizes: portrait, landscape, square, smaller than the output (upscaled).
SIZES = [(37, 53), (64, 41), (20, 20), (100, 77), (9, 13)]


def write_folder(root, sizes=SIZES, classes=("a", "b")):
    """PNG (gray and RGB) and JPEG images with structure and noise, in class folders."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            y, x = np.mgrid[0:h, 0:w]
            smooth = 127 + 120 * np.sin(x / 3.0 + i) * np.cos(y / 4.0)
            rgb = np.clip(smooth[..., None] + rng.normal(0, 25, (h, w, 3)), 0, 255)
            rgb = rgb.astype(np.uint8)
            Image.fromarray(rgb[..., 0] if i % 2 else rgb).save(root / c / f"{i}.png")
            Image.fromarray(rgb).save(root / c / f"{i}.jpg", quality=90)
    return root


def write_separable_folder(root, per_class: int, *, size: int = 16, seed: int = 0):
    """Two classes of ``size``×``size`` gray PNGs that a tiny model separates: dark
    ("zero") and bright ("one") noise."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("zero", "one")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 130 * c, 20, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def dicom_files():
    data = pytest.importorskip("pydicom.data")
    # CT, MR and a chest X-ray (CR, MONOCHROME1, 1760×1760, 16-bit)
    return [data.get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm", "RG3_UNCR.dcm")]
