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
from . import _checks, _library, reference
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


OP = _library.register("fused_linear_dino_loss")


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with products summed in ``acc``'s fp32 (for 16-bit ``a, b``): a
    chunk's product rounded to 16 bits before it is added would lose what the fp32
    accumulator is there to keep."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # the CPU has no mixed-dtype matmul: multiply the upcast chunk
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _kernel_forward(backend: str, student_feats, teacher_feats, weight, center, teacher_weight,
                    opts: DinoLossOptions, chunk_rows: int, need_feats: bool,
                    need_weight: bool):
    batch = student_feats.shape[0] // opts.n_student_views
    teacher = teacher_feats @ (weight if teacher_weight is None else teacher_weight).T
    stats, colsum = teacher_stats(backend, teacher, center, opts.teacher_temp)
    scale = 1.0 / (opts.n_pairs * batch)
    n_rows = student_feats.shape[0]
    grad_feats = torch.empty_like(student_feats) if need_feats else student_feats.new_empty(0)
    grad_weight = (torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
                   if need_weight else None)
    losses = []
    for start in range(0, n_rows, chunk_rows):
        feats = student_feats[start:start + chunk_rows]
        logits = feats @ weight.T
        losses.append(student_loss_grad(
            backend, logits, teacher, center, stats,
            logits if need_feats or need_weight else None,
            row_offset=start, batch=batch, opts=opts, grad_scale=scale,
        ))
        if need_feats:
            torch.matmul(logits, weight, out=grad_feats[start:start + chunk_rows])
        if need_weight:
            _accumulate(grad_weight, logits.T, feats)
    grad_weight = grad_weight.to(weight.dtype) if need_weight else weight.new_empty(0)
    return torch.cat(losses).sum() * scale, colsum, grad_feats, grad_weight


def _reference_forward(student_feats, teacher_feats, weight, center, teacher_weight,
                       opts: DinoLossOptions, need_feats: bool, need_weight: bool):
    def loss_fn(feats, w):
        return reference.fused_linear_dino_loss(
            feats, teacher_feats, w, center, teacher_weight=teacher_weight,
            **{**opts.as_kwargs(), "update_center": False}).float()

    loss = loss_fn(student_feats, weight)
    teacher = teacher_feats @ (weight if teacher_weight is None else teacher_weight).T
    grads = [student_feats.new_empty(0), weight.new_empty(0)]
    if need_feats or need_weight:
        one = torch.ones((), device=loss.device, dtype=loss.dtype)
        feats_grad, weight_grad = _library.reference_vjp(loss_fn, (student_feats, weight),
                                                         (0, 1), one)
        grads = [feats_grad if need_feats else grads[0], weight_grad if need_weight
                 else grads[1]]
    return loss, teacher.float().sum(0), *grads


@torch.library.custom_op(OP, mutates_args=())
def _fused_op(
    student_feats: torch.Tensor, teacher_feats: torch.Tensor, weight: torch.Tensor,
    center: torch.Tensor, teacher_weight: torch.Tensor | None, n_student_views: int,
    n_teacher_views: int, student_temp: float, teacher_temp: float, chunk_rows: int,
    need_feats: bool, need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, colsum, grad_feats, grad_weight)`` for ``grad_output = 1`` (a gradient not
    asked for is an empty tensor)."""
    backend = select_backend("fused_linear_dino_loss", student_feats.device)
    opts = DinoLossOptions(n_student_views, n_teacher_views, student_temp, teacher_temp)
    with _library.no_autocast(student_feats.device):
        if backend == "torch":
            return _reference_forward(student_feats, teacher_feats, weight, center,
                                      teacher_weight, opts, need_feats, need_weight)
        return _kernel_forward(backend, student_feats, teacher_feats, weight, center,
                               teacher_weight, opts, chunk_rows, need_feats, need_weight)


@_fused_op.register_fake
def _(student_feats, teacher_feats, weight, center, teacher_weight, n_student_views,
      n_teacher_views, student_temp, teacher_temp, chunk_rows, need_feats, need_weight):
    f32 = {"dtype": torch.float32}
    return (student_feats.new_empty((), **f32), student_feats.new_empty((weight.shape[0],), **f32),
            student_feats.new_empty(student_feats.shape if need_feats else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    # Held by ctx, not save_for_backward: handed out as is (grad_output 1), this reference
    # makes autograd's accumulation into .grad copy them, never alter them.
    ctx.grads = output[2], output[3]
    ctx.need_feats, ctx.need_weight = inputs[-2], inputs[-1]


def _backward(ctx, grad_loss, *_):
    grad_feats, grad_weight = ctx.grads
    needs = ctx.needs_input_grad
    feats = (scale_saved_grad(grad_feats, grad_loss) if ctx.need_feats and needs[0]
             else None)
    weight = (scale_saved_grad(grad_weight, grad_loss) if ctx.need_weight and needs[2]
              else None)
    return (feats, None, weight, *(None,) * 9)


_fused_op.register_autograd(_backward, setup_context=_setup_context)


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
        The fp32 loss; gradients flow to ``student_feats`` and ``weight``. A
        ``torch.library`` custom op (``smsd::fused_linear_dino_loss``).
    """
    opts = make_options(
        n_student_views=n_student_views, n_teacher_views=n_teacher_views,
        student_temp=student_temp, teacher_temp=teacher_temp,
        center_momentum=center_momentum, update_center=update_center,
    )
    _validate(student_feats, teacher_feats, weight, center, opts, chunk_rows,
              teacher_weight)
    if teacher_weight is not None:
        teacher_weight = teacher_weight.detach()
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(student_feats.shape[0], weight.shape[0],
                                        weight.element_size())
    grad_on = torch.is_grad_enabled()
    loss, colsum, _, _ = _fused_op(
        student_feats, teacher_feats.detach(), weight, center.contiguous(), teacher_weight,
        opts.n_student_views, opts.n_teacher_views, opts.student_temp, opts.teacher_temp,
        chunk_rows, grad_on and student_feats.requires_grad, grad_on and weight.requires_grad,
    )
    if opts.update_center:
        move_center(center, colsum, teacher_feats.shape[0], opts.center_momentum)
    return loss
