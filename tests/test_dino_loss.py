"""dino_loss against an independent float64 formula of DINO's loss (tests/oracles.py).

Tolerances follow ``smsd.testing.accuracy`` through ``tests/numerics.py``: against the fp64
formula on the same rounded inputs, a backend's max error may be at most 2x the error of
plain PyTorch in the precision the backend computes in, or the fp32 rounding floor of a
reduction over K, whichever is larger, plus one ulp of the output's scale. The kernels
accumulate in fp32 whatever the input dtype, so their baseline is the formula in fp32 on
the upcast inputs (~1e-6 relative: a loss 0.1 % off fails in every dtype), and their
fp16/bf16 gradient is allowed one rounding to its dtype per element. The ``torch`` backend
(the reference) computes in the input dtype: its baseline is the formula in that dtype.

Teachers are soft (top probability 0.1-0.9) so that the center and the targets matter;
one case keeps DINO's nearly one-hot late teachers.
"""

from __future__ import annotations

import math

import oracles
import pytest
import torch
from numerics import assert_all_ok, check_dino_loss, dino_inputs

import smsd
from smsd import _kernels
from smsd.ops import dino_loss
from smsd.testing import max_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (n_student_views, B, K): view counts 2/4/10, B=1, K not a power of two; few rows so
# the Triton interpreter stays fast. The Triton student kernel's block is
# min(4096, next_pow2(K)): K=4097 and 8193 run its online log-sum-exp over 2 and 3 blocks
# (the rescale d * exp(m - m_new) and a last block of 1 column).
SHAPES = ((2, 3, 257), (4, 2, 1000), (10, 1, 4096), (10, 2, 257), (2, 1, 4097), (3, 1, 8193))


def make_inputs(S, T, B, K, *, scale=None, seed=0):
    """Soft teachers (``numerics.dino_inputs``); ``scale`` multiplies every logit."""
    if scale is None:
        return dino_inputs(S, T, B, K, seed=seed)
    return dino_inputs(S, T, B, K, teacher_scale=scale, student_scale=scale, seed=seed)


def run(fn, student, teacher, center, **opts):
    """(loss, student grad, center after the call) of ``fn`` on copies of the inputs."""
    s = student.detach().clone().requires_grad_(True)
    c = center.detach().clone()
    loss = fn(s, teacher.detach().clone(), c, **opts)
    loss.backward()
    return loss.detach(), s.grad, c


def formula(student, teacher, center, **opts):
    """The fp64 formula (loss, grad, center) of ``tests/oracles.py``."""
    opts = {k: v for k, v in opts.items() if k != "update_center"}
    return oracles.dino_loss(student.double(), teacher.double(), center.double(), **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("S", "B", "K"), SHAPES, ids=lambda v: str(v))
def test_matches_formula(backend, dtype, S, B, K):
    student, teacher, center = make_inputs(S, 2, B, K)
    if K == 4097:  # row 0's max in the 1-column last block: the online max moves there
        student[0, -1] = student[0].max() + 0.5
    assert_all_ok(check_dino_loss(student, teacher, center, dtype, backend, n_student_views=S))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sharp_teachers(backend, dtype):
    """DINO's late teachers: nearly one-hot (top probability 0.97-1)."""
    student, teacher, center = dino_inputs(4, 2, 2, 1000, teacher_scale=1.0)
    assert_all_ok(check_dino_loss(student, teacher, center, dtype, backend, n_student_views=4))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize(("block", "images"), ((128, 1), (64, 2), (256, 8)))
def test_triton_small_blocks(monkeypatch, dtype, block, images):
    """The Triton kernels with column chunks much smaller than K (many chunk partials
    merged per row) and few images per program (several groups whose column sums are
    added; a last group with fewer images than the others)."""
    from conftest import backend_or_skip

    backend_or_skip("triton")
    module = _kernels.load("dino_loss")
    monkeypatch.setattr(module, "_FLOOR_BLOCK", block)
    monkeypatch.setattr(module, "_FLOOR_IMAGES", images)
    student, teacher, center = make_inputs(4, 2, 5, 1000)
    assert_all_ok(check_dino_loss(student, teacher, center, dtype, "triton", n_student_views=4))


@pytest.mark.parametrize(("S", "T"), ((3, 1), (2, 3), (1, 2)))
def test_view_counts(backend, S, T):
    student, teacher, center = make_inputs(S, T, 2, 300)
    assert_all_ok(check_dino_loss(student, teacher, center, torch.float32, backend,
                                  n_student_views=S, n_teacher_views=T))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_options(backend, dtype):
    student, teacher, center = make_inputs(4, 2, 2, 500)
    assert_all_ok(check_dino_loss(student, teacher, center, dtype, backend, n_student_views=4,
                                  student_temp=0.2, teacher_temp=0.07, center_momentum=0.5))


def test_update_center_false(backend):
    student, teacher, center = make_inputs(4, 2, 2, 300)
    c = center.float()
    _, _, c_after = run(dino_loss, student.float(), teacher.float(), c, n_student_views=4,
                        update_center=False)
    assert torch.equal(c_after, c)


def test_large_logits_do_not_overflow(backend):
    student, teacher, center = make_inputs(4, 2, 2, 257, scale=1e4)
    assert_all_ok(check_dino_loss(student, teacher, center, torch.float32, backend,
                                  n_student_views=4))
    loss, grad, c = run(dino_loss, student.float(), teacher.float(), center.float(),
                        n_student_views=4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.isfinite(c).all()


def test_nan_in_student_like_formula(backend):
    student, teacher, center = make_inputs(4, 2, 2, 257)
    student[5, 17] = float("nan")
    got = run(dino_loss, student.float(), teacher.float(), center.float(), n_student_views=4)
    ref = formula(student, teacher, center, n_student_views=4)
    assert torch.isnan(got[0])
    for name, value, expected in zip(("loss", "grad", "center"), got, ref, strict=True):
        assert not math.isnan(max_error(value, expected)), f"{name}: NaN pattern differs"


def test_nan_in_teacher_like_formula(backend):
    student, teacher, center = make_inputs(4, 2, 2, 257)
    teacher[1, 3] = float("nan")
    got = run(dino_loss, student.float(), teacher.float(), center.float(), n_student_views=4)
    ref = formula(student, teacher, center, n_student_views=4)
    assert torch.isnan(got[0]) and torch.isnan(got[2][0, 3])
    for name, value, expected in zip(("loss", "grad", "center"), got, ref, strict=True):
        assert not math.isnan(max_error(value, expected)), f"{name}: NaN pattern differs"


@pytest.mark.parametrize("layout", ("column_stride", "transposed", "row_padding"))
def test_non_contiguous_inputs(backend, layout):
    S, B, K = 4, 2, 300
    student, teacher, center = make_inputs(S, 2, B, K)

    def strided(x):
        if layout == "column_stride":
            wide = torch.zeros(x.shape[0], 2 * K, dtype=x.dtype)
            wide[:, ::2] = x
            return wide[:, ::2]
        if layout == "transposed":
            return x.t().contiguous().t()
        wide = torch.zeros(x.shape[0], K + 13, dtype=x.dtype)
        wide[:, :K] = x
        return wide[:, :K]

    s, t = strided(student.float()), strided(teacher.float())
    c_wide = torch.zeros(1, 2 * K)
    c_wide[:, ::2] = center.float()
    c = c_wide[:, ::2]  # updated in place through the view
    loss = dino_loss(s.requires_grad_(True), t, c, n_student_views=S)
    loss.backward()
    contiguous = run(dino_loss, student.float(), teacher.float(), center.float(),
                     n_student_views=S)
    ref_loss, ref_grad, ref_center = formula(student.float(), teacher.float(), center.float(),
                                             n_student_views=S)
    # the strided layouts go through the same kernels: the results of contiguous copies
    # (which test_matches_formula holds to the rule), to fp32 rounding of K-term sums
    assert max_error(loss, ref_loss) <= 2 * max_error(contiguous[0], ref_loss) + 1e-6
    assert max_error(s.grad, ref_grad) <= 2 * max_error(contiguous[1], ref_grad) + 1e-7
    assert max_error(c_wide[:, ::2], ref_center) <= 2 * max_error(contiguous[2], ref_center) + 1e-7


def test_backward_scales_by_grad_output(backend):
    student, teacher, center = make_inputs(4, 2, 2, 300)
    s = student.float().requires_grad_(True)
    loss = dino_loss(s, teacher.float(), center.float(), n_student_views=4)
    (3.0 * loss).backward(retain_graph=True)
    once = s.grad.clone()
    loss.backward()  # a second backward adds the unscaled gradient
    assert torch.allclose(s.grad, once * (4.0 / 3.0), rtol=1e-6, atol=1e-9)


def test_teacher_gets_no_gradient(backend):
    student, teacher, center = make_inputs(4, 2, 2, 300)
    s = student.float().requires_grad_(True)
    t = teacher.float().requires_grad_(True)
    dino_loss(s, t, center.float(), n_student_views=4).backward()
    assert t.grad is None and s.grad is not None


def test_no_grad_needed(backend):
    student, teacher, center = make_inputs(4, 2, 2, 300)
    loss = dino_loss(student.float(), teacher.float(), center.float(), n_student_views=4)
    with_grad = run(dino_loss, student.float(), teacher.float(), center.float(),
                    n_student_views=4)[0]
    assert not loss.requires_grad
    assert torch.equal(loss, with_grad)  # the same kernels, without writing the gradient


def good_args():
    student, teacher, center = make_inputs(4, 2, 2, 64)
    return student.float(), teacher.float(), center.float()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a, k: a.__setitem__(0, a[0].long()), TypeError, "student must have dtype"),
        (lambda a, k: a.__setitem__(0, a[0].double()), TypeError, "student must have dtype"),
        (lambda a, k: a.__setitem__(0, [1.0]), TypeError, "student must be a torch.Tensor"),
        (lambda a, k: a.__setitem__(1, a[1].half()), TypeError, "teacher has dtype"),
        (lambda a, k: a.__setitem__(2, a[2].half()), TypeError, "center must have dtype"),
        (lambda a, k: a.__setitem__(0, a[0][:7]), ValueError, "n_student_views=4"),
        (lambda a, k: a.__setitem__(1, a[1][:3]), ValueError, "teacher has 3 rows"),
        (lambda a, k: a.__setitem__(1, a[1][:, :60]), ValueError, "teacher has 60 columns"),
        (lambda a, k: a.__setitem__(2, a[2][:, :60]), ValueError, "center must have shape"),
        (lambda a, k: a.__setitem__(0, a[0][0]), ValueError, "student must have 2 dimensions"),
        (lambda a, k: k.update(student_temp=0.0), ValueError, "student_temp"),
        (lambda a, k: k.update(teacher_temp=-1.0), ValueError, "teacher_temp"),
        (lambda a, k: k.update(center_momentum=1.5), ValueError, "center_momentum"),
        (lambda a, k: k.update(n_student_views=2.0), TypeError, "n_student_views must be an int"),
        (lambda a, k: k.update(n_teacher_views=0), ValueError, "n_teacher_views must be >= 1"),
        (lambda a, k: k.update(update_center=1), TypeError, "update_center"),
    ],
)
def test_bad_input(change, error, match):
    args, kwargs = list(good_args()), {"n_student_views": 4}
    change(args, kwargs)
    with pytest.raises(error, match=match):
        dino_loss(*args, **kwargs)


def test_single_views_have_no_pairs():
    s, t, c = make_inputs(1, 1, 2, 64)
    with pytest.raises(ValueError, match="no pair"):
        dino_loss(s.float(), t.float(), c.float(), n_student_views=1, n_teacher_views=1)


def test_auto_backend_on_cpu_uses_cpp_when_built():
    if not smsd.backends()["cpp"].available:
        pytest.skip("cpp extension not built")
    student, teacher, center = good_args()
    with smsd.use_backend("auto"):
        loss = dino_loss(student.bfloat16(), teacher.bfloat16(), center, n_student_views=4)
    assert loss.dtype == torch.float32  # the kernels' fp32 loss, not the reference's bf16


def test_repeated_backward_accumulates(backend):
    """The stored gradient is handed out as is when grad_output is 1; accumulating into
    ``.grad`` over several backward calls must not alter it."""
    student, teacher, center = make_inputs(4, 2, 2, 300)
    s = student.float().requires_grad_(True)
    loss = dino_loss(s, teacher.float(), center.float(), n_student_views=4)
    loss.backward(retain_graph=True)
    once = s.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    assert torch.allclose(s.grad, 3 * once, rtol=1e-6, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_formula_on_gpu_at_full_k():
    """The DINO head's output sizes (K=65536 and 60000, 10+2 views, B=4) through the
    compiled Triton kernels, soft and sharp teachers, every dtype, under the same rule
    (tests/numerics.py, run without the interpreter)."""
    from conftest import run_without_interpreter

    run_without_interpreter("tests/numerics.py", "dino-loss", timeout=900)


def test_rescale_reads_no_device_value():
    """Off the CPU the stored gradient is always scaled: reading grad_output there would
    synchronize the host every step (a meta tensor has no value to read at all)."""
    from smsd.ops.dino_loss import scale_saved_grad

    grad = torch.ones(3, 5, device="meta")
    scaled = scale_saved_grad(grad, torch.ones((), device="meta"))
    assert scaled is not grad and scaled.shape == grad.shape
    cpu_grad = torch.ones(3, 5)
    assert scale_saved_grad(cpu_grad, torch.ones(())) is cpu_grad  # free on the CPU
