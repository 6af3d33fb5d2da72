"""dino_loss: DINO's distillation loss with the student gradient computed in the forward pass.

The kernels (Triton, C++) produce the loss, the gradient with respect to the student
logits and the teacher's column sums in one forward; backward only scales the stored
gradient by ``grad_output`` (Liger-Kernel's pattern). The center update, with its
all-reduce in a distributed run, happens after the loss used the old center.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import _kernels
from ..backend import select_backend
from . import _checks, reference
from ._ext import extension

__all__ = ["DinoLossOptions", "dino_loss"]

LOSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DinoLossOptions:
    n_student_views: int
    n_teacher_views: int = 2
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    update_center: bool = True

    @property
    def n_pairs(self) -> int:
        """Number of (teacher view, student view) pairs with different views."""
        return self.n_student_views * self.n_teacher_views - min(
            self.n_student_views, self.n_teacher_views
        )

    def as_kwargs(self) -> dict:
        return dict(self.__dict__)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _real(name: str, value: object, low: float, high: float, *, open_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value) and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def make_options(**kwargs) -> DinoLossOptions:
    """Checked options (``TypeError``/``ValueError`` naming the argument)."""
    raw = DinoLossOptions(**kwargs)
    if not isinstance(raw.update_center, bool):
        raise TypeError(f"update_center must be a bool, got {type(raw.update_center).__name__}")
    opts = DinoLossOptions(
        n_student_views=_positive_int("n_student_views", raw.n_student_views),
        n_teacher_views=_positive_int("n_teacher_views", raw.n_teacher_views),
        student_temp=_real("student_temp", raw.student_temp, 0.0, math.inf, open_low=True),
        teacher_temp=_real("teacher_temp", raw.teacher_temp, 0.0, math.inf, open_low=True),
        center_momentum=_real("center_momentum", raw.center_momentum, 0.0, 1.0,
                              open_low=False),
        update_center=raw.update_center,
    )
    if opts.n_pairs == 0:
        raise ValueError(
            "n_student_views=1 and n_teacher_views=1 leave no pair of different views to compare"
        )
    return opts


def validate_logits(
    student: object, teacher: object, center: object, opts: DinoLossOptions, *,
    student_name: str = "student", teacher_name: str = "teacher",
) -> int:
    """Check shapes, dtypes and devices; return the batch size B."""
    student = _checks.tensor(student_name, student, 2, LOSS_DTYPES)
    teacher = _checks.tensor(teacher_name, teacher, 2, LOSS_DTYPES)
    center = _checks.tensor("center", center, 2, (torch.float32,))
    if teacher.dtype != student.dtype:
        raise TypeError(
            f"{teacher_name} has dtype {teacher.dtype} but {student_name} has {student.dtype}"
        )
    K = student.shape[1]
    if teacher.shape[1] != K:
        raise ValueError(
            f"{teacher_name} has {teacher.shape[1]} columns but {student_name} has {K}"
        )
    if tuple(center.shape) != (1, K):
        raise ValueError(f"center must have shape [1, {K}], got {list(center.shape)}")
    if K == 0:
        raise ValueError(f"{student_name} has no columns (K=0)")
    _checks.same_device(student_name, student, **{teacher_name: teacher, "center": center})
    return batch_size(student.shape[0], teacher.shape[0], opts, student_name, teacher_name)


def batch_size(
    n_student_rows: int, n_teacher_rows: int, opts: DinoLossOptions,
    student_name: str = "student", teacher_name: str = "teacher",
) -> int:
    S, T = opts.n_student_views, opts.n_teacher_views
    if n_student_rows == 0 or n_student_rows % S:
        raise ValueError(
            f"{student_name} has {n_student_rows} rows, not a positive multiple of "
            f"n_student_views={S}"
        )
    B = n_student_rows // S
    if n_teacher_rows != T * B:
        raise ValueError(
            f"{teacher_name} has {n_teacher_rows} rows but n_teacher_views={T} views of "
            f"B={B} images need {T * B}"
        )
    return B


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any row stride but need each row contiguous."""
    return x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous()


def teacher_stats(backend: str, teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float):
    """``(stats, colsum)``: the teacher rows' softmax statistics, in the form the backend's
    student kernel takes, and the teacher's fp32 column sums."""
    if backend == "cpp":
        row_max, row_inv_sum, colsum = extension().dino_loss_teacher_stats(
            teacher, center, teacher_temp
        )
        return (row_max, row_inv_sum), colsum
    return _kernels.load("dino_loss").teacher_stats(teacher, center, teacher_temp)


def student_loss_grad(
    backend: str, student, teacher, center, stats, grad, *,
    row_offset: int, batch: int, opts: DinoLossOptions, grad_scale: float,
) -> torch.Tensor:
    """Per-row loss of ``student`` rows ``row_offset + j``; the scaled gradient into ``grad``."""
    if backend == "cpp":
        return extension().dino_loss_student(
            student, teacher, center, *stats, grad, row_offset, batch,
            opts.n_teacher_views, opts.student_temp, opts.teacher_temp, grad_scale,
        )
    return _kernels.load("dino_loss").student_loss_grad(
        student, teacher, center, stats, grad,
        row_offset=row_offset, batch=batch, n_teacher_views=opts.n_teacher_views,
        student_temp=opts.student_temp, teacher_temp=opts.teacher_temp, grad_scale=grad_scale,
    )


@torch.no_grad()
def move_center(center: torch.Tensor, colsum: torch.Tensor, n_teacher_rows: int,
                momentum: float) -> None:
    """EMA of ``center`` toward the batch mean whose column sums are ``colsum``."""
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(colsum)
        world = dist.get_world_size()
    batch_center = colsum.view(1, -1) / (n_teacher_rows * world)
    center.mul_(momentum).add_(batch_center, alpha=1.0 - momentum)


class DinoLoss(torch.autograd.Function):
    """Loss and student gradient in the forward; backward scales the stored gradient."""

    @staticmethod
    def forward(ctx, student, teacher, center, backend: str, opts: DinoLossOptions, batch: int):
        center_in = center.contiguous()
        stats, colsum = teacher_stats(backend, teacher, center_in, opts.teacher_temp)
        scale = 1.0 / (opts.n_pairs * batch)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        row_loss = student_loss_grad(
            backend, student, teacher, center_in, stats, grad,
            row_offset=0, batch=batch, opts=opts, grad_scale=scale,
        )
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(colsum)
        return row_loss.sum() * scale, colsum

    @staticmethod
    def backward(ctx, grad_loss, _grad_colsum):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None
        return scale_saved_grad(grad, grad_loss), None, None, None, None, None


def scale_saved_grad(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    # A loss is almost always the root of backward (grad_output 1): returning the stored
    # gradient saves a full pass over [rows x K]. Reading grad_output is free on the CPU
    # but would stall the host on a GPU every step, so there the gradient is always scaled.
    if grad_loss.device.type == "cpu" and grad_loss.numel() == 1 and bool(grad_loss == 1):
        return grad
    return grad * grad_loss.to(grad.dtype)


def dino_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    *,
    n_student_views: int,
    n_teacher_views: int = 2,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    center_momentum: float = 0.9,
    update_center: bool = True,
) -> torch.Tensor:
    """DINO's distillation loss (facebookresearch/dino ``DINOLoss``), fused.

    Args:
        student: ``[n_student_views * B, K]`` student logits, view-major (all images of
            view 0, then view 1, ...); fp32, fp16 or bf16.
        teacher: ``[n_teacher_views * B, K]`` teacher logits, same dtype, view-major.
            Teacher view ``i`` is paired with every student view ``v != i``.
        center: ``[1, K]`` fp32 running center, updated in place (unless
            ``update_center=False``) after the loss used its old value.
        student_temp, teacher_temp: softmax temperatures.
        center_momentum: EMA momentum of the center.

    Returns:
        The loss (0-dim; fp32 from the kernels, which accumulate in fp32 whatever the
        input dtype). Its gradient flows to ``student`` only.
    """
    opts = make_options(
        n_student_views=n_student_views, n_teacher_views=n_teacher_views,
        student_temp=student_temp, teacher_temp=teacher_temp,
        center_momentum=center_momentum, update_center=update_center,
    )
    batch = validate_logits(student, teacher, center, opts)
    backend = select_backend("dino_loss", student.device)
    if backend == "torch":
        return reference.dino_loss(student, teacher, center, **opts.as_kwargs())
    loss, colsum = DinoLoss.apply(
        _rows_contiguous(student), _rows_contiguous(teacher.detach()), center, backend, opts,
        batch,
    )
    if opts.update_center:
        move_center(center, colsum, teacher.shape[0], opts.center_momentum)
    return loss
