"""Image folders in the class-subfolder layout: ``ROOT/<class>/<image>``.

PNG and JPEG are read with Pillow; DICOM (``.dcm``) with pydicom (the ``dicom`` extra),
windowed to 8-bit range using the file's window center/width when present, else its
full value range (16-bit images keep their precision until then).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SmsdError
from ..extras import require

__all__ = ["IMAGE_SUFFIXES", "DataError", "list_image_folder", "load_image_folder", "read_pixels",
           "skipped_files"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


class DataError(SmsdError, ValueError):
    """A data folder or image is missing, empty, unreadable or corrupt."""


def _first(value) -> float:
    # DICOM window values may be multi-valued; the first is the default window.
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _read_dicom(path: Path) -> np.ndarray:
    require("dicom", purpose=f"{path} (DICOM)")
    import pydicom

    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array.astype(np.float64)
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: first frame
    pixels = pixels * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        low, high = center - width / 2, center + width / 2
    else:
        low, high = float(pixels.min()), float(pixels.max())
    scaled = np.clip((pixels - low) / max(high - low, 1e-12), 0.0, 1.0)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        scaled = 1.0 - scaled  # MONOCHROME1 stores inverted gray levels
    return scaled.astype(np.float32)


def _read_pil(path: Path) -> np.ndarray:
    require("data", "PIL", purpose=f"{path} (an image file)")
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I"):
            arr = np.asarray(img, dtype=np.float64)
            return (arr / max(arr.max(), 1.0)).astype(np.float32)
        img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
        return np.asarray(img, dtype=np.float32) / 255.0


def read_pixels(path: str | os.PathLike) -> np.ndarray:
    """One decoded image as fp32 in [0, 1], ``[H, W]`` or ``[H, W, C]`` (DICOM windowed).

    Raises :class:`DataError` naming the file when it cannot be decoded.
    """
    path = Path(path)
    try:
        arr = _read_dicom(path) if path.suffix.lower() == ".dcm" else _read_pil(path)
    except DataError:
        raise
    except Exception as exc:  # every decoder error means "this file is bad"
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None
    if not np.isfinite(arr).all():
        raise DataError(f"image {path} has non-finite pixel values")
    return arr


def read_image(path: str | os.PathLike, img_size: int, in_chans: int) -> torch.Tensor:
    """One image as fp32 ``[in_chans, img_size, img_size]`` in [-1, 1]."""
    path = Path(path)
    img = torch.from_numpy(np.ascontiguousarray(read_pixels(path)))
    img = img[None] if img.dim() == 2 else img.permute(2, 0, 1)
    if img.shape[0] != in_chans:
        if img.shape[0] == 1:
            img = img.expand(in_chans, -1, -1)  # grayscale → every channel
        elif in_chans == 1:
            img = img.mean(0, keepdim=True)
        else:
            raise DataError(f"image {path} has {img.shape[0]} channels, the model takes "
                            f"{in_chans}")
    img = F.interpolate(img[None], size=(img_size, img_size), mode="bilinear",
                        align_corners=False, antialias=True)[0]
    return (img - 0.5) / 0.5


def load_image_folder(
    root: str | os.PathLike, img_size: int, in_chans: int
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[Path]]:
    """Read every image under ``root/<class>/``.

    Returns ``(images [n, C, H, W] fp32, labels int64 [n], class names, file paths)``;
    classes are the sorted subfolder names. Raises :class:`DataError` naming the folder
    or file for a missing/empty folder or an unreadable image.
    """
    files, labels, classes = list_image_folder(root)
    images = [read_image(path, img_size, in_chans) for path in files]
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes, files


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """The image files under ``root/<class>/`` (sorted), their labels and the class names.

    Raises :class:`DataError` naming the folder when it is missing or a class is empty.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data folder {root} has no class subfolders (expected ROOT/<class>/img)")
    labels, files = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"class folder {root / name} holds no images "
                            f"({', '.join(IMAGE_SUFFIXES)})")
        files.extend(found)
        labels.extend([label] * len(found))
    return files, labels, classes


def skipped_files(root: str | os.PathLike) -> list[tuple[Path, str]]:
    """What :func:`list_image_folder` leaves out of ``root``, with why: files beside the
    class folders, files that are not images, folders nested in a class folder (not
    searched), hidden entries."""
    root = Path(root)
    skipped: list[tuple[Path, str]] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            skipped.append((entry, "hidden"))
        elif not entry.is_dir():
            skipped.append((entry, "not in a class folder"))
            continue
        else:
            for item in sorted(entry.iterdir()):
                if item.name.startswith("."):
                    skipped.append((item, "hidden"))
                elif item.is_dir():
                    skipped.append((item, "nested folder (not searched)"))
                elif item.suffix.lower() not in IMAGE_SUFFIXES:
                    skipped.append((item, f"not an image suffix ({', '.join(IMAGE_SUFFIXES)})"))
    return skipped
