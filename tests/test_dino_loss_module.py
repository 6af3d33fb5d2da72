"""smsd.nn.DINOLoss against a copy of facebookresearch/dino's DINOLoss (its oracle).

``OfficialDINOLoss`` below keeps the official module's semantics line for line; the
only change is that the all-reduce runs when torch.distributed is initialized (the
official code assumes it always is).
"""

from __future__ import annotations

import numpy as np
import oracles
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from smsd.nn import DINOLoss
from smsd.testing import accuracy, rounding_floor, summation_floor


class OfficialDINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1,
                 center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp,
                        teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp
        ))

    def forward(self, student_output, teacher_output, epoch):
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


ARGS = dict(out_dim=300, ncrops=6, warmup_teacher_temp=0.04, teacher_temp=0.07,
            warmup_teacher_temp_epochs=3, nepochs=5)


def test_schedule_and_buffer_match_official():
    ours, official = DINOLoss(**ARGS), OfficialDINOLoss(**ARGS)
    np.testing.assert_array_equal(ours.teacher_temp_schedule, official.teacher_temp_schedule)
    assert list(ours.state_dict()) == ["center"] == list(official.state_dict())
    assert ours.center.dtype == torch.float32 and ours.center.shape == (1, 300)


def test_warmup_longer_than_training_is_an_error():
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        DINOLoss(**{**ARGS, "warmup_teacher_temp_epochs": 6})


def test_drop_in_over_epochs(backend):
    """Loss, student gradient and center over every epoch of the schedule (the center
    carries over between calls), fp32 module vs the official module in fp64. Baseline:
    the independent formula (tests/oracles.py) in fp32 with its own carried center, not
    the official module in fp32, whose arithmetic is the torch backend's own."""
    ours, official = DINOLoss(**ARGS), OfficialDINOLoss(**ARGS).double()
    plain_center = torch.zeros(1, ARGS["out_dim"])
    gen = torch.Generator().manual_seed(0)
    B = 2
    for epoch in range(ARGS["nepochs"]):
        student = torch.randn(ARGS["ncrops"] * B, ARGS["out_dim"], generator=gen,
                              dtype=torch.float64)
        teacher = torch.randn(2 * B, ARGS["out_dim"], generator=gen, dtype=torch.float64)
        s_ours = student.float().requires_grad_(True)
        s_ref = student.clone().requires_grad_(True)
        center_before = official.center.clone()
        loss = ours(s_ours, teacher.float(), epoch)
        ref = official(s_ref, teacher, epoch)
        for out in (loss, ref):
            out.backward()
        opts = dict(n_student_views=ARGS["ncrops"],
                    teacher_temp=float(official.teacher_temp_schedule[epoch]))
        base_loss, base_grad, plain_center = oracles.dino_loss(
            student.float(), teacher.float(), plain_center, **opts)
        floors = rounding_floor(
            lambda s, t, c, opts=opts: oracles.dino_loss(s, t, c, **opts),
            [student.float().double(), teacher.float().double(), center_before],
            ARGS["out_dim"])
        floors[0] = max(floors[0], summation_floor(float(ref.detach()), student.numel()))
        for name, got, b, r, f in (
            ("loss", loss.detach(), base_loss, ref.detach(), floors[0]),
            ("grad", s_ours.grad, base_grad, s_ref.grad, floors[1]),
            ("center", ours.center, plain_center, official.center, floors[2]),
        ):
            acc = accuracy(got, b, r, floor=f)
            assert acc.ok, f"epoch {epoch} {name}: {acc}"


def test_forward_fused_equals_forward_on_the_logits():
    """``forward_fused(feats, weight)`` is ``forward(feats @ weight.T)``: same loss, same
    gradients, same center update, without storing the logits."""
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(4 * 3, 16, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2 * 3, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(97, 16, generator=gen, dtype=torch.float64)
    losses, grads, centers = [], [], []
    for fused in (False, True):
        module = DINOLoss(97, 4, 0.04, 0.04, 0, 3)
        f, w = feats.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if fused:
            loss = module.forward_fused(f.float(), teacher.float(), w.float(), epoch=1)
        else:
            loss = module((f.float() @ w.float().T), (teacher.float() @ w.float().T), epoch=1)
        loss.backward()
        losses.append(loss.detach())
        grads.append((f.grad, w.grad))
        centers.append(module.center.clone())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(centers[1], centers[0], rtol=1e-5, atol=1e-7)
