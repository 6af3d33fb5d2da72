"""Data: digits, non-IID splits, image folders (PNG/JPEG/DICOM) and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from smsd.data import DataError, dirichlet_split, load_digits, load_image_folder, make_clients


def test_digits_shape_and_range():
    images, labels = load_digits(32)
    assert images.shape == (1797, 1, 32, 32) and labels.shape == (1797,)
    assert images.min() >= -1 and images.max() <= 1 and set(labels.tolist()) == set(range(10))


def test_dirichlet_split_is_a_seeded_partition():
    labels = torch.arange(10).repeat(30)
    parts = dirichlet_split(labels, 4, alpha=0.3, seed=1)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(300))
    again = dirichlet_split(labels, 4, alpha=0.3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # Strong skew: some client misses some class or is far from uniform.
    counts = np.stack([np.bincount(labels[p].numpy(), minlength=10) for p in parts])
    assert (counts / counts.sum(1, keepdims=True)).max() > 0.2


def test_dirichlet_split_errors():
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_split(torch.zeros(10, dtype=torch.long), 2, alpha=0, seed=0)
    with pytest.raises(ValueError, match="n_clients"):
        dirichlet_split(torch.zeros(10, dtype=torch.long), 0, alpha=1, seed=0)


def test_make_clients_fractions():
    images, labels = torch.randn(400, 1, 8, 8), torch.arange(10).repeat(40)
    clients = make_clients(images, labels, 3, alpha=1.0, labeled_fraction=0.25, seed=0)
    total = sum(c.train_images.shape[0] + c.test_images.shape[0] for c in clients)
    assert total == 400
    for c in clients:
        assert abs(c.labeled_labels.numel() - 0.25 * c.train_images.shape[0]) <= 1
        assert c.test_labels.numel() == c.test_images.shape[0] > 0
    with pytest.raises(ValueError, match="labeled_fraction"):
        make_clients(images, labels, 3, labeled_fraction=0)


def _write_png(path, size=(12, 10), mode="L", value=None):
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    data = rng.integers(0, 255, shape, dtype=np.uint8) if value is None else \
        np.full(shape, value, np.uint8)
    Image.fromarray(data, mode=None).save(path)


@pytest.fixture
def folder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        _write_png(tmp_path / cls / "a.png")
        _write_png(tmp_path / cls / "b.jpg", mode="RGB")
    return tmp_path


def test_load_image_folder(folder):
    images, labels, classes, files = load_image_folder(folder, 16, 3)
    assert images.shape == (4, 3, 16, 16) and classes == ["cat", "dog"]
    assert labels.tolist() == [0, 0, 1, 1] and len(files) == 4
    assert images.min() >= -1 and images.max() <= 1
    # grayscale → every channel identical
    torch.testing.assert_close(images[0, 0], images[0, 2])
    gray, *_ = load_image_folder(folder, 8, 1)
    assert gray.shape == (4, 1, 8, 8)


def test_corrupt_image_names_the_file(folder):
    bad = folder / "dog" / "c.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=str(bad)):
        load_image_folder(folder, 16, 3)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 16, 3)
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(tmp_path, 16, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        load_image_folder(tmp_path, 16, 3)


def _write_dicom(path, pixels: np.ndarray, window=None):
    pydicom = pytest.importorskip("pydicom", reason="pydicom (dicom extra) is not installed")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_16bit_windowing(tmp_path):
    (tmp_path / "scan").mkdir()
    pixels = np.linspace(0, 4000, 64).reshape(8, 8)
    _write_dicom(tmp_path / "scan" / "full.dcm", pixels)
    _write_dicom(tmp_path / "scan" / "win.dcm", pixels, window=(1000, 1000))
    images, *_ = load_image_folder(tmp_path, 8, 3)
    full, win = images[0, 0], images[1, 0]
    # full range: min → -1, max → +1, 16-bit steps kept (all 64 values distinct)
    assert full.min() == pytest.approx(-1, abs=1e-2) and full.max() == pytest.approx(1, abs=1e-2)
    assert full.unique().numel() > 32
    # window 500..1500: everything above 1500 saturates at +1
    assert (win == 1).float().mean() > 0.5
