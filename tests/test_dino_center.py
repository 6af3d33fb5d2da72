"""DINO's center after one call, on every backend, against DINO's formula written here in
float64 (not smsd.ops.reference): ``c ← m·c + (1 − m)·mean(teacher rows)``, applied after
the loss used the old center.

Tolerance: the center is fp32; the kernels sum K columns over at most 2·B = 14 rows in
fp32, so each entry is off by a few fp32 ulps of values ≤ 10: ``atol=1e-5`` is ~100 ulps,
while a momentum off by 0.01 moves the center by ~1e-2 here.
"""

from __future__ import annotations

import pytest
import torch

from smsd.ops import dino_loss


@pytest.mark.parametrize("K", [7, 513])
@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_center_is_the_ema_of_the_teacher_mean(backend, K, momentum):
    gen = torch.Generator().manual_seed(K)
    batch, views = 7, 4
    student = torch.randn(views * batch, K, generator=gen)
    teacher = torch.randn(2 * batch, K, generator=gen) * 3
    center = torch.randn(1, K, generator=gen)
    expected = (momentum * center.double()
                + (1 - momentum) * teacher.double().mean(0, keepdim=True))
    before = center.clone()
    dino_loss(student, teacher, center, n_student_views=views, center_momentum=momentum)
    torch.testing.assert_close(center.double(), expected, rtol=0, atol=1e-5)
    assert (center - before).abs().max() > 1e-2  # the center did move
