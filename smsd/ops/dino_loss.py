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
from . import _checks, _library, reference
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


def scale_saved_grad(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """A gradient computed in the forward for ``grad_output = 1``, scaled by ``grad_loss``."""
    # A loss is almost always the root of backward (grad_output 1): returning the stored
    # gradient saves a full pass over [rows x K]. Reading grad_output is free on the CPU
    # but would stall the host on a GPU every step (and cannot be traced by
    # torch.compile), so there the gradient is always scaled. A traced backward sees a
    # tensor subclass (fake or functional), whose value is unknown: scale it too.
    if (not torch.compiler.is_compiling() and type(grad_loss) is torch.Tensor
            and grad_loss.device.type == "cpu"
            and grad_loss.numel() == 1 and bool(grad_loss == 1)):
        return grad
    return grad * grad_loss.to(grad.dtype)


OP = _library.register("dino_loss")
BACKWARD_OP = _library.register("dino_loss_backward")


def saves_gradient(device: torch.device) -> bool:
    """Whether the op's forward computes the student gradient and saves it (on the CPU,
    where a stored gradient is cheap and scaling it by ``grad_output`` costs no sync).
    On a GPU the forward saves per-row statistics and the backward writes the gradient
    once, reading ``grad_output`` from device memory: the fewest bytes moved."""
    return device.type != "cuda"


def _options(n_student_views: int, n_teacher_views: int, student_temp: float,
             teacher_temp: float) -> DinoLossOptions:
    return DinoLossOptions(n_student_views, n_teacher_views, student_temp, teacher_temp)


def _reference_loss(opts: DinoLossOptions):
    def loss(student, teacher, center):
        return reference.dino_loss(student, teacher, center, **{
            **opts.as_kwargs(), "update_center": False}).float()
    return loss


def _forward(backend: str, student, teacher, center, opts: DinoLossOptions, with_grad: bool):
    """``(loss, colsum, saved, teacher_max, teacher_inv_sum)``; ``saved`` is the scaled
    gradient with ``with_grad``, else the student rows' ``(max, log-sum of exps)``
    (fp32 ``[rows, 2]``)."""
    n_rows, n_teacher = student.shape[0], teacher.shape[0]
    batch = n_rows // opts.n_student_views
    scale = 1.0 / (opts.n_pairs * batch)
    f32 = {"device": student.device, "dtype": torch.float32}
    if backend == "torch":
        loss_fn = _reference_loss(opts)
        loss = loss_fn(student, teacher, center)
        colsum = teacher.float().sum(0)
        if with_grad:
            saved = _library.reference_vjp(loss_fn, (student, teacher, center), (0,),
                                           torch.ones((), **f32))[0]
        else:
            saved = torch.zeros((n_rows, 2), **f32)
        return loss, colsum, saved, torch.zeros(n_teacher, **f32), torch.zeros(n_teacher, **f32)
    if backend == "cpp":
        ext = extension()
        t_max, t_inv_sum, colsum = ext.dino_loss_teacher_stats(teacher, center,
                                                               opts.teacher_temp)
        grad = torch.empty_like(student) if with_grad else None
        row_loss = ext.dino_loss_student(
            student, teacher, center, t_max, t_inv_sum, grad, 0, batch, opts.n_teacher_views,
            opts.student_temp, opts.teacher_temp, scale)
        saved = grad if with_grad else torch.zeros((n_rows, 2), **f32)
        return row_loss.sum() * scale, colsum, saved, t_max, t_inv_sum
    kernels = _kernels.load("dino_loss")
    fwd = kernels.forward(student, teacher, center, batch=batch,
                          n_teacher_views=opts.n_teacher_views,
                          student_temp=opts.student_temp, teacher_temp=opts.teacher_temp)
    saved = fwd.row_stats
    if with_grad:
        saved = kernels.backward(
            torch.ones((), **f32), student, teacher, center, fwd.row_stats, fwd.teacher_max,
            fwd.teacher_inv_sum, batch=batch, n_teacher_views=opts.n_teacher_views,
            student_temp=opts.student_temp, teacher_temp=opts.teacher_temp, grad_scale=scale)
    return fwd.row_loss.sum() * scale, fwd.colsum, saved, fwd.teacher_max, fwd.teacher_inv_sum


@torch.library.custom_op(OP, mutates_args=())
def _dino_loss_op(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_student_views: int,
    n_teacher_views: int, student_temp: float, teacher_temp: float, needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = select_backend("dino_loss", student.device)
    opts = _options(n_student_views, n_teacher_views, student_temp, teacher_temp)
    with _library.no_autocast(student.device):
        return _forward(backend, student, teacher, center, opts,
                        needs_grad and saves_gradient(student.device))


@_dino_loss_op.register_fake
def _(student, teacher, center, n_student_views, n_teacher_views, student_temp, teacher_temp,
      needs_grad):
    f32 = {"dtype": torch.float32}
    saved = (student.new_empty(student.shape) if needs_grad and saves_gradient(student.device)
             else student.new_empty((student.shape[0], 2), **f32))
    n_teacher = teacher.shape[0]
    return (student.new_empty((), **f32), student.new_empty((student.shape[1],), **f32), saved,
            student.new_empty((n_teacher,), **f32), student.new_empty((n_teacher,), **f32))


@torch.library.custom_op(BACKWARD_OP, mutates_args=())
def _dino_loss_backward_op(
    grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
    center: torch.Tensor, row_stats: torch.Tensor, teacher_max: torch.Tensor,
    teacher_inv_sum: torch.Tensor, n_student_views: int, n_teacher_views: int,
    student_temp: float, teacher_temp: float,
) -> torch.Tensor:
    """The student gradient, written once (the GPU path; see :func:`saves_gradient`)."""
    backend = select_backend("dino_loss", student.device)
    opts = _options(n_student_views, n_teacher_views, student_temp, teacher_temp)
    batch = student.shape[0] // n_student_views
    with _library.no_autocast(student.device):
        if backend == "cpp":  # CPU tensors: reading grad_loss costs no sync
            grad = torch.empty_like(student)
            extension().dino_loss_student(
                student, teacher, center, teacher_max, teacher_inv_sum, grad, 0, batch,
                n_teacher_views, student_temp, teacher_temp,
                float(grad_loss) / (opts.n_pairs * batch))
            return grad
        if backend == "triton":
            return _kernels.load("dino_loss").backward(
                grad_loss, student, teacher, center, row_stats, teacher_max, teacher_inv_sum,
                batch=batch, n_teacher_views=n_teacher_views, student_temp=student_temp,
                teacher_temp=teacher_temp, grad_scale=1.0 / (opts.n_pairs * batch))
        return _library.reference_vjp(_reference_loss(opts), (student, teacher, center),
                                      (0,), grad_loss)[0]


@_dino_loss_backward_op.register_fake
def _(grad_loss, student, teacher, center, row_stats, teacher_max, teacher_inv_sum,
      n_student_views, n_teacher_views, student_temp, teacher_temp):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, center, *options, needs_grad = inputs
    _, _, saved, teacher_max, teacher_inv_sum = output
    ctx.options = options
    ctx.saved_grad = needs_grad and saves_gradient(student.device)  # see saves_gradient
    if ctx.saved_grad:
        # Held by ctx, not save_for_backward: handed out as is (grad_output 1), this
        # reference makes autograd's accumulation into .grad copy it, never alter it.
        ctx.grad = saved
    else:
        ctx.save_for_backward(student, teacher, center, saved, teacher_max, teacher_inv_sum)


def _backward(ctx, grad_loss, *_):
    none = (None,) * 8
    if not ctx.needs_input_grad[0]:
        return none
    if ctx.saved_grad:
        return (scale_saved_grad(ctx.grad, grad_loss), *none[1:])
    return (_dino_loss_backward_op(grad_loss.float(), *ctx.saved_tensors, *ctx.options),
            *none[1:])


_dino_loss_op.register_autograd(_backward, setup_context=_setup_context)


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
        The loss (0-dim fp32 whatever the input dtype: the kernels accumulate in fp32).
        Its gradient flows to ``student`` only. A ``torch.library`` custom op
        (``smsd::dino_loss``) that ``torch.compile(fullgraph=True)`` traces through.
    """
    opts = make_options(
        n_student_views=n_student_views, n_teacher_views=n_teacher_views,
        student_temp=student_temp, teacher_temp=teacher_temp,
        center_momentum=center_momentum, update_center=update_center,
    )
    validate_logits(student, teacher, center, opts)
    loss, colsum, *_ = _dino_loss_op(
        _rows_contiguous(student), _rows_contiguous(teacher.detach()), center.contiguous(),
        opts.n_student_views, opts.n_teacher_views, opts.student_temp, opts.teacher_temp,
        student.requires_grad and torch.is_grad_enabled(),
    )
    if opts.update_center:
        move_center(center, colsum, teacher.shape[0], opts.center_momentum)
    return loss
