"""Triton kernels of dino_loss: DINO's distillation loss and its student gradient.

The op's kernels, at the traffic floor of autograd's contract (forward, then a backward
that knows the upstream gradient):

``forward_partials_kernel`` + ``forward_combine_kernel`` (:func:`forward`): a 2-D grid of
column chunks x groups of images. A program reads, per image of its group, the chunk of
every teacher view and of every student view once: teacher chunk max and sum of exps,
student chunk max and sum of exps, and per (student view, teacher view) the dot product
``sum_j exp(y_ij - max) (x_j - max_s)`` that the loss needs, all rescaled later as an
online softmax is; and the teacher's column sums (the batch mean the center moves
toward) per group, without atomics. The combine kernel (one program per row) merges the
few chunk partials of a row into its loss, the student rows' ``(max, log-sum)`` and the
teacher rows' ``(max, 1/sum)``, which the backward reuses.

``backward_kernel`` (:func:`backward`): the same grid; per image the teacher targets of
the chunk are built once from the saved statistics and serve every student view; each
student logit is read once and its gradient written once, scaled by ``grad_loss`` read
on the device.

The fused head+loss (``fused_linear_dino_loss``), which computes logits chunk by chunk
and overwrites them with their gradient in its forward, uses two earlier kernels:
``teacher_stats`` (per teacher row and column chunk the max and sum of exps, and the
column sums) and ``student_loss_grad`` (one program per student row: an online
log-sum-exp, then loss and gradient block by block).
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


# The floor kernels (forward / backward of the op on a GPU): a 2-D grid of column chunks x
# groups of images. A program owns BLOCK columns of IMAGES images and, per image, every
# teacher view and every student view, so each logit is read from memory once per pass.
# 512 columns x 8 images at K = 65,536 and B = 64: 128 x 8 = 1,024 programs (about 8 per
# SM of an H100), each moving 8 x (2 + 10) rows x 2 KB (fp32) through a pipelined loop.
_FLOOR_BLOCK = 512
_FLOOR_IMAGES = 8
_FLOOR_STAGES = 3


@triton.jit
def _chunk(c_ptr, chunk, K, BLOCK: tl.constexpr, T_PAD: tl.constexpr, T_VIEWS: tl.constexpr):
    """A floor kernel's column chunk: columns, their mask, the teacher views (padded to
    T_PAD), the [views x columns] mask and the chunk of the center."""
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < K
    views = tl.arange(0, T_PAD)
    view_ok = views < T_VIEWS
    mask = view_ok[:, None] & col_ok[None, :]
    return cols, col_ok, views, view_ok, mask, tl.load(c_ptr + cols, mask=col_ok, other=0.0)


@triton.jit
def _teacher_tile(t_ptr, stride_t, B, b, image_ok, views, cols, mask):
    """Image ``b``'s teacher rows (one per view) of the chunk, fp32, with their row numbers
    and mask (all off past the last image)."""
    t_rows = (views * B + b).to(tl.int64)
    t_mask = mask & image_ok
    t = tl.load(t_ptr + t_rows[:, None] * stride_t + cols[None, :], mask=t_mask, other=0.0)
    return t_rows, t_mask, t.to(tl.float32)


@triton.jit
def forward_partials_kernel(
    s_ptr, t_ptr, c_ptr, t_max_ptr, t_sum_ptr, s_max_ptr, s_sum_ptr, dot_ptr, colsum_ptr,
    B, K, n_chunks, stride_s, stride_t, inv_ts, inv_tt,
    S_VIEWS: tl.constexpr, T_VIEWS: tl.constexpr, IMAGES: tl.constexpr, BLOCK: tl.constexpr,
    T_PAD: tl.constexpr, STAGES: tl.constexpr,
):
    """Per (row, chunk) partials: teacher max and sum of exps of (t - c) / T_t; student max
    and sum of exps of s / T_s; per teacher view i, sum_j exp(y_ij - max_i) (x_j - max_s);
    per (group, column) the teacher's column sums. Each logit is read once."""
    chunk = tl.program_id(0)
    group = tl.program_id(1)
    cols, col_ok, views, view_ok, mask, center = _chunk(c_ptr, chunk, K, BLOCK, T_PAD, T_VIEWS)
    colsum = tl.zeros((BLOCK,), dtype=tl.float32)
    # a loop of constant trip count with a per-image mask (the last group may be short):
    # the interpreter cannot take a bound computed from program_id
    for j in tl.range(0, IMAGES):
        b = group * IMAGES + j
        image_ok = b < B
        t_rows, t_mask, t = _teacher_tile(t_ptr, stride_t, B, b, image_ok, views, cols, mask)
        colsum += tl.sum(t, axis=0)
        y = tl.where(t_mask, (t - center[None, :]) * inv_tt, float("-inf"))
        t_max = tl.max(y, axis=1)
        t_max = tl.where(t_max == float("-inf"), 0.0, t_max)  # padding views
        e = tl.exp(y - t_max[:, None])  # 0 where masked
        t_part = t_rows * n_chunks + chunk
        tl.store(t_max_ptr + t_part, t_max, mask=view_ok & image_ok)
        tl.store(t_sum_ptr + t_part, tl.sum(e, axis=1), mask=view_ok & image_ok)
        s_mask = col_ok & image_ok
        for v in tl.range(0, S_VIEWS, num_stages=STAGES):
            row = (v * B + b).to(tl.int64)
            x = tl.load(s_ptr + row * stride_s + cols, mask=s_mask,
                        other=float("-inf")).to(tl.float32) * inv_ts
            s_max = tl.max(x, axis=0)
            shifted = tl.where(s_mask, x - s_max, 0.0)
            s_part = row * n_chunks + chunk
            tl.store(s_max_ptr + s_part, s_max, mask=image_ok)
            tl.store(s_sum_ptr + s_part, tl.sum(tl.where(s_mask, tl.exp(shifted), 0.0), axis=0),
                     mask=image_ok)
            tl.store(dot_ptr + s_part * T_PAD + views, tl.sum(e * shifted[None, :], axis=1),
                     mask=image_ok)
    tl.store(colsum_ptr + group * K + cols, colsum, mask=col_ok)


@triton.jit
def _combine_teacher(t_max_ptr, t_sum_ptr, t_row, n_chunks, offs, ok):
    """A teacher row's max, 1 / sum of exps, and the per-chunk weights exp(max_c - max)/Z."""
    tm = tl.load(t_max_ptr + t_row * n_chunks + offs, mask=ok, other=float("-inf"))
    tz = tl.load(t_sum_ptr + t_row * n_chunks + offs, mask=ok, other=0.0)
    row_max = tl.max(tm, axis=0)
    scaled = tl.where(ok, tl.exp(tm - row_max), 0.0)
    inv_z = 1.0 / tl.sum(scaled * tz, axis=0)
    return row_max, inv_z, scaled * inv_z, tz


@triton.jit
def forward_combine_kernel(
    t_max_ptr, t_sum_ptr, s_max_ptr, s_sum_ptr, dot_ptr,
    row_loss_ptr, row_stats_ptr, teacher_max_ptr, teacher_inv_sum_ptr,
    B, n_chunks,
    S_VIEWS: tl.constexpr, T_VIEWS: tl.constexpr, CHUNKS: tl.constexpr,
    T_PAD: tl.constexpr,
):
    """One program per student row (its loss, max and log-sum of exps) and per teacher row
    (its max and 1 / sum of exps, saved for the backward), from the chunk partials."""
    pid = tl.program_id(0)
    offs = tl.arange(0, CHUNKS)
    ok = offs < n_chunks
    n_student_rows = S_VIEWS * B
    if pid >= n_student_rows:
        t_row = pid - n_student_rows
        row_max, inv_z, _, _ = _combine_teacher(t_max_ptr, t_sum_ptr, t_row, n_chunks, offs, ok)
        tl.store(teacher_max_ptr + t_row, row_max)
        tl.store(teacher_inv_sum_ptr + t_row, inv_z)
    else:
        v = pid // B
        b = pid % B
        s_part = pid.to(tl.int64) * n_chunks + offs
        sm = tl.load(s_max_ptr + s_part, mask=ok, other=float("-inf"))
        sd = tl.load(s_sum_ptr + s_part, mask=ok, other=0.0)
        s_max = tl.max(sm, axis=0)
        lift = tl.where(ok, sm - s_max, 0.0)  # <= 0: chunk max below the row's
        log_d = tl.log(tl.sum(tl.where(ok, sd * tl.exp(lift), 0.0), axis=0))
        tl.store(row_stats_ptr + 2 * pid, s_max)
        tl.store(row_stats_ptr + 2 * pid + 1, log_d)
        # -sum_j q_j logp_j with logp = (x - max) - log d: log d * sum q - sum q (x - max),
        # every term of the second sum <= 0, so nothing cancels.
        loss = 0.0
        for i in tl.static_range(T_VIEWS):
            if i != v:
                _, _, w, tz = _combine_teacher(t_max_ptr, t_sum_ptr, i * B + b, n_chunks,
                                               offs, ok)
                dot = tl.load(dot_ptr + s_part * T_PAD + i, mask=ok, other=0.0)
                q_sum = tl.sum(w * tz, axis=0)
                qx = tl.sum(tl.where(ok, w * (dot + lift * tz), 0.0), axis=0)
                loss += log_d * q_sum - qx
        tl.store(row_loss_ptr + pid, loss)


@triton.jit
def backward_kernel(
    grad_loss_ptr, s_ptr, t_ptr, c_ptr, row_stats_ptr, teacher_max_ptr, teacher_inv_sum_ptr,
    g_ptr, B, K, stride_s, stride_t, stride_g, inv_ts, inv_tt, grad_scale,
    S_VIEWS: tl.constexpr, T_VIEWS: tl.constexpr, IMAGES: tl.constexpr, BLOCK: tl.constexpr,
    T_PAD: tl.constexpr, STAGES: tl.constexpr,
):
    """``grad_loss * grad_scale * dloss/ds``, written once: per image the teacher targets of
    the chunk are built once and serve every student view. ``grad_loss`` is read here, on
    the device."""
    chunk = tl.program_id(0)
    group = tl.program_id(1)
    cols, col_ok, views, view_ok, mask, center = _chunk(c_ptr, chunk, K, BLOCK, T_PAD, T_VIEWS)
    g_scale = tl.load(grad_loss_ptr).to(tl.float32) * grad_scale * inv_ts
    for j in tl.range(0, IMAGES):  # constant trip count, masked (see the forward)
        b = group * IMAGES + j
        image_ok = b < B
        t_rows, t_mask, t = _teacher_tile(t_ptr, stride_t, B, b, image_ok, views, cols, mask)
        t_max = tl.load(teacher_max_ptr + t_rows, mask=view_ok & image_ok, other=0.0)
        t_inv_sum = tl.load(teacher_inv_sum_ptr + t_rows, mask=view_ok & image_ok, other=0.0)
        # exp(y - max) / sum, as the forward's statistics were taken (no FMA, see _COMPILE)
        q = tl.where(t_mask, tl.exp((t - center[None, :]) * inv_tt - t_max[:, None])
                     * t_inv_sum[:, None], 0.0)
        s_mask = col_ok & image_ok
        for v in tl.range(0, S_VIEWS, num_stages=STAGES):
            row = (v * B + b).to(tl.int64)
            s_max = tl.load(row_stats_ptr + 2 * row, mask=image_ok, other=0.0)
            log_d = tl.load(row_stats_ptr + 2 * row + 1, mask=image_ok, other=0.0)
            x = tl.load(s_ptr + row * stride_s + cols, mask=s_mask, other=0.0).to(tl.float32)
            p = tl.exp((x * inv_ts - s_max) - log_d)
            target = tl.sum(tl.where((views != v)[:, None], q, 0.0), axis=0)
            n_pairs = tl.where(v < T_VIEWS, T_VIEWS - 1, T_VIEWS)
            grad = (n_pairs * p - target) * g_scale
            tl.store(g_ptr + row * stride_g + cols, grad.to(g_ptr.dtype.element_ty), mask=s_mask)


class Forward(NamedTuple):
    """What :func:`forward` returns (fp32): per student row its loss and ``(max, log sum of
    exps)`` of ``s / student_temp`` (``row_stats``, ``[rows, 2]``); per teacher row the max
    and 1 / sum of exps of ``(t - center) / teacher_temp``; the teacher's column sums."""

    row_loss: torch.Tensor
    row_stats: torch.Tensor
    teacher_max: torch.Tensor
    teacher_inv_sum: torch.Tensor
    colsum: torch.Tensor


def _floor_grid(B: int, K: int) -> tuple[int, int, int]:
    """``(block, n_chunks, n_groups)`` of the floor kernels."""
    block = min(_FLOOR_BLOCK, triton.next_power_of_2(K))
    return block, triton.cdiv(K, block), triton.cdiv(B, _FLOOR_IMAGES)


def forward(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, *, batch: int,
            n_teacher_views: int, student_temp: float, teacher_temp: float) -> Forward:
    """The loss side of the op: every student and teacher logit read once (one 2-D pass of
    chunk partials, then one small combine); the statistics the backward needs are saved.
    Rows must be contiguous (any row stride); rows are view-major (view v of image b is
    row ``v * batch + b``)."""
    n_rows, K = student.shape
    n_student_views = n_rows // batch
    n_teacher = teacher.shape[0]
    block, n_chunks, n_groups = _floor_grid(batch, K)
    t_pad = triton.next_power_of_2(n_teacher_views)
    f32 = {"device": student.device, "dtype": torch.float32}
    t_max = torch.empty((n_teacher, n_chunks), **f32)
    t_sum = torch.empty_like(t_max)
    s_max = torch.empty((n_rows, n_chunks), **f32)
    s_sum = torch.empty_like(s_max)
    dots = torch.empty((n_rows, n_chunks, t_pad), **f32)
    colsums = torch.empty((n_groups, K), **f32)
    forward_partials_kernel[(n_chunks, n_groups)](
        student, teacher, center, t_max, t_sum, s_max, s_sum, dots, colsums,
        batch, K, n_chunks, student.stride(0), teacher.stride(0),
        1.0 / student_temp, 1.0 / teacher_temp,
        S_VIEWS=n_student_views, T_VIEWS=n_teacher_views, IMAGES=_FLOOR_IMAGES, BLOCK=block,
        T_PAD=t_pad, STAGES=_FLOOR_STAGES,
        num_warps=4, **_COMPILE,
    )
    row_loss = torch.empty(n_rows, **f32)
    row_stats = torch.empty((n_rows, 2), **f32)
    teacher_max = torch.empty(n_teacher, **f32)
    teacher_inv_sum = torch.empty(n_teacher, **f32)
    forward_combine_kernel[(n_rows + n_teacher,)](
        t_max, t_sum, s_max, s_sum, dots, row_loss, row_stats, teacher_max, teacher_inv_sum,
        batch, n_chunks, S_VIEWS=n_student_views, T_VIEWS=n_teacher_views,
        CHUNKS=triton.next_power_of_2(n_chunks), T_PAD=t_pad, num_warps=1, **_COMPILE,
    )
    colsum = colsums[0] if n_groups == 1 else colsums.sum(0)
    return Forward(row_loss, row_stats, teacher_max, teacher_inv_sum, colsum)


def backward(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
             center: torch.Tensor, row_stats: torch.Tensor, teacher_max: torch.Tensor,
             teacher_inv_sum: torch.Tensor, *, batch: int, n_teacher_views: int,
             student_temp: float, teacher_temp: float, grad_scale: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad_loss * grad_scale * dloss/dstudent`` in the student's dtype (into ``out``,
    which may be ``student`` itself: each element is read before the same thread stores
    it). Reads every student and teacher logit once and writes the gradient once;
    ``grad_loss`` (a 1-element device tensor) is read by the kernel, never on the host."""
    n_rows, K = student.shape
    grad = torch.empty_like(student) if out is None else out
    block, n_chunks, n_groups = _floor_grid(batch, K)
    backward_kernel[(n_chunks, n_groups)](
        grad_loss, student, teacher, center, row_stats, teacher_max, teacher_inv_sum, grad,
        batch, K, student.stride(0), teacher.stride(0), grad.stride(0),
        1.0 / student_temp, 1.0 / teacher_temp, grad_scale,
        S_VIEWS=n_rows // batch, T_VIEWS=n_teacher_views, IMAGES=_FLOOR_IMAGES, BLOCK=block,
        T_PAD=triton.next_power_of_2(n_teacher_views),
        STAGES=_FLOOR_STAGES, num_warps=4, **_COMPILE,
    )
    return grad


def traffic(n_student_rows: int, n_teacher_rows: int, K: int, element_size: int,
            n_teacher_views: int) -> dict:
    """Bytes :func:`forward` + :func:`backward` move, and the floors.

    ``ideal``: read every student logit once, write its gradient once, read each teacher
    logit once. ``autograd``: the floor under autograd's contract (the loss needs every
    logit in forward; the gradient depends on the upstream gradient, known only in
    backward, so student and teacher are read again there and the gradient written once).
    Both passes read each logit once, so the design is the autograd floor plus the
    partials (fp32 per row and chunk) and the per-group column sums.
    """
    s = n_student_rows * K * element_size
    t = n_teacher_rows * K * element_size
    batch = n_teacher_rows // n_teacher_views
    _, n_chunks, n_groups = _floor_grid(batch, K)
    t_pad = triton.next_power_of_2(n_teacher_views)
    partials = 4 * n_chunks * (2 * n_teacher_rows + (2 + t_pad) * n_student_rows)
    colsums = 4 * n_groups * K
    center = 4 * K
    row_outputs = 4 * (3 * n_student_rows + 2 * n_teacher_rows)
    # partials and column sums written, then read back once (combine, colsum reduction)
    forward_bytes = s + t + center + 2 * (partials + colsums) + row_outputs + 4 * K
    backward_bytes = s + t + center + row_outputs + s
    ideal = s + s + t
    autograd = 2 * s + s + 2 * t
    total = forward_bytes + backward_bytes
    return {"forward": forward_bytes, "backward": backward_bytes, "total": total,
            "floor_ideal": ideal, "floor_autograd": autograd,
            "ratio_ideal": total / ideal, "ratio_autograd": total / autograd}
