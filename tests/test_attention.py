"""smsd.ops.attention: every backend against an independent float64 formula (tests/oracles.py).

Tolerances: the accuracy rule of smsd.testing through tests/numerics.py. The kernels
accumulate in fp32, so their baseline is the formula in fp32 on the upcast inputs; in
fp16/bf16 each output is allowed one rounding to its dtype plus the first-order bound of
the roundings a flash-attention kernel makes by design (P and dS rounded to the input
dtype before their products, delta read from the rounded output), and it must also pass
flash-attention's rule (2x the error of F.scaled_dot_product_attention in the same
dtype), so the per-element bound never admits more than that rule did. The torch backend
computes in the input dtype: its baseline is the formula in that dtype. Exactly-zero
gradients of 1-token views use the ulp of the cancelling terms instead.
Triton runs in the interpreter (conftest), hence the small shapes; its GPU branch (the
``for range`` loops and GPU tile sizes) runs here too, through a ``range`` that accepts
the interpreter's scalars; bf16 tensor-core dots and the compiled kernels run in the
``gpu`` tests.
"""

from __future__ import annotations

import builtins

import numpy as np
import oracles
import pytest
import torch
from numerics import assert_all_ok, check_attention
from numerics import cu_seqlens as _cu

import smsd
from smsd import _kernels
from smsd.backend import BackendUnavailableError
from smsd.ops import attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(*shape, dtype=torch.float64):
    return [torch.randn(*shape, dtype=dtype) for _ in range(3)]


# ---------------------------------------------------------------- accuracy
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,H,N,d",
    [(2, 2, 50, 32), (1, 2, 197, 64), (1, 1, 1, 32), (1, 1, 20, 128), (1, 2, 33, 24)],
)
def test_dense_matches_formula(backend, dtype, B, H, N, d):
    qkv = _qkv(B, H, N, d)
    assert_all_ok(check_attention(dtype, qkv, torch.randn(B, H, N, d, dtype=torch.float64),
                                  backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [50, 23, 1], ids=lambda m: f"M={m}")
def test_index_matches_formula(backend, dtype, M):
    B, H, N, d = 2, 2, 50, 32
    index = torch.rand(B, N).argsort(1)[:, :M]
    grad = torch.randn(B, H, M, d, dtype=torch.float64)
    assert_all_ok(check_attention(dtype, _qkv(B, H, N, d), grad, backend, index=index))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_matches_formula(backend, dtype):
    lengths = [49, 3, 0, 70, 1]
    T, H, d = sum(lengths), 2, 64
    grad = torch.randn(T, H, d, dtype=torch.float64)
    assert_all_ok(check_attention(dtype, _qkv(T, H, d), grad, backend,
                                  cu_seqlens=_cu(lengths)))


def test_custom_scale(backend):
    qkv = _qkv(1, 2, 40, 32)
    grad = torch.randn(1, 2, 40, 32, dtype=torch.float64)
    assert_all_ok(check_attention(torch.float32, qkv, grad, backend, scale=0.5))


def _interpreter_range(*args):
    """``range`` over the interpreter's runtime scalars (1-element arrays or tensors),
    which the builtin rejects; the loop runs the same iterations as on the GPU."""
    def as_int(x):
        if hasattr(x, "handle"):  # a triton.language tensor
            x = x.handle.data
        return x if isinstance(x, int) else int(np.asarray(x).reshape(-1)[0])

    return builtins.range(*(as_int(a) for a in args))


@pytest.fixture
def gpu_branch(monkeypatch):
    """The Triton attention kernels as launched on a GPU (``for range`` loops, the GPU
    tile table, the GPU preprocess block), run by the interpreter. bf16 dots stay
    upcast (the interpreter's bf16 dot is wrong; tensor cores are the gpu tests')."""
    from conftest import backend_or_skip

    backend_or_skip("triton")
    module = _kernels.load("attention")
    dot_precision = module._dot_precision
    monkeypatch.setattr(module, "_interpreted", lambda: False)
    monkeypatch.setattr(module, "_dot_precision", lambda dtype: "upcast"
                        if dtype == torch.bfloat16 else dot_precision(dtype))
    monkeypatch.setattr(module, "range", _interpreter_range, raising=False)
    return module


@pytest.mark.parametrize(
    "dtype, shape, view",
    [
        (torch.bfloat16, (1, 2, 197, 64), None),  # 128x64 fwd tiles, dK/dV over 2 blocks
        (torch.float32, (1, 1, 150, 32), None),  # the wide (fp32) tiles
        (torch.float16, (2, 2, 50, 128), 23),  # d=128 tiles, a 23-token view
        (torch.bfloat16, (None, 2, 64), [49, 3, 0, 70, 1]),  # packed: 64-row tiles
    ],
    ids=["bf16-dense-197", "fp32-wide", "fp16-d128-index", "bf16-packed"],
)
def test_gpu_branch_in_interpreter(gpu_branch, dtype, shape, view):
    with smsd.use_backend("triton"):
        assert gpu_branch._blocks(shape[-1], dtype)["fwd"][0] >= 64  # the GPU tiles
    if isinstance(view, list):
        T = sum(view)
        grad = torch.randn(T, *shape[1:], dtype=torch.float64)
        results = check_attention(dtype, _qkv(T, *shape[1:]), grad, "triton",
                                  cu_seqlens=_cu(view))
    else:
        B, H, N, d = shape
        kwargs = {} if view is None else {"index": torch.rand(B, N).argsort(1)[:, :view]}
        grad = torch.randn(B, H, view or N, d, dtype=torch.float64)
        results = check_attention(dtype, _qkv(*shape), grad, "triton", **kwargs)
    assert_all_ok(results)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["dense", "index", "packed"])
def test_matches_formula_on_gpu(case):
    """The compiled Triton kernels (tensor-core dots, GPU tiles, ``for range`` loops) on
    ViT-sized views, every dtype, d=64 and 128, under the same rule (tests/numerics.py,
    run without the interpreter)."""
    from conftest import run_without_interpreter

    run_without_interpreter("tests/numerics.py", f"attention-{case}", timeout=900)


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
    # fp64 formula; the layouts change what the kernels read, not their fp32 arithmetic
    # (the accuracy tests above hold it to the rule): 1e-5 is ~100 fp32 ulps of O(1) values
    (ref, *grads), _ = oracles.attention(*(t.detach().double() for t in (q, k, v)),
                                         torch.ones(out.shape, dtype=torch.float64),
                                         index=index)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for t, r in zip((q, k, v), grads, strict=True):
        torch.testing.assert_close(t.grad.double(), r, rtol=1e-5, atol=1e-5)


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

    qkv = qkv64.float().requires_grad_(True)
    key = key64.float().requires_grad_(True)
    q, k, v = views(qkv, key)
    assert not any(t.is_contiguous() for t in (q, k, v))
    out = attention(q, k, v, **kwargs)
    out.backward((grad64.transpose(0, 1)[None] if layout == "dense" else grad64).float())
    # the fp64 formula on the materialized views; gradients land back through the slices
    # (q and v) and the expansion (the sum over tokens of k's): 1e-5 as above
    (ref, dq, dk, dv), _ = oracles.attention(
        *(t.detach().double().contiguous() for t in views(qkv64, key64)),
        grad64.transpose(0, 1)[None] if layout == "dense" else grad64, **kwargs)
    if layout == "dense":
        dq, dk, dv = (t[0].transpose(0, 1) for t in (dq, dk, dv))
    want_qkv = torch.stack([dq, torch.zeros_like(dq), dv], dim=1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv.grad.double(), want_qkv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(key.grad.double(), dk.sum(0, keepdim=True), rtol=1e-5, atol=1e-5)


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
        out = attention(q, k, v, index=index)  # no error; defined only for distinct ids
    assert out.shape == (2, 2, 2, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="repeats"):  # and validation on catches it
        attention(q, k, v, index=index)


def test_device_mismatch_is_reported():
    q, k, v = _good()
    with pytest.raises(ValueError, match="k is on meta"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="index is on meta"):
        attention(q, k, v, index=torch.zeros(2, 3, dtype=torch.long, device="meta"))


# ---------------------------------------------------------------- xformers backend
def test_xformers_is_reported():
    status = smsd.backends()["xformers"]
    if status.available:
        assert status.detail.startswith("xformers ") and " on " in status.detail
    else:
        assert "not installed" in status.detail or "no CUDA" in status.detail


def test_xformers_refuses_cpu_tensors():
    q, k, v = _good()
    with smsd.use_backend("xformers"), pytest.raises(BackendUnavailableError, match="xformers"):
        attention(q, k, v)


@pytest.mark.gpu
def test_xformers_matches_formula():
    if not smsd.backends()["xformers"].available:
        pytest.skip(f"xformers unavailable: {smsd.backends()['xformers'].detail}")
    qkv = [t.cuda() for t in _qkv(2, 2, 50, 64)]
    grad = torch.randn(2, 2, 23, 64, dtype=torch.float64).cuda()
    index = torch.rand(2, 50).argsort(1)[:, :23].cuda()
    assert_all_ok(check_attention(torch.float16, qkv, grad, "xformers", index=index))
    lengths = [49, 3, 70]
    packed = [t.cuda() for t in _qkv(sum(lengths), 2, 64)]
    grad = torch.randn(sum(lengths), 2, 64, dtype=torch.float64).cuda()
    assert_all_ok(check_attention(torch.float16, packed, grad, "xformers",
                                  cu_seqlens=_cu(lengths, "cuda")))
