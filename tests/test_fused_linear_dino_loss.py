"""fused_linear_dino_loss against the formula of dino_loss(feats @ weight.T, ...) in float64.

Tolerances: ``smsd.testing.accuracy`` through ``tests/numerics.py`` (see
tests/test_dino_loss.py): the kernels' baseline is the formula in fp32 on the inputs
upcast to fp32, the floor the fp32 rounding floor of a reduction over max(K, D) (and, for
the loss, of its K * rows non-negative terms). The fp64 oracle starts from the logits:

* in fp16/bf16, as the op defines them, ``feats @ weight.T`` rounded to the input
  dtype: that rounding (about 0.3 in units of logits / student_temp in bf16) is shared
  by every implementation and would otherwise swamp what the test compares. The kernels
  write the logits' gradient in place into those fp16/bf16 logits and multiply it in
  that dtype, so grad_feats and grad_weight are allowed that rounding's first-order
  effect (``numerics.check_fused_linear``) besides one rounding of their own;
* in fp32, exact (fp64 matmul). An fp32 matmul's rounding depends on the BLAS kernel
  and the rows it is given: a chunk of 3 rows and all rows at once sum in different
  orders on some CPUs (AMD EPYC, MKL's CNR modes) and not on others. An oracle built on
  the full fp32 matmul shares the baseline's rounding and makes the baseline look 5x
  more accurate than it is there.

From there on the oracle is exact: fp64 loss, closed-form fp64 gradient of the logits,
fp64 matmuls for grad_feats and grad_weight. Chunk sizes that do not divide the rows
exercise the chunk loop.
"""

from __future__ import annotations

import pytest
import torch
from numerics import assert_all_ok, check_fused_linear, fused_formula

from smsd.ops import fused_linear_dino_loss

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_inputs(S, T, B, K, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sf = torch.nn.functional.normalize(torch.randn(S * B, D, generator=gen, dtype=torch.float64),
                                       dim=-1)
    tf = torch.nn.functional.normalize(torch.randn(T * B, D, generator=gen, dtype=torch.float64),
                                       dim=-1)
    weight = torch.randn(K, D, generator=gen, dtype=torch.float64) * 2.0
    center = torch.randn(1, K, generator=gen, dtype=torch.float64) * 0.1
    return sf, tf, weight, center


def run(fn, sf, tf, weight, center, **opts):
    s = sf.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    c = center.detach().clone()
    loss = fn(s, tf, w, c, **opts)
    loss.backward()
    return loss.detach(), s.grad, w.grad, c


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("S", "B", "K", "D", "chunk"),
                         [(4, 2, 257, 16, 3), (10, 1, 1000, 32, None), (2, 3, 300, 8, 1)])
def test_matches_formula(backend, dtype, S, B, K, D, chunk):
    sf, tf, weight, center = make_inputs(S, 2, B, K, D)
    assert_all_ok(check_fused_linear(sf, tf, weight, center, dtype, backend, n_student_views=S,
                                     chunk_rows=chunk))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_triton_small_blocks(monkeypatch, dtype):
    """The fused head's Triton kernels with blocks much smaller than K: many online
    log-sum-exp steps per student row, many column chunks per teacher row."""
    from conftest import backend_or_skip

    from smsd import _kernels

    backend_or_skip("triton")
    module = _kernels.load("dino_loss")
    monkeypatch.setattr(module, "_STUDENT_BLOCK", 128)
    monkeypatch.setattr(module, "_TEACHER_BLOCK_C", 64)
    sf, tf, weight, center = make_inputs(4, 2, 2, 1000, 16)
    assert_all_ok(check_fused_linear(sf, tf, weight, center, dtype, "triton", n_student_views=4,
                                     chunk_rows=3))


def test_only_weight_grad(backend):
    sf, tf, weight, center = make_inputs(4, 2, 2, 200, 16)
    w = weight.float().requires_grad_(True)
    loss = fused_linear_dino_loss(sf.float(), tf.float(), w, center.float(), n_student_views=4,
                                  chunk_rows=3)
    (2.0 * loss).backward()
    # the fp64 formula's grad_weight, twice: the fp32 matmuls' rounding is ~1e-6 of it
    want = 2.0 * fused_formula(*(x.float().double() for x in (sf, tf, weight, center)),
                               torch.float32, n_student_views=4)[2]
    assert torch.allclose(w.grad.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("index", "value", "error", "match"),
    [
        (2, lambda w: w[:, :5], ValueError, "features but weight"),
        (2, lambda w: w.double(), TypeError, "weight must have dtype"),
        (1, lambda t: t.half(), TypeError, "teacher_feats has dtype"),
        (3, lambda c: c[:, :10], ValueError, "center must have shape"),
    ],
)
def test_bad_input(index, value, error, match):
    args = [x.float() for x in make_inputs(4, 2, 2, 64, 8)]
    args[index] = value(args[index])
    with pytest.raises(error, match=match):
        fused_linear_dino_loss(*args, n_student_views=4)


def test_bad_chunk_rows():
    args = [x.float() for x in make_inputs(4, 2, 2, 64, 8)]
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_dino_loss(*args, n_student_views=4, chunk_rows=0)


def test_autocast_does_not_change_the_result(backend):
    """Under autocast the kernels' path still computes in its inputs' dtype."""
    if backend == "torch":
        pytest.skip("the torch backend is the reference, which follows autocast")
    sf, tf, weight, center = (x.float() for x in make_inputs(4, 2, 2, 200, 16))
    plain = run(fused_linear_dino_loss, sf, tf, weight, center, n_student_views=4, chunk_rows=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run(fused_linear_dino_loss, sf, tf, weight, center, n_student_views=4,
                   chunk_rows=3)
    for a, b in zip(plain, cast, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_teacher_weight(backend, dtype):
    """DINO's teacher head is an EMA of the student's: its logits use its own weight, which
    gets no gradient."""
    sf, tf, weight, center = make_inputs(4, 2, 3, 257, 16)
    teacher_weight = weight + 0.3 * torch.randn(weight.shape, dtype=weight.dtype)
    s, t, w, c = sf.to(dtype), tf.to(dtype), weight.to(dtype), center.float()
    tw = teacher_weight.to(dtype).requires_grad_(True)
    got = run(fused_linear_dino_loss, s, t, w, c, n_student_views=4, chunk_rows=5,
              teacher_weight=tw)
    assert tw.grad is None
    assert_all_ok(check_fused_linear(sf, tf, weight, center, dtype, backend, teacher_weight,
                                     n_student_views=4, chunk_rows=5))
    same = run(fused_linear_dino_loss, s, t, w, c, n_student_views=4, chunk_rows=5)
    assert not torch.equal(got[0], same[0])  # the teacher weight was used


def test_bad_teacher_weight():
    args = [x.float() for x in make_inputs(4, 2, 2, 64, 8)]
    with pytest.raises(ValueError, match="teacher_weight has shape"):
        fused_linear_dino_loss(*args, n_student_views=4, teacher_weight=args[2][:10])
    with pytest.raises(TypeError, match="teacher_weight has dtype"):
        fused_linear_dino_loss(*args, n_student_views=4, teacher_weight=args[2].half())
