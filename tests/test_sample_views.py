"""sample_views: sizes, uniform subsets without repeats, seeding, bad input."""

from __future__ import annotations

import pytest
import torch

from smsd.ops import sample_views, view_size


def test_sizes_follow_round_of_ratio():
    views = sample_views(3, 197, [0.5, 0.5, 0.2, 0.25, 1.0])
    assert [v.shape for v in views] == [
        (3, 98), (3, 98), (3, 39), (3, 49), (3, 197)]  # round(98.5) is 98: half to even
    assert view_size(197, 0.5) == round(98.5) == 98


def test_subsets_are_valid_and_independent():
    views = sample_views(64, 50, [0.3] * 4, generator=torch.Generator().manual_seed(1))
    for idx in views:
        assert idx.dtype == torch.int64
        assert idx.min() >= 0 and idx.max() < 50
        assert (idx.sort(1).values.diff(dim=1) > 0).all()  # no repeats
    assert not torch.equal(views[0], views[1])
    assert not torch.equal(views[0][0], views[0][1])


def test_uniform_inclusion_probability():
    """Each token is kept with probability K/N: a binomial count within 5 sigma."""
    n, k, trials = 20, 5, 4000
    (idx,) = sample_views(trials, n, [k / n], generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(idx.flatten(), minlength=n).double()
    p = k / n
    mean, sd = trials * p, (trials * p * (1 - p)) ** 0.5
    assert ((counts - mean).abs() < 5 * sd).all(), counts


def test_same_generator_state_same_views():
    a = sample_views(4, 30, [0.5, 0.2], generator=torch.Generator().manual_seed(9))
    b = sample_views(4, 30, [0.5, 0.2], generator=torch.Generator().manual_seed(9))
    c = sample_views(4, 30, [0.5, 0.2], generator=torch.Generator().manual_seed(10))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_batch_one_and_device_argument():
    (idx,) = sample_views(1, 7, [0.5], device="cpu")
    assert idx.shape == (1, 4) and idx.device.type == "cpu"  # round(3.5) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((4, 10, []), "non-empty sequence"),
        ((4, 10, 0.5), "non-empty sequence"),
        ((4, 10, [0.0]), r"keep\[0\] must be a ratio"),
        ((4, 10, [0.5, 1.5]), r"keep\[1\] must be a ratio"),
        ((4, 10, [0.01]), "keeps round"),
        ((4, 0, [0.5]), "n_tokens must be a positive int"),
        ((-1, 10, [0.5]), "batch must be a non-negative int"),
        ((4.0, 10, [0.5]), "batch must be"),
    ],
)
def test_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        sample_views(*args)


def test_generator_on_other_device_is_rejected():
    gen = torch.Generator()
    with pytest.raises(ValueError, match="generator lives on cpu"):
        sample_views(2, 10, [0.5], generator=gen, device="meta")
