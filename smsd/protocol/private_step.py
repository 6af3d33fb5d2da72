"""One differentially private masked-sampling distillation step (DP-SGD over images).

Per-image gradients by microbatching: each sampled image runs its own forward and
backward pass (all its views, through the same fused ``masked_sample``, attention and
DINO loss kernels as the plain step), so its gradient is exact for every parameter (the
weight-normalized last layer, the CLS token, the norms) without per-layer hooks. The
teacher runs once on the whole sample. Cost: one small pass per image instead of one
batched pass (about 2-4× the plain step on the demo model on CPU); ghost clipping
(Opacus's fast gradient clipping) would bring it nearer one pass at ViT-S scale.

The step then adds the noise of :class:`~smsd.protocol.privacy.DPPlan` to the sums of
clipped gradients and of clipped center contributions, divides by the expected batch
size, and updates as the plain step does (AdamW, EMA teacher, EMA center).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..nn import DINOLoss
from ..ops import dino_loss, masked_sample
from ..validation import validation
from .distill import StepSchedule, StudentModel
from .privacy import DPPlan

__all__ = ["PrivateDistillStep"]


class PrivateDistillStep:
    """DP-SGD version of :class:`~smsd.protocol.distill.DistillStep` (same call).

    Args:
        student, teacher, loss_fn, optimizer: as for the plain step (no DDP wrapper).
        plan: the noise and clipping bounds.
        expected_batch: ``sample_rate × n``: the sums are divided by it, not by the
            sample's actual size (which would depend on the data).
        generator: the noise's source (the run's generator, so that a resumed run
            draws the same noise).
    """

    def __init__(self, student: StudentModel, teacher: StudentModel, loss_fn: DINOLoss,
                 optimizer: torch.optim.Optimizer, *, plan: DPPlan, expected_batch: float,
                 generator: torch.Generator) -> None:
        if not isinstance(loss_fn, DINOLoss):
            raise TypeError("the private step needs a smsd.nn.DINOLoss")
        self.student, self.teacher, self.loss_fn = student, teacher, loss_fn
        self.optimizer, self.plan = optimizer, plan
        self.expected_batch = float(expected_batch)
        self.generator = generator
        self._params = [p for p in student.parameters() if p.requires_grad]
        self._teacher_params = list(teacher.parameters())
        self._student_all = list(student.parameters())
        self._last_layer = {id(p) for name, p in student.head.named_parameters()
                            if name.startswith("last_layer")}

    def _noise(self, like: torch.Tensor, std: float) -> torch.Tensor:
        draw = torch.randn(like.shape, generator=self.generator, dtype=torch.float32)
        return draw.to(like.device, like.dtype) * std

    def _image_gradient(self, views: Sequence[torch.Tensor], teacher_logits: torch.Tensor,
                        options: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = self.student(views)
        loss = dino_loss(out.logits.float(), teacher_logits.float(), self.loss_fn.center,
                         update_center=False, **options)
        grads = torch.autograd.grad(loss, self._params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g
                for p, g in zip(self._params, grads, strict=True)], loss.detach()

    def __call__(self, x: torch.Tensor, index: Sequence[torch.Tensor],
                 schedule: StepSchedule) -> torch.Tensor:
        """One private update on the sampled images ``x`` ``[b, N, D]`` (``b`` may be 0)
        with one index ``[b, k]`` per view (global views first); returns the mean loss
        of the sample (detached; 0 for an empty sample)."""
        cfg = self.plan.config
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = schedule.lr
            group["weight_decay"] = schedule.weight_decay if i == 0 else 0.0
        options = self.loss_fn.options(schedule.epoch)
        batch = x.shape[0]
        sums = [torch.zeros_like(p) for p in self._params]
        center = self.loss_fn.center
        center_sum = torch.zeros_like(center)
        total = torch.zeros((), device=x.device)
        with validation(False):
            views = [masked_sample(x, idx) for idx in index]
            if batch:
                with torch.no_grad():
                    teacher = self.teacher(views[:2]).logits.float()  # [2b, K] view-major
                    contribution = teacher.view(2, batch, -1).mean(0) - center
                    norms = contribution.norm(dim=1, keepdim=True)
                    center_sum += (contribution * (cfg.center_clip / norms).clamp(max=1.0)
                                   ).sum(0, keepdim=True)
            for b in range(batch):
                grads, loss = self._image_gradient(
                    [v[b:b + 1] for v in views], teacher[[b, batch + b]], options)
                norm = torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g) for g in grads]))
                scale = (cfg.clip / (norm + 1e-12)).clamp(max=1.0)
                torch._foreach_add_(sums, torch._foreach_mul(grads, scale))
                total += loss
        with torch.no_grad():
            for param, summed in zip(self._params, sums, strict=True):
                summed.add_(self._noise(summed, self.plan.grad_noise * cfg.clip))
                freeze = schedule.freeze_last_layer and id(param) in self._last_layer
                param.grad = None if freeze else summed / self.expected_batch
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            torch._foreach_lerp_(self._teacher_params, self._student_all,
                                 1.0 - schedule.momentum)
            noisy = center_sum + self._noise(center_sum, self.plan.center_noise * cfg.center_clip)
            batch_center = center + noisy / self.expected_batch
            momentum = self.loss_fn.center_momentum
            center.copy_(center * momentum + batch_center * (1 - momentum))
        return total / max(batch, 1)
