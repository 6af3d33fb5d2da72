"""masked_sample: every backend against plain advanced indexing (tests/oracles.py), odd
shapes, dtypes, bad input. Copies must be exact; sums of repeated indices follow the
accuracy rule (tests/numerics.py: the kernels add in fp32, so their baseline is fp32)."""

from __future__ import annotations

import oracles
import pytest
import torch
from numerics import assert_all_ok, check_masked_sample

import smsd
from smsd.ops import masked_sample

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (B, N, D, K): the ViT-S shape trimmed, full N with K odd, B=1, one token, K=N.
SHAPES = [(1, 197, 40, 98), (3, 50, 33, 37), (2, 7, 5, 1), (2, 1, 3, 1), (2, 16, 24, 16)]


def _inputs(B, N, D, K, dtype, *, repeats=False, index_dtype=torch.int64):
    x = torch.randn(B, N, D, dtype=torch.float64).to(dtype)
    if repeats:
        index = torch.randint(0, N, (B, K))
    else:
        index = torch.rand(B, N).argsort(1)[:, :K]
    perm = torch.rand(B, N).argsort(1)
    return x, index.to(index_dtype), perm.to(index_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}N{}D{}K{}".format(*s))
@pytest.mark.parametrize("with_perm", [False, True], ids=["plain", "perm"])
@pytest.mark.parametrize("unique", [False, True], ids=["csr", "unique"])
def test_matches_indexing_exactly(backend, dtype, shape, with_perm, unique):
    """Without repeated indices both passes only copy rows: results must be bit-identical,
    whether the backward sorts (``unique=False``) or scatters an inverse index."""
    x, index, perm = _inputs(*shape, dtype)
    perm = perm if with_perm else None
    x1 = x.clone().requires_grad_(True)
    out = masked_sample(x1, index, perm, unique=unique)
    expected = oracles.masked_sample(x, index, perm)
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x1.grad, oracles.masked_sample_grad(grad, index, perm, x.shape[1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_indices_sum_gradients(backend, dtype):
    """Repeats are independent copies; their gradients add up (accuracy rule vs fp64)."""
    x, index, perm = _inputs(3, 13, 17, 13, torch.float64, repeats=True)
    index[:, :4] = 5  # make sure every image repeats a token several times
    grad64 = torch.randn(3, 13, 17, dtype=torch.float64)
    assert_all_ok(check_masked_sample(x, index, perm, grad64, dtype, backend))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_index_dtypes_and_mixed_perm_dtype(backend, index_dtype):
    x, index, perm = _inputs(2, 19, 8, 11, torch.float32, index_dtype=index_dtype)
    other = torch.int64 if index_dtype == torch.int32 else torch.int32
    expected = oracles.masked_sample(x, index, perm)
    assert torch.equal(masked_sample(x, index, perm), expected)
    assert torch.equal(masked_sample(x, index, perm.to(other)), expected)


def test_unique_refuses_repeated_indices(backend):
    x, index, perm = _inputs(2, 9, 4, 5, torch.float32)
    index[1, 3] = index[1, 0]
    with pytest.raises(ValueError, match="distinct"):
        masked_sample(x, index, perm, unique=True)


def test_unique_with_strided_gradient(backend):
    """The inverse-index backward reads a non-contiguous incoming gradient."""
    x, index, perm = _inputs(3, 21, 10, 8, torch.float32)
    x1 = x.clone().requires_grad_(True)
    out = masked_sample(x1, index, perm, unique=True)
    grad = torch.randn(3, 10, 8).transpose(1, 2)  # [3, 8, 10], strided
    out.backward(grad)
    assert torch.equal(x1.grad, oracles.masked_sample_grad(grad, index, perm, 21))


def test_non_contiguous_inputs(backend):
    base = torch.randn(6, 40, 2 * 24, dtype=torch.float32)
    x = base[::2, :, ::2]  # strided in every dimension
    assert not x.is_contiguous()
    index = torch.rand(3, 40).argsort(1)[:, :15]
    index_wide = torch.zeros(3, 30, dtype=torch.int64)
    index_wide[:, ::2] = index
    index_strided = index_wide[:, ::2]
    perm = torch.rand(40, 3).argsort(0).t()  # transposed: non-contiguous rows
    out = masked_sample(x, index_strided, perm)
    assert torch.equal(out, oracles.masked_sample(x, index, perm))
    # a non-contiguous (expanded) incoming gradient
    x2 = x.detach().clone().requires_grad_(True)
    masked_sample(x2, index, perm).sum().backward()
    ones = torch.ones(3, 15, x.shape[2])
    assert torch.equal(x2.grad, oracles.masked_sample_grad(ones, index, perm, 40))


def test_empty_selection(backend):
    x = torch.randn(2, 9, 4, requires_grad=True)
    index = torch.empty(2, 0, dtype=torch.int64)
    out = masked_sample(x, index)
    assert out.shape == (2, 0, 4)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_no_grad_and_grad_only_when_needed(backend):
    x, index, perm = _inputs(2, 10, 4, 5, torch.float32)
    with torch.no_grad():
        assert not masked_sample(x, index, perm).requires_grad
    assert not masked_sample(x, index, perm).requires_grad


def test_gradcheck_fp64(backend):
    x, index, perm = _inputs(2, 6, 3, 6, torch.float64, repeats=True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: masked_sample(t, index, perm), (x,))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda x, i, p: (x[0], i, p), ValueError, "x must have 3 dimensions"),
        (lambda x, i, p: (x.long(), i, p), TypeError, "x must have dtype"),
        (lambda x, i, p: (x, i.float(), p), TypeError, "index must have dtype"),
        (lambda x, i, p: (x, i[:1], p), ValueError, "index has 1 rows"),
        (lambda x, i, p: (x, torch.zeros(2, 9, dtype=torch.long), p), ValueError, "only N=8"),
        (lambda x, i, p: (x, i + 8, p), ValueError, "index holds"),
        (lambda x, i, p: (x, i - 8, p), ValueError, "index holds -"),
        (lambda x, i, p: (x, i, p[:, :4]), ValueError, "perm must have shape"),
        (lambda x, i, p: (x, i, torch.zeros_like(p)), ValueError, "is not a permutation"),
        (lambda x, i, p: (x, i, p.float()), TypeError, "perm must have dtype"),
        (lambda x, i, p: ("tokens", i, p), TypeError, "x must be a torch.Tensor"),
        (lambda x, i, p: (x, i.to("meta"), p), ValueError, "index is on meta"),
    ],
)
def test_bad_input(backend, make, error, message):
    x, index, perm = _inputs(2, 8, 4, 5, torch.float32)
    with pytest.raises(error, match=message):
        masked_sample(*make(x, index, perm))


def test_validation_off_skips_value_checks():
    x, index, perm = _inputs(2, 8, 4, 5, torch.float32)
    not_a_perm = torch.zeros_like(perm)  # in range, so safe to run unchecked
    with smsd.validation(False):
        assert smsd.validation_enabled() is False
        out = masked_sample(x, index, not_a_perm)
    assert torch.equal(out, oracles.masked_sample(x, index, not_a_perm))
    assert smsd.validation_enabled() is True


def test_cpp_bounds_checked_even_without_validation():
    from conftest import backend_or_skip

    backend_or_skip("cpp")
    x, index, _ = _inputs(2, 8, 4, 5, torch.float32)
    with smsd.use_backend("cpp"), smsd.validation(False):
        with pytest.raises(RuntimeError, match="outside"):
            masked_sample(x, index + 100)


# ------------------------------------------------------------------ property-based
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(
    max_examples=30, deadline=None,
    # the backend fixture only selects a backend: sharing it across examples is intended
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
@hypothesis.given(
    B=st.integers(1, 3), N=st.integers(1, 40), D=st.integers(1, 70),
    frac=st.floats(0.0, 1.0), repeats=st.booleans(), with_perm=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_shape_matches_indexing(backend, B, N, D, frac, repeats, with_perm, seed):
    gen = torch.Generator().manual_seed(seed)
    K = max(1, round(frac * N))
    x = torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    if repeats:
        index = torch.randint(0, N, (B, K), generator=gen)
    else:
        index = torch.rand(B, N, generator=gen).argsort(1)[:, :K]
    perm = torch.rand(B, N, generator=gen).argsort(1) if with_perm else None
    x1 = x.clone().requires_grad_(True)
    out = masked_sample(x1, index, perm)
    assert torch.equal(out, oracles.masked_sample(x, index, perm))
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad)
    # fp64 sums of at most K <= 40 terms, in any order: a few fp64 ulps of their scale
    torch.testing.assert_close(x1.grad, oracles.masked_sample_grad(grad, index, perm, N),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_indexing_on_gpu():
    """The compiled Triton kernels, forward and backward (with and without repeated
    indices), every dtype including fp64 (tests/numerics.py, run without the
    interpreter)."""
    from conftest import run_without_interpreter

    run_without_interpreter("tests/numerics.py", "masked-sample", timeout=900)
