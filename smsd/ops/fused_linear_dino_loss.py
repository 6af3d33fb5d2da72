"""fused_linear_dino_loss: the DINO head's last layer and the DINO loss without the logits.

``dino_loss(student_feats @ weight.T, teacher_feats @ weight.T, ...)`` with the student
logits computed a chunk of rows at a time (Liger-Kernel's fused linear cross-entropy
idea): each chunk's logits are overwritten in place by their loss gradient, which is
immediately turned into the chunk's ``grad_feats`` and its share of ``grad_weight`` by
two matmuls. The full ``[student rows x K]`` logits never exist; the teacher logits
(no gradient, ``n_teacher_views * B`` rows) are computed once.
"""

from __future__ import annotations

import torch

from ..backend import select_backend
from . import _checks, reference
from .dino_loss import (
    LOSS_DTYPES,
    DinoLossOptions,
    batch_size,
    make_options,
    move_center,
    scale_saved_grad,
    student_loss_grad,
    teacher_stats,
)

__all__ = ["fused_linear_dino_loss"]

_CHUNK_BYTES = 16 * 2**20  # logits of one chunk: 64 rows at K=65536 in fp32


def default_chunk_rows(n_rows: int, K: int, element_size: int) -> int:
    return max(1, min(n_rows, _CHUNK_BYTES // (K * element_size)))


def _validate(student_feats, teacher_feats, weight, center, opts: DinoLossOptions,
              chunk_rows, teacher_weight=None) -> int:
    student_feats = _checks.tensor("student_feats", student_feats, 2, LOSS_DTYPES)
    teacher_feats = _checks.tensor("teacher_feats", teacher_feats, 2, LOSS_DTYPES)
    weight = _checks.tensor("weight", weight, 2, LOSS_DTYPES)
    center = _checks.tensor("center", center, 2, (torch.float32,))
    if teacher_weight is not None:
        teacher_weight = _checks.tensor("teacher_weight", teacher_weight, 2, LOSS_DTYPES)
        if teacher_weight.shape != weight.shape:
            raise ValueError(f"teacher_weight has shape {list(teacher_weight.shape)} but weight "
                             f"has {list(weight.shape)}; they must match")
    for name, x in (("teacher_feats", teacher_feats), ("weight", weight),
                    ("teacher_weight", teacher_weight)):
        if x is not None and x.dtype != student_feats.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but student_feats has "
                            f"{student_feats.dtype}")
    K, D = weight.shape
    for name, x in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
        if x.shape[1] != D:
            raise ValueError(f"{name} has {x.shape[1]} features but weight is [K, D] = "
                             f"{[K, D]}")
    if K == 0:
        raise ValueError("weight has no rows (K=0)")
    if tuple(center.shape) != (1, K):
        raise ValueError(f"center must have shape [1, {K}], got {list(center.shape)}")
    if chunk_rows is not None and (
        isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1
    ):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    _checks.same_device("student_feats", student_feats, teacher_feats=teacher_feats,
                        weight=weight, center=center, teacher_weight=teacher_weight)
    return batch_size(student_feats.shape[0], teacher_feats.shape[0], opts,
                      "student_feats", "teacher_feats")


class FusedLinearDinoLoss(torch.autograd.Function):
    """Loss, grad_feats and grad_weight in the forward; backward scales them."""

    @staticmethod
    def forward(ctx, student_feats, teacher_feats, weight, center, backend: str,
                opts: DinoLossOptions, batch: int, chunk_rows: int, teacher_weight=None):
        # The matmuls run in the inputs' (checked, common) dtype even under autocast: the
        # gradient buffers are allocated in that dtype and the kernels accumulate in fp32.
        with torch.autocast(student_feats.device.type, enabled=False):
            return FusedLinearDinoLoss._forward(
                ctx, student_feats, teacher_feats, weight, center, backend, opts, batch,
                chunk_rows, teacher_weight,
            )

    @staticmethod
    def _forward(ctx, student_feats, teacher_feats, weight, center, backend: str,
                 opts: DinoLossOptions, batch: int, chunk_rows: int, teacher_weight):
        need_feats, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        center_in = center.contiguous()
        teacher = teacher_feats @ (weight if teacher_weight is None else teacher_weight).T
        stats, colsum = teacher_stats(backend, teacher, center_in, opts.teacher_temp)
        del teacher_feats
        scale = 1.0 / (opts.n_pairs * batch)
        n_rows = student_feats.shape[0]
        grad_feats = torch.empty_like(student_feats) if need_feats else None
        # fp32 accumulator across chunks for half weights (rounding once at the end)
        grad_weight = (torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
                       if need_weight else None)
        losses = []
        for start in range(0, n_rows, chunk_rows):
            feats = student_feats[start:start + chunk_rows]
            logits = feats @ weight.T
            losses.append(student_loss_grad(
                backend, logits, teacher, center_in, stats,
                logits if need_feats or need_weight else None,
                row_offset=start, batch=batch, opts=opts, grad_scale=scale,
            ))
            if need_feats:
                torch.matmul(logits, weight, out=grad_feats[start:start + chunk_rows])
            if need_weight:
                if grad_weight.dtype == logits.dtype:
                    grad_weight.addmm_(logits.T, feats)
                else:
                    grad_weight += (logits.T @ feats).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_feats, grad_weight)
        ctx.mark_non_differentiable(colsum)
        return torch.cat(losses).sum() * scale, colsum

    @staticmethod
    def backward(ctx, grad_loss, _grad_colsum):
        grad_feats, grad_weight = ctx.saved_tensors
        return (
            None if grad_feats is None else scale_saved_grad(grad_feats, grad_loss),
            None,
            None if grad_weight is None else scale_saved_grad(grad_weight, grad_loss),
            None, None, None, None, None, None,
        )


def fused_linear_dino_loss(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    weight: torch.Tensor,
    center: torch.Tensor,
    *,
    n_student_views: int,
    n_teacher_views: int = 2,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    center_momentum: float = 0.9,
    update_center: bool = True,
    chunk_rows: int | None = None,
    teacher_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """DINO head's last layer + DINO loss, never holding the student logits.

    Equal to ``dino_loss(student_feats @ weight.T, teacher_feats @ weight.T, center, ...)``
    (see :func:`smsd.ops.dino_loss` for the options).

    Args:
        student_feats: ``[n_student_views * B, D]`` bottleneck features, view-major.
        teacher_feats: ``[n_teacher_views * B, D]`` teacher features (no gradient).
        weight: ``[K, D]`` last layer of the head (already weight-normalized).
        center: ``[1, K]`` fp32, updated in place.
        chunk_rows: student rows per chunk (default: about 16 MiB of logits).
        teacher_weight: the teacher's own ``[K, D]`` last layer (DINO's teacher is an EMA
            of the student, so its head differs); default ``weight``. No gradient.

    Returns:
        The fp32 loss; gradients flow to ``student_feats`` and ``weight``.
    """
    opts = make_options(
        n_student_views=n_student_views, n_teacher_views=n_teacher_views,
        student_temp=student_temp, teacher_temp=teacher_temp,
        center_momentum=center_momentum, update_center=update_center,
    )
    batch = _validate(student_feats, teacher_feats, weight, center, opts, chunk_rows,
                      teacher_weight)
    if teacher_weight is not None:
        teacher_weight = teacher_weight.detach()
    backend = select_backend("fused_linear_dino_loss", student_feats.device)
    if backend == "torch":
        return reference.fused_linear_dino_loss(
            student_feats, teacher_feats, weight, center, teacher_weight=teacher_weight,
            **opts.as_kwargs()
        )
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(student_feats.shape[0], weight.shape[0],
                                        weight.element_size())
    loss, colsum = FusedLinearDinoLoss.apply(
        student_feats, teacher_feats.detach(), weight, center, backend, opts, batch, chunk_rows,
        teacher_weight,
    )
    if opts.update_center:
        move_center(center, colsum, teacher_feats.shape[0], opts.center_momentum)
    return loss
