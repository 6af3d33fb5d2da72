"""fused_linear_dino_loss against the unfused composition dino_loss(feats @ weight.T, ...).

Tolerances: ``smsd.testing.accuracy`` (see tests/test_dino_loss.py) with plain PyTorch's
unfused composition in the same dtype as the baseline. The fp64 oracle starts from the
logits as the op defines them, ``feats @ weight.T`` in the input dtype: in bf16 that
rounding (about 0.3 in units of logits / student_temp) is shared by every
implementation and would otherwise swamp what the test compares. From there on the
oracle is exact: fp64 loss, fp64 gradient of the logits, fp64 matmuls for grad_feats
and grad_weight. Chunk sizes that do not divide the rows exercise the chunk loop.
"""

from __future__ import annotations

import pytest
import torch

from smsd.ops import fused_linear_dino_loss, reference
from smsd.testing import accuracy

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


def oracle(sf, tf, weight, center, **opts):
    """fp64 loss and gradients from the dtype logits (see the module docstring)."""
    logits = (sf @ weight.T).double().requires_grad_(True)
    c = center.double().clone()
    loss = reference.dino_loss(logits, (tf @ weight.T).double(), c, **opts)
    loss.backward()
    grad_feats = logits.grad @ weight.double()
    grad_weight = logits.grad.T @ sf.double()
    return loss.detach(), grad_feats, grad_weight, c


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
def test_matches_unfused(backend, dtype, S, B, K, D, chunk):
    sf, tf, weight, center = make_inputs(S, 2, B, K, D)
    s, t, w, c = sf.to(dtype), tf.to(dtype), weight.to(dtype), center.float()
    got = run(fused_linear_dino_loss, s, t, w, c, n_student_views=S, chunk_rows=chunk)
    exact = oracle(s, t, w, c, n_student_views=S)
    plain = run(reference.fused_linear_dino_loss, s, t, w, c, n_student_views=S)
    for name, value, base, ref in zip(("loss", "grad_feats", "grad_weight", "center"),
                                      got, plain, exact, strict=True):
        acc = accuracy(value, base, ref)
        assert acc.ok, f"{name}: {acc}"


def test_only_weight_grad(backend):
    sf, tf, weight, center = make_inputs(4, 2, 2, 200, 16)
    w = weight.float().requires_grad_(True)
    loss = fused_linear_dino_loss(sf.float(), tf.float(), w, center.float(), n_student_views=4,
                                  chunk_rows=3)
    (2.0 * loss).backward()
    w_ref = weight.clone().requires_grad_(True)
    ref = reference.fused_linear_dino_loss(sf, tf, w_ref, center.clone(), n_student_views=4)
    (2.0 * ref).backward()
    assert torch.allclose(w.grad.double(), w_ref.grad, rtol=1e-4, atol=1e-6)


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
    plain = run(reference.fused_linear_dino_loss, s, t, w, c, n_student_views=4,
                teacher_weight=tw.detach())
    logits = (s @ w.T).double().requires_grad_(True)
    exact_center = c.double().clone()
    loss = reference.dino_loss(logits, (t @ tw.detach().T).double(), exact_center,
                               n_student_views=4)
    loss.backward()
    exact = (loss.detach(), logits.grad @ w.double(), logits.grad.T @ s.double(), exact_center)
    for name, value, base, ref in zip(("loss", "grad_feats", "grad_weight", "center"),
                                      got, plain, exact, strict=True):
        acc = accuracy(value, base, ref)
        assert acc.ok, f"{name}: {acc}"
    same = run(fused_linear_dino_loss, s, t, w, c, n_student_views=4, chunk_rows=5)
    assert not torch.equal(got[0], same[0])  # the teacher weight was used


def test_bad_teacher_weight():
    args = [x.float() for x in make_inputs(4, 2, 2, 64, 8)]
    with pytest.raises(ValueError, match="teacher_weight has shape"):
        fused_linear_dino_loss(*args, n_student_views=4, teacher_weight=args[2][:10])
    with pytest.raises(TypeError, match="teacher_weight has dtype"):
        fused_linear_dino_loss(*args, n_student_views=4, teacher_weight=args[2].half())
