"""The accuracy rule (smsd.testing, applied by tests/numerics.py) fails real bugs.

Each planted bug is a plain-PyTorch stand-in for a kernel with one classic defect,
computed as the kernels compute (in fp32 on the upcast inputs, outputs stored in the
input dtype), run through the same checks the op tests use. The bounds must stay far
below what such a defect does in every dtype (bf16 included: a loss 0.1 % off, a
gradient 2 % off, a missing center), the stand-ins without the defect must pass, and the
floor must grow with the accumulation length and with the problem's conditioning, as
its derivation says.
"""

from __future__ import annotations

import numerics
import pytest
import torch
import torch.nn.functional as F

from smsd.ops import reference
from smsd.testing import accuracy, output_rounding, rounding_floor, summation_floor

# The stand-ins replace the op; "cpp" only tells the checks to use the kernels' baseline
# (fp32 on the upcast inputs) and their per-element rounding allowances.
KERNEL = "cpp"
TWO_DTYPES = (torch.float32, torch.bfloat16)


def _in_fp32(fn):
    """``fn`` computed in fp32 on the upcast inputs, the result stored in the input dtype
    (autograd rounds the gradients back the same way): a kernel that accumulates in fp32."""
    def run(q, k, v, **kwargs):
        return fn(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return run


def _drop_last_key(q, k, v, **kwargs):
    """Off-by-one in the key mask: the last key is never attended to."""
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    mask[:, -1] = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _no_rescale(q, k, v, **kwargs):
    """A blocked softmax that never rescales across key blocks: each half of the keys is
    normalized on its own and the halves averaged, as when the running max/sum of an
    online softmax is not carried from one block to the next."""
    n = k.shape[-2] // 2
    halves = [F.scaled_dot_product_attention(q, k[..., s, :], v[..., s, :])
              for s in (slice(None, n), slice(n, None))]
    return (halves[0] + halves[1]) / 2


def _qkv(B=1, H=2, N=197, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(B, H, N, d, generator=gen, dtype=torch.float64) for _ in range(4))
    return [q, k, v], g


@pytest.mark.parametrize("dtype", TWO_DTYPES, ids=str)
@pytest.mark.parametrize("planted", [_drop_last_key, _no_rescale], ids=lambda f: f.__name__)
def test_attention_rule_fails_planted_bugs(monkeypatch, dtype, planted):
    qkv, grad = _qkv()
    monkeypatch.setattr(numerics, "attention", _in_fp32(planted))
    results = numerics.check_attention(dtype, qkv, grad, KERNEL)
    assert not results["out"].ok, results["out"]
    if dtype == torch.float32:
        assert results["out"].error > 100 * results["out"].floor


@pytest.mark.parametrize("dtype", TWO_DTYPES, ids=str)
def test_attention_rule_passes_an_fp32_implementation(monkeypatch, dtype):
    qkv, grad = _qkv()
    monkeypatch.setattr(numerics, "attention", _in_fp32(reference.attention))
    results = numerics.check_attention(dtype, qkv, grad, KERNEL)
    assert all(acc.ok for acc in results.values()), results


def _loss_in_fp32(scale_loss=1.0, scale_grad=1.0, center=True):
    """dino_loss as the kernels compute it (fp32 loss from upcast inputs, the gradient
    stored in the input dtype), with an optional defect."""
    class Planted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, student, teacher, c, opts):
            s = student.detach().float().requires_grad_(True)
            c_used = c if center else torch.zeros_like(c)
            with torch.enable_grad():
                loss = reference.dino_loss(s, teacher.float(), c_used.clone(), **opts,
                                           update_center=False)
                loss.backward()
            ctx.grad = (s.grad * scale_grad).to(student.dtype)
            return loss.detach() * scale_loss

        @staticmethod
        def backward(ctx, grad_loss):
            return ctx.grad * grad_loss.to(ctx.grad.dtype), None, None, None

    def dino_loss(student, teacher, c, update_center=True, **opts):
        loss = Planted.apply(student, teacher, c, opts)
        if update_center:
            momentum = opts.get("center_momentum", 0.9)
            c.mul_(momentum).add_(teacher.float().mean(0, keepdim=True), alpha=1 - momentum)
        return loss

    return dino_loss


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize(
    "planted, fails",
    [
        (dict(scale_loss=1 + 1e-3), "loss"),  # the loss 0.1 % off
        (dict(scale_grad=1.02), "grad"),  # the gradient 2 % off
        (dict(center=False), "loss"),  # the center dropped from the teacher softmax
    ],
    ids=["loss-0.1%", "grad-2%", "no-center"],
)
def test_loss_rule_fails_planted_bugs(monkeypatch, dtype, planted, fails):
    """At K=4096 (10 student views), the shape where bf16's old bound (2x PyTorch in bf16,
    0.03-0.08) passed all three."""
    student, teacher, center = numerics.dino_inputs(10, 2, 1, 4096)
    monkeypatch.setattr(numerics, "dino_loss", _loss_in_fp32(**planted))
    results = numerics.check_dino_loss(student, teacher, center, dtype, KERNEL,
                                       n_student_views=10)
    assert not results[fails].ok, results[fails]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_loss_rule_passes_an_fp32_implementation(monkeypatch, dtype):
    student, teacher, center = numerics.dino_inputs(10, 2, 1, 4096)
    monkeypatch.setattr(numerics, "dino_loss", _loss_in_fp32())
    results = numerics.check_dino_loss(student, teacher, center, dtype, KERNEL,
                                       n_student_views=10)
    assert all(acc.ok for acc in results.values()), results


def test_one_rounding_of_a_low_precision_output_is_allowed_and_no_more():
    exact = torch.randn(1000, dtype=torch.float64) * torch.logspace(-3, 3, 1000,
                                                                     dtype=torch.float64)
    fp32 = exact.float()
    rounded = fp32.bfloat16()
    assert accuracy(rounded, fp32, exact).ok
    # two bf16 ulps off on one element, or every element 1 % off, is more than a rounding
    off = rounded.clone()
    off[500] = off[500] * (1 + 2 * torch.finfo(torch.bfloat16).eps)
    assert not accuracy(off, fp32, exact).ok
    assert not accuracy(rounded * 1.01, fp32, exact).ok
    # the allowance is per element: a small element may not take a large one's
    small = rounded.clone()
    small[0] = small[0] + float(rounded.abs().max()) * torch.finfo(torch.bfloat16).eps / 4
    assert not accuracy(small, fp32, exact).ok
    assert (output_rounding(rounded) <= 2 * torch.finfo(torch.bfloat16).eps
            * rounded.double().abs() + 1e-37).all()


def test_nan_fails_the_rule():
    exact = torch.randn(10, dtype=torch.float64)
    value = exact.bfloat16()
    value[3] = float("nan")
    assert not accuracy(value, exact.float(), exact).ok


def _dino_inputs(K=1000, rows=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, K, generator=gen, dtype=torch.float64)
    t = torch.randn(4, K, generator=gen, dtype=torch.float64)
    c = torch.randn(1, K, generator=gen, dtype=torch.float64) * 0.1
    return s, t, c


def _dino(s, t, c, student_temp=0.1):
    leaf = s.detach().clone().requires_grad_(True)
    loss = reference.dino_loss(leaf, t, c.detach().clone(), n_student_views=4,
                               student_temp=student_temp)
    loss.backward()
    return [loss.detach(), leaf.grad]


def test_floor_grows_with_accumulation_length_and_conditioning():
    s, t, c = (x.float().double() for x in _dino_inputs())
    loss_floor = lambda n, temp: rounding_floor(  # noqa: E731
        lambda *xs: _dino(*xs, student_temp=temp), [s, t, c], n)[0]
    # sqrt(n): 16x longer sums, 4x the floor (within the sampling noise of 3 draws)
    assert 2.5 < loss_floor(16_000, 0.1) / loss_floor(1_000, 0.1) < 6.5
    # a sharper softmax amplifies the inputs' rounding: temperature 0.1 -> 0.025
    assert loss_floor(1_000, 0.025) > 2.5 * loss_floor(1_000, 0.1)


def test_summation_floor():
    assert summation_floor(40.0, 4096) == pytest.approx(64 * 2.0**-24 * 40)
    assert summation_floor(-40.0, 1) == summation_floor(40.0, 1)
    with pytest.raises(ValueError, match="n must be"):
        summation_floor(1.0, 0)


def test_floor_rejects_bad_length():
    with pytest.raises(ValueError, match="accumulation_length"):
        rounding_floor(lambda x: [x], [torch.ones(2, dtype=torch.float64)], 0)
