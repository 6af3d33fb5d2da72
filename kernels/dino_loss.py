"""Triton kernels of dino_loss: DINO's distillation loss and its student gradient in one forward.

Two kernels, no ``[rows x K]`` temporary except the gradient itself:

``teacher_stats``: each program owns a chunk of columns and walks every teacher row,
so the teacher is read once for two results: per row the max and the sum of exps of
``(teacher - center) / teacher_temp`` over the chunk (once per teacher row, not once
per pair; the student kernel combines the few chunk partials of the rows it needs,
which saves the launches of a separate combine), and the chunk's column sums (the
batch mean the center moves toward). Chunks cover disjoint columns, so the sums are
deterministic without atomics.

``student_loss_grad``: one program per student row ``(v, b)``. Pass 1 is one online
log-sum-exp over K. Pass 2 rebuilds, block by block, ``Q = sum over teacher views
i != v of softmax_i`` (teacher rows of the same image, mostly from L2 because
consecutive programs share an image) and writes the row's loss
``-sum Q * log_softmax(s)`` and gradient ``scale * (n_pairs * p - Q) / student_temp``.
The gradient may overwrite the student logits in place (each element is read before
the same thread stores it), which the fused head+loss uses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Column chunk of the teacher kernel: 512 gives 128 programs at K=65536 (about one per SM
# on an H100) while each still moves 8 rows x 512 columns per step.
_TEACHER_BLOCK_C = 512
_TEACHER_BLOCK_R = 8
# Student block: 4096 fp32 per step keeps 16 values per thread at 8 warps.
_STUDENT_BLOCK = 4096
# No FMA contraction: the student kernel recomputes x = (t - c) * (1 / T) and takes
# exp(x - max); with a fused multiply-add x would not be rounded as it was when the
# teacher kernel took the max and the sum, and q rows would no longer sum to 1 (2% off
# at logits of 1e4). The kernels are memory-bound, so unfused arithmetic costs nothing.
_COMPILE = {"enable_fp_fusion": False}


@triton.jit
def teacher_stats_kernel(
    t_ptr, c_ptr, pmax_ptr, psum_ptr, colsum_ptr,
    n_rows, K, stride_t, n_chunks, inv_tt,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    chunk = tl.program_id(0)
    cols = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < K
    center = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    colsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    r0 = 0
    while r0 < n_rows:  # while, not range: the interpreter cannot index a runtime bound
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        colsum += tl.sum(t, axis=0)
        x = tl.where(mask, (t - center[None, :]) * inv_tt, float("-inf"))
        m = tl.max(x, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)  # padding rows: avoid -inf - -inf
        # NaN propagates through the sum even where max ignores it
        tl.store(pmax_ptr + rows * n_chunks + chunk, m, mask=row_ok)
        tl.store(psum_ptr + rows * n_chunks + chunk, tl.sum(tl.exp(x - m[:, None]), axis=1),
                 mask=row_ok)
        r0 += BLOCK_R
    tl.store(colsum_ptr + cols, colsum, mask=col_ok)


@triton.jit
def _teacher_row_stats(pmax_ptr, psum_ptr, t_row, n_chunks, CHUNKS: tl.constexpr):
    """Max and 1/sum of exps of one teacher row from its per-chunk partials."""
    offs = tl.arange(0, CHUNKS)
    ok = offs < n_chunks
    pmax = tl.load(pmax_ptr + t_row * n_chunks + offs, mask=ok, other=float("-inf"))
    psum = tl.load(psum_ptr + t_row * n_chunks + offs, mask=ok, other=0.0)
    row_max = tl.max(pmax, axis=0)
    return row_max, 1.0 / tl.sum(tl.where(ok, psum * tl.exp(pmax - row_max), 0.0), axis=0)


@triton.jit
def student_loss_grad_kernel(
    s_ptr, t_ptr, c_ptr, pmax_ptr, psum_ptr, g_ptr, loss_ptr,
    row_offset, B, K, n_teacher_views, n_chunks,
    stride_s, stride_t, stride_g,
    inv_ts, inv_tt, grad_scale,
    WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0)
    row = row_offset + pid  # global student row: view v of image b
    v = row // B
    b = row % B
    s_row = s_ptr + pid.to(tl.int64) * stride_s
    n_pairs = n_teacher_views - (v < n_teacher_views).to(tl.int32)

    # Pass 1: online log-sum-exp of s / student_temp.
    m = float("-inf")
    d = 0.0
    start = 0
    while start < K:
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(s_row + cols, mask=cols < K, other=float("-inf")).to(tl.float32) * inv_ts
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        start += BLOCK
    log_d = tl.log(d)

    # Pass 2: teacher targets, loss and gradient block by block.
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    g_scale = grad_scale * inv_ts
    start = 0
    while start < K:
        cols = start + tl.arange(0, BLOCK)
        col_ok = cols < K
        # (x - max) - log(sum), as log_softmax does: x - lse would shift every logp of
        # the row by lse's rounding (an ulp of a large number), biasing the loss.
        x = tl.load(s_row + cols, mask=col_ok, other=0.0).to(tl.float32) * inv_ts
        logp = (x - m) - log_d
        center = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
        q = tl.zeros((BLOCK,), dtype=tl.float32)
        i = 0
        while i < n_teacher_views:
            if i != v:
                t_row = (i * B + b).to(tl.int64)
                t_max, t_inv_sum = _teacher_row_stats(pmax_ptr, psum_ptr, t_row, n_chunks,
                                                      CHUNKS)
                t = tl.load(t_ptr + t_row * stride_t + cols, mask=col_ok, other=0.0)
                # exp(x - max) / sum, like softmax: each row of q sums to 1 to rounding
                q += tl.exp((t.to(tl.float32) - center) * inv_tt - t_max) * t_inv_sum
            i += 1
        acc += tl.where(col_ok, -q * logp, 0.0)
        if WRITE_GRAD:
            grad = (n_pairs * tl.exp(logp) - q) * g_scale
            g_row = g_ptr + pid.to(tl.int64) * stride_g
            tl.store(g_row + cols, grad.to(g_ptr.dtype.element_ty), mask=col_ok)
        start += BLOCK
    tl.store(loss_ptr + pid, tl.sum(acc, axis=0))


def teacher_stats(
    teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(stats, colsum)``: per teacher row and column chunk the max and the sum of exps of
    ``(teacher - center) / teacher_temp`` (fp32 ``[rows, chunks]`` each, combined by
    :func:`student_loss_grad`), and the column sums of ``teacher`` (fp32 ``[K]``)."""
    n_rows, K = teacher.shape
    block_c = min(_TEACHER_BLOCK_C, triton.next_power_of_2(K))
    n_chunks = triton.cdiv(K, block_c)
    pmax = torch.empty((n_rows, n_chunks), device=teacher.device, dtype=torch.float32)
    psum = torch.empty_like(pmax)
    colsum = torch.empty(K, device=teacher.device, dtype=torch.float32)
    teacher_stats_kernel[(n_chunks,)](
        teacher, center, pmax, psum, colsum,
        n_rows, K, teacher.stride(0), n_chunks, 1.0 / teacher_temp,
        BLOCK_R=_TEACHER_BLOCK_R, BLOCK_C=block_c, num_warps=4, **_COMPILE,
    )
    return (pmax, psum), colsum


def student_loss_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
    grad: torch.Tensor | None,
    *,
    row_offset: int,
    batch: int,
    n_teacher_views: int,
    student_temp: float,
    teacher_temp: float,
    grad_scale: float,
) -> torch.Tensor:
    """Loss of each row of ``student`` (global rows ``row_offset + j``), fp32 ``[rows]``;
    writes ``grad_scale * dloss_row/dstudent`` into ``grad`` (may be ``student`` itself).
    ``stats`` comes from :func:`teacher_stats`."""
    n_rows, K = student.shape
    row_loss = torch.empty(n_rows, device=student.device, dtype=torch.float32)
    if n_rows == 0:
        return row_loss
    pmax, psum = stats
    block = min(_STUDENT_BLOCK, triton.next_power_of_2(K))
    student_loss_grad_kernel[(n_rows,)](
        student, teacher, center, pmax, psum,
        grad if grad is not None else student, row_loss,
        row_offset, batch, K, n_teacher_views, pmax.shape[1],
        student.stride(0), teacher.stride(0), grad.stride(0) if grad is not None else 0,
        1.0 / student_temp, 1.0 / teacher_temp, grad_scale,
        WRITE_GRAD=grad is not None, BLOCK=block, CHUNKS=triton.next_power_of_2(pmax.shape[1]),
        num_warps=8 if block >= 2048 else 4, **_COMPILE,
    )
    return row_loss


class Forward(NamedTuple):
    """What :func:`forward` returns: fp32 per-row losses and log-sum-exps (unused by this
    backward, kept for the op's saved layout), teacher row statistics, column sums."""

    row_loss: torch.Tensor
    row_lse: torch.Tensor
    teacher_max: torch.Tensor
    teacher_inv_sum: torch.Tensor
    colsum: torch.Tensor


def _row_stats(pmax: torch.Tensor, psum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One teacher row's max and 1/sum of exps from its per-chunk partials."""
    row_max = pmax.amax(dim=1)
    return row_max, 1.0 / (psum * torch.exp(pmax - row_max[:, None])).sum(dim=1)


def forward(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, *, batch: int,
            n_teacher_views: int, student_temp: float, teacher_temp: float) -> Forward:
    """The loss side of the op: per-row losses, with the teacher statistics computed once
    per teacher row and saved for :func:`backward`. No gradient is written."""
    center = center.reshape(1, -1)
    (pmax, psum), colsum = teacher_stats(teacher, center, teacher_temp)
    row_loss = student_loss_grad(student, teacher, center, (pmax, psum), None, row_offset=0,
                                 batch=batch, n_teacher_views=n_teacher_views,
                                 student_temp=student_temp, teacher_temp=teacher_temp,
                                 grad_scale=1.0)
    t_max, t_inv_sum = _row_stats(pmax, psum)
    lse = torch.zeros(student.shape[0], device=student.device, dtype=torch.float32)
    return Forward(row_loss, lse, t_max, t_inv_sum, colsum)


def backward(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
             center: torch.Tensor, row_lse: torch.Tensor, teacher_max: torch.Tensor,
             teacher_inv_sum: torch.Tensor, *, batch: int, n_teacher_views: int,
             student_temp: float, teacher_temp: float, grad_scale: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad_loss * grad_scale * dloss/dstudent`` in the student's dtype (into ``out``,
    which may be ``student`` itself). ``grad_loss`` is a device tensor, never read on the
    host. The teacher statistics of :func:`forward` enter the student kernel as one chunk.

    Not yet at the traffic floor (issue 16): the student kernel reads the student twice
    and ``grad_loss`` is applied in a second pass over the gradient.
    """
    del row_lse  # the student kernel recomputes the log-sum-exp
    grad = torch.empty_like(student) if out is None else out
    stats = (teacher_max[:, None].contiguous(), (1.0 / teacher_inv_sum)[:, None].contiguous())
    student_loss_grad(student, teacher, center.reshape(1, -1), stats, grad, row_offset=0,
                      batch=batch, n_teacher_views=n_teacher_views, student_temp=student_temp,
                      teacher_temp=teacher_temp, grad_scale=grad_scale)
    return grad.mul_(grad_loss.to(grad.dtype))


def traffic(n_student_rows: int, n_teacher_rows: int, K: int, element_size: int,
            n_teacher_views: int) -> dict:
    """Bytes this design moves for forward + backward, and the floors.

    ``ideal``: read every student logit once, write its gradient once, read each teacher
    logit once. ``autograd``: the floor under autograd's contract (the loss needs every
    logit in forward; the gradient depends on the upstream gradient, known only in
    backward, so the student is read again there and the gradient written once).
    """
    s = n_student_rows * K * element_size
    t = n_teacher_rows * K * element_size
    pairs_read = n_student_rows * K * element_size * max(1, n_teacher_views - 1)
    # teacher_stats: teacher once; forward student kernel: student twice + paired teacher
    # rows once; backward: the same plus the gradient written, then read + written by mul_
    forward_bytes = t + 2 * s + pairs_read
    backward_bytes = t + 2 * s + pairs_read + s + 2 * s
    ideal = s + s + t
    autograd = 2 * s + s + 2 * t
    total = forward_bytes + backward_bytes
    return {"forward": forward_bytes, "backward": backward_bytes, "total": total,
            "floor_ideal": ideal, "floor_autograd": autograd,
            "ratio_ideal": total / ideal, "ratio_autograd": total / autograd}
