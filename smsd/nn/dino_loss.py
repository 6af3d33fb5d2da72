"""``DINOLoss``: facebookresearch/dino's loss module, computed by :func:`smsd.ops.dino_loss`."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..ops import dino_loss, fused_linear_dino_loss

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """Same constructor, temperature schedule, ``forward`` and ``center`` buffer as DINO's.

    The teacher temperature rises linearly from ``warmup_teacher_temp`` to
    ``teacher_temp`` over ``warmup_teacher_temp_epochs`` epochs, then stays constant.
    ``student_output`` holds ``ncrops`` views and ``teacher_output`` the 2 global views,
    both view-major. The ``center`` buffer (fp32) is updated in place on every call,
    all-reduced across ranks when ``torch.distributed`` is initialized.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if warmup_teacher_temp_epochs > nepochs:
            raise ValueError(
                f"warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} exceeds "
                f"nepochs={nepochs}"
            )
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # a too high temperature makes training unstable at the beginning (DINO)
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def options(self, epoch: int) -> dict:
        """The loss's keyword options at ``epoch`` (the teacher temperature follows its
        warm-up schedule)."""
        return {"n_student_views": self.ncrops, "n_teacher_views": 2,
                "student_temp": self.student_temp,
                "teacher_temp": float(self.teacher_temp_schedule[epoch]),
                "center_momentum": self.center_momentum}

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor,
        epoch: int | None = None, *, options: dict | None = None,
    ) -> torch.Tensor:
        """The loss at ``epoch``, or with ``options`` from :meth:`options` (what a compiled
        step passes: reading the schedule inside a graph would tie it to one epoch)."""
        return dino_loss(student_output, teacher_output, self.center,
                         **self._resolve(epoch, options))

    def forward_fused(self, student_feats: torch.Tensor, teacher_feats: torch.Tensor,
                      weight: torch.Tensor, epoch: int | None = None, *,
                      options: dict | None = None,
                      teacher_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The same loss on ``feats @ weight.T`` logits that are never stored
        (:func:`~smsd.ops.fused_linear_dino_loss`): the head's last layer ``weight``
        ``[out_dim, D]`` and its inputs; ``teacher_weight``: the teacher head's own layer."""
        return fused_linear_dino_loss(student_feats, teacher_feats, weight, self.center,
                                      teacher_weight=teacher_weight,
                                      **self._resolve(epoch, options))

    def _resolve(self, epoch: int | None, options: dict | None) -> dict:
        if (epoch is None) == (options is None):
            raise TypeError("pass either epoch or options")
        return self.options(epoch) if options is None else options
