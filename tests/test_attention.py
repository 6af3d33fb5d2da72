"""smsd.ops.attention: every backend against the float64 reference (flash-attention rule).

Tolerances: the accuracy rule of smsd.testing (kernel error vs float64 <= 2x the error
of plain PyTorch, gather + F.scaled_dot_product_attention, in the same dtype + 1 ulp of
the output scale), so no per-dtype magic numbers: bounds land near 1e-6 (fp32), 4e-3
(fp16) and 2e-2 (bf16). Exactly-zero gradients of 1-token views use the ulp of the
cancelling terms instead (see smsd.selfcheck.attention._cancellation_bound).
Triton runs in the interpreter (conftest), hence the small shapes.
"""

from __future__ import annotations

import pytest
import torch

import smsd
from smsd.backend import BackendUnavailableError
from smsd.ops import attention, reference
from smsd.selfcheck.attention import compare

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(*shape, dtype=torch.float64):
    return [torch.randn(*shape, dtype=dtype) for _ in range(3)]


def _assert_rule(results: dict) -> None:
    bad = {name: str(acc) for name, acc in results.items() if not acc.ok}
    assert not bad, bad


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# ---------------------------------------------------------------- accuracy
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,H,N,d",
    [(2, 2, 50, 32), (1, 2, 197, 64), (1, 1, 1, 32), (1, 1, 20, 128), (1, 2, 33, 24)],
)
def test_dense_matches_reference(backend, dtype, B, H, N, d):
    qkv = _qkv(B, H, N, d)
    _assert_rule(compare(dtype, qkv, torch.randn(B, H, N, d, dtype=torch.float64)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [50, 23, 1], ids=lambda m: f"M={m}")
def test_index_matches_reference(backend, dtype, M):
    B, H, N, d = 2, 2, 50, 32
    index = torch.rand(B, N).argsort(1)[:, :M]
    grad = torch.randn(B, H, M, d, dtype=torch.float64)
    _assert_rule(compare(dtype, _qkv(B, H, N, d), grad, index=index))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_matches_reference(backend, dtype):
    lengths = [49, 3, 0, 70, 1]
    T, H, d = sum(lengths), 2, 64
    grad = torch.randn(T, H, d, dtype=torch.float64)
    _assert_rule(compare(dtype, _qkv(T, H, d), grad, cu_seqlens=_cu(lengths)))


def test_custom_scale(backend):
    qkv = _qkv(1, 2, 40, 32)
    grad = torch.randn(1, 2, 40, 32, dtype=torch.float64)
    _assert_rule(compare(torch.float32, qkv, grad, scale=0.5))


# ---------------------------------------------------------------- semantics
def test_permutation_equivariance(backend):
    """attention(q, k, v, index=perm) == attention(q, k, v)[:, :, perm], gradients too."""
    B, H, N, d = 2, 2, 50, 32
    q, k, v = (t.float().requires_grad_(True) for t in _qkv(B, H, N, d))
    perm = torch.rand(B, N).argsort(1)
    gather = lambda t: torch.gather(t, 2, perm[:, None, :, None].expand(-1, H, -1, d))  # noqa: E731
    permuted = attention(q, k, v, index=perm)
    grad = torch.randn_like(permuted)
    grads_perm = torch.autograd.grad(permuted, (q, k, v), grad)
    dense = attention(q, k, v)
    grads_dense = torch.autograd.grad(gather(dense), (q, k, v), grad)
    torch.testing.assert_close(permuted, gather(dense), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_perm, grads_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_subset_gradients_are_zero_outside_the_view(backend):
    B, H, N, d, M = 2, 2, 40, 32, 13
    q, k, v = (t.float().requires_grad_(True) for t in _qkv(B, H, N, d))
    index = torch.rand(B, N).argsort(1)[:, :M]
    out = attention(q, k, v, index=index)
    assert out.shape == (B, H, M, d)
    out.backward(torch.randn_like(out))
    outside = torch.ones(B, N, dtype=torch.bool)
    outside[torch.arange(B)[:, None], index] = False
    for t in (q, k, v):
        assert t.grad.shape == (B, H, N, d)
        assert torch.all(t.grad.permute(0, 2, 1, 3)[outside] == 0)
        assert t.grad.permute(0, 2, 1, 3)[~outside].abs().sum() > 0


def test_packed_equals_per_sequence(backend):
    lengths = [17, 1, 40, 5]
    T, H, d = sum(lengths), 2, 32
    q, k, v = (t.float() for t in _qkv(T, H, d))
    packed = attention(q, k, v, cu_seqlens=_cu(lengths))
    start = 0
    for n in lengths:
        per_seq = attention(*(t[start:start + n].transpose(0, 1)[None] for t in (q, k, v)))
        torch.testing.assert_close(packed[start:start + n], per_seq[0].transpose(0, 1),
                                   rtol=1e-5, atol=1e-5)
        start += n


def test_non_contiguous_inputs(backend):
    """q, k, v as timm slices them out of one qkv projection, and a strided int32 index."""
    B, N, H, d = 2, 37, 2, 32
    qkv = torch.randn(B, N, 3, H, d).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d] views
    q, k, v = (t.requires_grad_(True) for t in qkv.clone().unbind(0))
    assert not q.is_contiguous()
    index = torch.rand(B, N).argsort(1)[:, : N // 2]
    index = index.int().t().contiguous().t()  # column-major: non-contiguous rows
    assert not index.is_contiguous()
    out = attention(q, k, v, index=index)
    out.backward(torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, index=index)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for t, r in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_strided_and_expanded_inputs_without_index(backend, layout):
    """Without ``index`` the cpp kernel hands fp32 rows to BLAS in place: q and v sliced
    out of one qkv projection (row stride 3*H*d), k expanded from one token (row stride
    0: no valid BLAS matrix, so it must be gathered). Gradients flow back through both."""
    N, H, d = 37, 2, 32
    qkv64 = torch.randn(N, 3, H, d, dtype=torch.float64)
    key64 = torch.randn(1, H, d, dtype=torch.float64)
    grad64 = torch.randn(N, H, d, dtype=torch.float64)
    kwargs = {} if layout == "dense" else {"cu_seqlens": _cu([20, 17])}

    def views(qkv, key):
        q, k, v = qkv[:, 0], key.expand(N, H, d), qkv[:, 2]
        if layout == "dense":  # [1, H, N, d]
            return [t.transpose(0, 1)[None] for t in (q, k, v)]
        return [q, k, v]

    def run(fn, dtype):
        qkv = qkv64.to(dtype).requires_grad_(True)
        key = key64.to(dtype).requires_grad_(True)
        q, k, v = views(qkv, key)
        assert not any(t.is_contiguous() for t in (q, k, v))
        out = fn(q, k, v, **kwargs)
        grad = grad64.to(dtype)
        out.backward(grad.transpose(0, 1)[None] if layout == "dense" else grad)
        return out.detach(), qkv.grad, key.grad

    for got, want in zip(run(attention, torch.float32), run(reference.attention, torch.float64),
                         strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_empty_view(backend):
    q, k, v = (t.float().requires_grad_(True) for t in _qkv(2, 2, 10, 32))
    out = attention(q, k, v, index=torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (2, 2, 0, 32)
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))


# ---------------------------------------------------------------- bad input
def _good(shape=(2, 2, 10, 32)):
    return [t.float() for t in _qkv(*shape)]


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda q, k, v: attention(q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: attention(q[0], k[0], v[0]), ValueError, r"q must be \[B, H, N, d\]"),
        (lambda q, k, v: attention(q, k[:, :, :5], v), ValueError, "k has shape"),
        (lambda q, k, v: attention(q, k.half(), v), TypeError, "k has dtype"),
        (lambda q, k, v: attention(q.double(), k.double(), v.double()), TypeError,
         "q must have dtype"),
        (lambda q, k, v: attention(q.new_zeros(2, 2, 10, 300), q.new_zeros(2, 2, 10, 300),
                                   q.new_zeros(2, 2, 10, 300)), ValueError, "head dim"),
        (lambda q, k, v: attention(q, k, v, index=torch.zeros(3, 4, dtype=torch.long)),
         ValueError, "index has 3 rows"),
        (lambda q, k, v: attention(q, k, v, index=torch.zeros(2, 4)), TypeError,
         "index must have dtype"),
        (lambda q, k, v: attention(q, k, v, index=torch.tensor([[0, 10], [1, 2]])),
         ValueError, "outside"),
        (lambda q, k, v: attention(q, k, v, index=torch.tensor([[0, -1], [1, 2]])),
         ValueError, "outside"),
        (lambda q, k, v: attention(q, k, v, index=torch.tensor([[3, 3], [1, 2]])),
         ValueError, r"index\[0\] repeats"),
        (lambda q, k, v: attention(q, k, v, index=torch.zeros(2, 11, dtype=torch.long)),
         ValueError, "only N=10"),
        (lambda q, k, v: attention(q, k, v, scale=-1.0), ValueError, "scale"),
    ],
)
def test_bad_dense_input(make, error, match):
    with pytest.raises(error, match=match):
        make(*_good())


@pytest.mark.parametrize(
    "cu, error, match",
    [
        (torch.tensor([0, 5, 12]), TypeError, "int32"),
        (torch.tensor([1, 5, 12], dtype=torch.int32), ValueError, "start at 0"),
        (torch.tensor([0, 7, 5, 12], dtype=torch.int32), ValueError, "non-decreasing"),
        (torch.tensor([0, 5, 11], dtype=torch.int32), ValueError, "ends at 11"),
        (torch.tensor([[0, 12]], dtype=torch.int32), ValueError, "1-D"),
        ([0, 12], TypeError, "cu_seqlens must be a torch.Tensor"),
    ],
)
def test_bad_packed_input(cu, error, match):
    q, k, v = (t.float() for t in _qkv(12, 2, 32))
    with pytest.raises(error, match=match):
        attention(q, k, v, cu_seqlens=cu)


def test_packed_rejects_index_and_short_max_seqlen(backend):
    q, k, v = (t.float() for t in _qkv(12, 2, 32))
    cu = _cu([5, 7])
    with pytest.raises(ValueError, match="not both"):
        attention(q, k, v, cu_seqlens=cu, index=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seqlen=4"):
        attention(q, k, v, cu_seqlens=cu, max_seqlen=4)
    with pytest.raises(ValueError, match=r"\[T, H, d\]"):
        attention(q[None], k[None], v[None], cu_seqlens=cu)


def test_validation_off_skips_value_checks(backend):
    """Repeats are only detected with validation on (the check synchronizes)."""
    q, k, v = _good()
    index = torch.tensor([[3, 3], [1, 2]])
    with smsd.validation(False):
        attention(q, k, v, index=index)  # no error; result defined only for distinct ids


def test_device_mismatch_is_reported():
    q, k, v = _good()
    with pytest.raises(ValueError, match="k is on meta"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="index is on meta"):
        attention(q, k, v, index=torch.zeros(2, 3, dtype=torch.long, device="meta"))


# ---------------------------------------------------------------- xformers backend
def test_xformers_is_reported():
    status = smsd.backends()["xformers"]
    if not status.available:
        assert "not installed" in status.detail or "no CUDA" in status.detail


def test_xformers_refuses_cpu_tensors():
    q, k, v = _good()
    with smsd.use_backend("xformers"), pytest.raises(BackendUnavailableError, match="xformers"):
        attention(q, k, v)


@pytest.mark.gpu
def test_xformers_matches_reference():
    if not smsd.backends()["xformers"].available:
        pytest.skip(f"xformers unavailable: {smsd.backends()['xformers'].detail}")
    qkv = [t.cuda() for t in _qkv(2, 2, 50, 64)]
    grad = torch.randn(2, 2, 23, 64, dtype=torch.float64).cuda()
    index = torch.rand(2, 50).argsort(1)[:, :23].cuda()
    with smsd.use_backend("xformers"):
        _assert_rule(compare(torch.float16, qkv, grad, index=index))
        lengths = [49, 3, 70]
        packed = [t.cuda() for t in _qkv(sum(lengths), 2, 64)]
        grad = torch.randn(sum(lengths), 2, 64, dtype=torch.float64).cuda()
        _assert_rule(compare(torch.float16, packed, grad, cu_seqlens=_cu(lengths).cuda()))
