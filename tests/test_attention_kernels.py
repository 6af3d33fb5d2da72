"""kernels/attention.py called directly (the op layer's entry points), in the interpreter.

- Gradient buffers: ``torch.empty`` when every token row is written (no index, packed,
  or an index that is a full permutation: its rows are distinct, so M == N means every
  token); a partial index still zeroes the unselected rows, also in caller-given buffers.
- ``attention_backward(..., out=(dq, dk, dv))`` writes into caller-given tensors of any
  strides (three views of one qkv-shaped gradient buffer, as smsd.models.vit's qkv Linear
  lays it out: ``[B, N, 3, H, d]`` dense, ``[T, 3, H, d]`` packed), and q, k, v are read
  in place as views of one qkv buffer. Results are bitwise those of separate buffers and
  match smsd.ops.reference.attention in float64 (1e-5, as tests/test_attention.py holds
  layout tests: ~100 fp32 ulps of O(1) values; the accuracy rule itself is that file's).
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_or_skip
from numerics import cu_seqlens as _cu

from smsd import _kernels
from smsd.ops import reference

B, H, N, D = 2, 2, 40, 32
LENGTHS = [17, 1, 0, 22]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def kernels():
    backend_or_skip("triton")
    return _kernels.load("attention")


def _dense_qkv(dtype=torch.float32):
    """q, k, v as [B, H, N, d] views of one [B, N, 3, H, d] projection output."""
    qkv = torch.randn(B, N, 3, H, D, dtype=torch.float64).to(dtype)
    return qkv, [t.transpose(1, 2) for t in qkv.unbind(2)]


def _packed_qkv(dtype=torch.float32):
    qkv = torch.randn(sum(LENGTHS), 3, H, D, dtype=torch.float64).to(dtype)
    return qkv, list(qkv.unbind(1))


def _grad_views(like: torch.Tensor, packed: bool):
    """A NaN-filled gradient buffer shaped like ``like`` (the qkv buffer) and its q, k, v
    views; NaN shows any element the backward fails to write."""
    buf = torch.full_like(like, float("nan"))
    views = buf.unbind(1) if packed else [t.transpose(1, 2) for t in buf.unbind(2)]
    return buf, tuple(views)


def _step(kernels, q, k, v, index=None, cu=None, out=None, grad=None):
    max_seqlen = max(LENGTHS) if cu is not None else 0
    scale = D ** -0.5
    o, lse = kernels.attention_forward(q, k, v, index, cu, max_seqlen, scale)
    if grad is None:
        grad = torch.randn(o.shape, dtype=torch.float64).to(o.dtype)
    grads = kernels.attention_backward(grad, q, k, v, o, lse, index, cu, max_seqlen, scale,
                                       out=out)
    return o, grad, grads


def _expected(q, k, v, grad, index=None, cu=None):
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    o = reference.attention(*leaves, index=index, cu_seqlens=cu)
    return o.detach(), torch.autograd.grad(o, leaves, grad.double())


def _check(got_out, got_grads, want_out, want_grads):
    torch.testing.assert_close(got_out.double(), want_out, **TOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), w, **TOL)


# ---------------------------------------------------------------- zero-fill
class _Zeroing:
    """Counts tensors zeroed (torch.zeros, Tensor.zero_) with the shape of q."""

    def __init__(self, monkeypatch, shape):
        self.count, zeros, zero_ = 0, torch.zeros, torch.Tensor.zero_

        def counted_zeros(*args, **kwargs):
            t = zeros(*args, **kwargs)
            self.count += t.shape == shape
            return t

        def counted_zero_(t):
            self.count += t.shape == shape
            return zero_(t)

        monkeypatch.setattr(torch, "zeros", counted_zeros)
        monkeypatch.setattr(torch.Tensor, "zero_", counted_zero_)


@pytest.mark.parametrize("given", [False, True], ids=["allocated", "caller-given"])
def test_full_permutation_is_not_zero_filled(kernels, monkeypatch, given):
    qkv, (q, k, v) = _dense_qkv()
    index = torch.rand(B, N).argsort(1)
    buf, views = _grad_views(qkv, packed=False)
    zeroing = _Zeroing(monkeypatch, q.shape)
    o, grad, grads = _step(kernels, q, k, v, index=index, out=views if given else None)
    monkeypatch.undo()
    assert zeroing.count == 0
    if given:
        assert all(g is w for g, w in zip(grads, views, strict=True))
        assert not buf.isnan().any()
    _check(o, grads, *_expected(q, k, v, grad, index=index))


@pytest.mark.parametrize("given", [False, True], ids=["allocated", "caller-given"])
def test_partial_index_zero_fills_unselected_rows(kernels, given):
    qkv, (q, k, v) = _dense_qkv()
    index = torch.rand(B, N).argsort(1)[:, :13]
    _, views = _grad_views(qkv, packed=False)
    o, grad, grads = _step(kernels, q, k, v, index=index, out=views if given else None)
    outside = torch.ones(B, N, dtype=torch.bool)
    outside[torch.arange(B)[:, None], index] = False
    for g in grads:
        rows = g.transpose(1, 2)  # [B, N, H, d]
        assert torch.equal(rows[outside], torch.zeros_like(rows[outside]))
        assert rows[~outside].abs().sum() > 0
    _check(o, grads, *_expected(q, k, v, grad, index=index))


def test_empty_index_zero_fills_given_buffers(kernels):
    qkv, (q, k, v) = _dense_qkv()
    buf, views = _grad_views(qkv, packed=False)
    _step(kernels, q, k, v, index=torch.zeros(B, 0, dtype=torch.long), out=views)
    assert torch.equal(buf, torch.zeros_like(buf))


# ---------------------------------------------------------------- one qkv buffer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("view", ["dense", "permutation", "subset", "packed"])
def test_gradients_into_one_qkv_buffer(kernels, dtype, view):
    """q, k, v read in place from one qkv buffer and d(q, k, v) written into one: bitwise
    the results of separate contiguous buffers, and the fp64 reference (fp32)."""
    packed = view == "packed"
    qkv, (q, k, v) = _packed_qkv(dtype) if packed else _dense_qkv(dtype)
    cu = _cu(LENGTHS) if packed else None
    index = {"permutation": torch.rand(B, N).argsort(1),
             "subset": torch.rand(B, N).argsort(1)[:, :23]}.get(view)
    buf, views = _grad_views(qkv, packed)
    o, grad, grads = _step(kernels, q, k, v, index=index, cu=cu, out=views)
    assert all(g is w for g, w in zip(grads, views, strict=True))
    assert not buf.isnan().any()

    separate = [t.contiguous() for t in (q, k, v)]
    o_sep, _, grads_sep = _step(kernels, *separate, index=index, cu=cu, grad=grad)
    assert torch.equal(o, o_sep)
    for g, s in zip(grads, grads_sep, strict=True):
        assert torch.equal(g, s)
    if dtype == torch.float32:
        _check(o, grads, *_expected(q, k, v, grad, index=index, cu=cu))


def test_views_are_passed_to_the_kernels_in_place(kernels, monkeypatch):
    """No copy of a qkv view on the way in or of a gradient view on the way out: the
    kernels get the very tensors (same storage offset and strides)."""
    qkv, (q, k, v) = _dense_qkv()
    _, views = _grad_views(qkv, packed=False)
    seen = []
    run = kernels._run
    monkeypatch.setattr(kernels, "_run", lambda launches: (seen.extend(launches),
                                                           run(launches)))
    _step(kernels, q, k, v, out=views)
    args = {name: a for name, _, _, a, _ in seen}

    def same(a, b):
        return a.data_ptr() == b.data_ptr() and a.stride() == b.stride()

    assert all(same(a, b) for a, b in zip(args["fwd"][:3], (q, k, v), strict=True))
    assert all(same(a, b) for a, b in zip(args["dkdv"][:3], (q, k, v), strict=True))
    dq, dk, dv = views
    assert same(args["dkdv"][6], dk) and same(args["dkdv"][7], dv)
    assert same(args["dq"][6], dq)


def test_given_buffers_with_strided_rows(kernels):
    """A gradient tensor whose rows are not contiguous (last stride 2) still receives the
    gradient (through a scratch tensor), and each of dq, dk, dv may have its own strides."""
    _, (q, k, v) = _dense_qkv()
    wide = torch.full((B, H, N, 2 * D), float("nan"))
    views = (wide[..., ::2], torch.full((B, N, H, D), float("nan")).transpose(1, 2),
             torch.full((B, H, N, D), float("nan")))
    o, grad, grads = _step(kernels, q, k, v, out=views)
    assert all(g is w for g, w in zip(grads, views, strict=True))
    _check(o, grads, *_expected(q, k, v, grad))


def test_bad_output_buffers_are_refused(kernels):
    _, (q, k, v) = _dense_qkv()
    with pytest.raises(ValueError, match="three tensors"):
        _step(kernels, q, k, v, out=(torch.empty_like(q),) * 2)
    with pytest.raises(ValueError, match="out dk must be"):
        _step(kernels, q, k, v, out=(torch.empty_like(q), torch.empty_like(q[..., :4]),
                                     torch.empty_like(q)))


# ---------------------------------------------------------------- tile table
def test_tile_table_covers_every_launch(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "_interpreted", lambda: False)
    for head_dim in (1, 24, 64, 100, 128, 256):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for layout in kernels.LAYOUTS:
                cfg = kernels._blocks(head_dim, dtype, layout)
                assert cfg["block_d"] >= head_dim
                for name in kernels.PASSES:
                    block_m, block_n, warps, stages = cfg[name]
                    assert block_m >= 16 and block_n >= 16 and warps in (4, 8)
                    assert stages >= 1
    with pytest.raises(ValueError, match="layout must be one of"):
        kernels._blocks(64, torch.float16, "ragged")


# ---------------------------------------------------------------- TMA descriptors
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [32, 24], ids=lambda d: f"d={d}")
def test_tma_forward_matches_pointer_forward(kernels, dtype, d):
    """The descriptor path (run by the interpreter, which supports host-side tensor
    descriptors) reads what the pointer path reads: rows past N and columns past d are 0.
    Not bitwise: NumPy's matmul of the transposed K tile sums in another order (ulps)."""
    qkv = torch.randn(B, 37, 3, H, d, dtype=torch.float64).to(dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    args = (None, None, 0, d ** -0.5)
    assert kernels._tma_ok((q, k, v), "dense")  # so tma=True takes the descriptor path
    with_tma = kernels.attention_forward(q, k, v, *args, tma=True)
    without = kernels.attention_forward(q, k, v, *args, tma=False)
    for a, b in zip(with_tma, without, strict=True):
        torch.testing.assert_close(a, b)


def test_tma_only_where_descriptors_can_address_the_tensors(kernels):
    _, (q, k, v) = _dense_qkv(torch.float16)
    assert kernels._tma_ok((q, k, v), "dense")
    assert not kernels._tma_ok(tuple(t.float() for t in (q, k, v)), "dense")
    assert not kernels._tma_ok((q, k, v), "index")
    assert not kernels._tma_ok((q, k, v), "packed")
    odd = torch.randn(B, N, 3, H, 33).half().unbind(2)[0].transpose(1, 2)  # 66 B rows
    assert not kernels._tma_ok((odd, k, v), "dense")
    assert not kernels._tma_ok((q[..., 1:], k, v), "dense")  # unaligned base
