"""The bundled textures: patches of the photographs shipped with scikit-image and
scikit-learn (offline), one class per photo."""

from __future__ import annotations

import itertools

import pytest
import torch

from smsd.data import load_dataset
from smsd.data.textures import load_textures


@pytest.fixture(scope="module")
def textures():
    return load_textures(32, crops_per_class=60, seed=0)


def test_shapes_dtypes_range_and_balance(textures):
    images, labels, names = textures
    k = len(names)
    assert k >= 8 and len(set(names)) == k
    assert images.shape == (60 * k, 1, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (60 * k,) and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1 and torch.isfinite(images).all()
    assert torch.bincount(labels, minlength=k).tolist() == [60] * k


def test_seeded(textures):
    images, labels, names = textures
    again = load_textures(32, crops_per_class=60, seed=0)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    assert names == again[2]
    other = load_textures(32, crops_per_class=60, seed=1)
    assert torch.equal(labels, other[1]) and not torch.equal(images, other[0])


def _features(images: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, edge energy and an 8-bin histogram per patch."""
    x = images[:, 0]
    dx = (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2))
    dy = (x[:, 1:] - x[:, :-1]).abs().mean((1, 2))
    edges = torch.linspace(-1, 1, 9)
    hist = torch.stack([((x >= lo) & (x < hi)).float().mean((1, 2))
                        for lo, hi in itertools.pairwise(edges)], 1)
    return torch.cat([torch.stack([x.mean((1, 2)), x.std((1, 2)), dx, dy], 1), hist], 1)


def test_classes_are_separable(textures):
    """A nearest-class-mean classifier on simple patch statistics, fitted on half the
    patches, labels the other half far above chance."""
    images, labels, names = textures
    feats = _features(images)
    train = torch.arange(len(labels)) % 2 == 0
    mu, sd = feats[train].mean(0), feats[train].std(0) + 1e-6
    z = (feats - mu) / sd
    centres = torch.stack([z[train & (labels == c)].mean(0) for c in range(len(names))])
    pred = torch.cdist(z[~train], centres).argmin(1)
    accuracy = (pred == labels[~train]).float().mean().item()
    assert accuracy > 4 / len(names), accuracy  # chance is 1 / len(names)


def test_load_dataset_textures():
    data = load_dataset("textures", img_size=16, in_chans=3)
    n = data.labels.numel()
    assert data.num_classes >= 8 and data.images.shape == (n, 3, 16, 16)
    assert torch.equal(data.images[:, 0], data.images[:, 2])
    assert set(data.labels.tolist()) == set(range(data.num_classes))


def test_unknown_dataset_names_textures():
    with pytest.raises(ValueError, match="textures"):
        load_dataset("nope", img_size=16, in_chans=1)
