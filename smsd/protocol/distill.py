"""One masked-sampling distillation step: the server's hot loop body.

Kept apart from :class:`smsd.protocol.Server` (data, schedules, checkpoints, logging) so
that the training loop, the multi-GPU path and ``benchmarks/train_step.py`` run exactly
the same step. The step never synchronizes with the host: it returns the loss as a
tensor and leaves checking it to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..models import DINOHead, ViTBody
from ..nn import DINOLoss
from ..ops import masked_sample
from ..validation import validation

__all__ = ["DistillStep", "StepSchedule", "StudentModel", "koleo_loss"]


class StudentModel(nn.Module):
    """Body + DINO projection head."""

    def __init__(self, body: ViTBody, head: DINOHead) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, views: Sequence[torch.Tensor], packed: bool,
                return_features: bool = False):
        features = self.body.forward_views(views, packed=packed)
        out = self.head(features)
        return (out, features) if return_features else out


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regularizer: ``-mean log(distance to the nearest neighbour)`` of the
    L2-normalized rows; it spreads features over the sphere, against collapse."""
    x = nn.functional.normalize(features.float(), dim=-1, eps=eps)
    dots = x @ x.T
    dots.fill_diagonal_(-2.0)  # never pick yourself as the neighbour
    nearest = dots.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()


@dataclass(frozen=True)
class StepSchedule:
    """The scheduled values of one step."""

    epoch: int
    lr: float
    weight_decay: float
    momentum: float
    freeze_last_layer: bool = False


class DistillStep:
    """Student on every view, EMA teacher on the two global views, DINO loss, update.

    Args:
        student: the trained model, or its ``DistributedDataParallel`` wrapper.
        teacher: a :class:`StudentModel` updated as an EMA of the student.
        loss_fn: :class:`smsd.nn.DINOLoss` (holds the center).
        optimizer: its param group 0 is decayed, the others are not.
        packed: run all views in one packed varlen attention call.
        koleo_weight: weight of :func:`koleo_loss` on the global views' CLS features.
        clip_grad: max gradient norm (0 = off).
        autocast_dtype: autocast dtype on CUDA (None = full precision).
    """

    def __init__(self, student: nn.Module, teacher: StudentModel, loss_fn: DINOLoss,
                 optimizer: torch.optim.Optimizer, *, packed: bool, koleo_weight: float = 0.0,
                 clip_grad: float = 0.0,
                 autocast_dtype: torch.dtype | None = torch.bfloat16) -> None:
        self.student = student
        self.teacher = teacher
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.packed = packed
        self.koleo_weight = koleo_weight
        self.clip_grad = clip_grad
        self.autocast_dtype = autocast_dtype
        module = getattr(student, "module", student)  # unwrap DDP
        self._student_params = list(module.parameters())
        self._teacher_params = list(teacher.parameters())
        self._last_layer = [p for name, p in module.head.named_parameters()
                            if name.startswith("last_layer")]

    def __call__(self, x: torch.Tensor, index: Sequence[torch.Tensor],
                 schedule: StepSchedule) -> torch.Tensor:
        """One update on images ``x`` ``[B, N, D]`` with one index ``[B, k]`` per view
        (global views first); returns the detached loss."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = schedule.lr
            group["weight_decay"] = schedule.weight_decay if i == 0 else 0.0
        batch = x.shape[0]
        autocast = torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16,
                                  enabled=x.device.type == "cuda"
                                  and self.autocast_dtype is not None)
        with validation(False), autocast:  # indices come from sample_views: in range
            views = [masked_sample(x, idx) for idx in index]
            with torch.no_grad():
                teacher_out = self.teacher(views[:2], self.packed).float()
            student_out, features = self.student(views, self.packed, return_features=True)
            loss = self.loss_fn(student_out.float(), teacher_out, schedule.epoch)
            if self.koleo_weight:
                # As in DINOv2: on the CLS features of each global view separately.
                loss = loss + self.koleo_weight * sum(
                    koleo_loss(f) for f in features[:2 * batch].chunk(2))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad:
            nn.utils.clip_grad_norm_(self._student_params, self.clip_grad)
        if schedule.freeze_last_layer:
            for p in self._last_layer:
                p.grad = None
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self._teacher_params, self._student_params,
                                 1.0 - schedule.momentum)
        return loss.detach()
