"""Triton kernels of masked_sample: token gather with the permutation composed in.

Forward: each program copies a ``BLOCK_R x BLOCK_D`` tile of output rows; the
source row ``perm[b, index[b, j]]`` is resolved in registers, so x is read once
and the permuted copy never exists.

Backward: each program writes a tile of rows of ``grad_x``, every row exactly once
(zeros included), so no separate zero-fill pass is needed. With distinct indices per
image (``unique``: the server's views) the row of ``grad_out`` that token ``n`` of
image ``b`` went to is one scatter away: ``inverse[b, src[b, j]] = j`` (``-1`` for a
token not sampled), and the kernel gathers through it. With repeats, the rows sampled
from each token are listed in CSR form (``offsets[b, n] : offsets[b, n + 1]`` into
``order[b]``, from a stable sort) and summed in fp32 in a fixed order (deterministic,
no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE_BYTES = 16 * 1024  # bytes a program moves per tile


def _tile(n_cols: int, element_size: int) -> tuple[int, int]:
    """Column block: the largest power of two <= 512 dividing ``n_cols`` (no masked lanes),
    else the next power of two; row block: enough rows to move ``_TILE_BYTES``."""
    block_d = 512
    while block_d >= 64 and n_cols % block_d:
        block_d //= 2
    if block_d < 64:
        block_d = min(512, triton.next_power_of_2(n_cols))
    block_r = max(1, min(64, _TILE_BYTES // (block_d * element_size)))
    return triton.next_power_of_2(block_r), block_d


@triton.jit
def masked_sample_fwd_kernel(
    x_ptr, index_ptr, perm_ptr, out_ptr,
    n_rows, K, D,
    stride_xb, stride_xn, stride_xd,
    stride_ib, stride_ik,
    stride_pb, stride_pn,
    HAS_PERM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    b = rows // K
    j = rows % K
    src = tl.load(index_ptr + b * stride_ib + j * stride_ik, mask=row_ok, other=0).to(tl.int64)
    if HAS_PERM:
        src = tl.load(perm_ptr + b * stride_pb + src * stride_pn, mask=row_ok, other=0)
        src = src.to(tl.int64)
    mask = row_ok[:, None] & (cols < D)[None, :]
    x_offs = b[:, None] * stride_xb + src[:, None] * stride_xn + cols[None, :] * stride_xd
    vals = tl.load(x_ptr + x_offs, mask=mask)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], vals, mask=mask)


@triton.jit
def masked_sample_bwd_kernel(
    grad_out_ptr, order_ptr, offsets_ptr, grad_x_ptr,
    n_rows, N, K, D,
    stride_gb, stride_gk, stride_gd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_FP64: tl.constexpr,
    UNIQUE: tl.constexpr,
):
    """``order_ptr``: the inverse index ``[B, N]`` with ``UNIQUE``, else the CSR order
    ``[B, K]`` with ``offsets_ptr`` its ``[B, N + 1]`` offsets."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    b = rows // N
    n = rows % N
    mask = row_ok[:, None] & col_ok[None, :]
    if UNIQUE:
        j = tl.load(order_ptr + rows, mask=row_ok, other=-1)
        hit = j >= 0
        g_offs = b[:, None] * stride_gb + j[:, None] * stride_gk + cols[None, :] * stride_gd
        vals = tl.load(grad_out_ptr + g_offs, mask=hit[:, None] & col_ok[None, :], other=0.0)
        tl.store(grad_x_ptr + rows[:, None] * D + cols[None, :], vals, mask=mask)
    else:
        start = tl.load(offsets_ptr + b * (N + 1) + n, mask=row_ok, other=0)
        count = tl.load(offsets_ptr + b * (N + 1) + n + 1, mask=row_ok, other=0) - start
        # fp32 sums for 16/32-bit gradients, fp64 for fp64 ones (a loop-carried fp32 sum
        # would be promoted to fp64 by the first add, which the compiler rejects)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float64 if ACC_FP64 else tl.float32)
        max_count = tl.max(count, axis=0)  # 1 without duplicate indices
        t = 0
        while t < max_count:
            hit = t < count
            j = tl.load(order_ptr + b * K + start + t, mask=hit, other=0)
            g_offs = b[:, None] * stride_gb + j[:, None] * stride_gk + cols[None, :] * stride_gd
            acc += tl.load(grad_out_ptr + g_offs, mask=hit[:, None] & col_ok[None, :],
                           other=0.0)
            t += 1
        tl.store(grad_x_ptr + rows[:, None] * D + cols[None, :], acc, mask=mask)


def masked_sample_forward(
    x: torch.Tensor, index: torch.Tensor, perm: torch.Tensor | None
) -> torch.Tensor:
    B, _, D = x.shape
    K = index.shape[1]
    out = torch.empty((B, K, D), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    block_r, block_d = _tile(D, x.element_size())
    grid = (triton.cdiv(B * K, block_r), triton.cdiv(D, block_d))
    perm_arg = perm if perm is not None else index  # unused when HAS_PERM is False
    masked_sample_fwd_kernel[grid](
        x, index, perm_arg, out,
        B * K, K, D,
        x.stride(0), x.stride(1), x.stride(2),
        index.stride(0), index.stride(1),
        perm_arg.stride(0), perm_arg.stride(1),
        HAS_PERM=perm is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4,
    )
    return out


def sampled_rows_csr(
    index: torch.Tensor, perm: torch.Tensor | None, n_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image, the output rows sampled from each token, as CSR ``(order, offsets)``.

    ``order[b]`` lists output rows ``j`` sorted by source token (stable, so ties keep
    their order); ``offsets[b, n]`` is where token ``n``'s run starts.
    """
    src = index.long() if perm is None else torch.gather(perm.long(), 1, index.long())
    sorted_src, order = torch.sort(src, dim=1, stable=True)
    bounds = torch.arange(n_tokens + 1, device=index.device).expand(src.shape[0], -1)
    offsets = torch.searchsorted(sorted_src, bounds.contiguous())
    return order.contiguous(), offsets.contiguous()


def inverse_index(index: torch.Tensor, perm: torch.Tensor | None, n_tokens: int) -> torch.Tensor:
    """``inverse[b, n]``: the output row sampled from token ``n`` of image ``b``, ``-1``
    where none was (int32 ``[B, n_tokens]``). Indices must be distinct per image."""
    src = index.long() if perm is None else torch.gather(perm.long(), 1, index.long())
    inverse = torch.full((src.shape[0], n_tokens), -1, device=index.device, dtype=torch.int32)
    rows = torch.arange(src.shape[1], device=index.device, dtype=torch.int32)
    return inverse.scatter_(1, src, rows.expand_as(src))


def masked_sample_backward(
    grad_out: torch.Tensor, index: torch.Tensor, perm: torch.Tensor | None, n_tokens: int,
    unique: bool = False,
) -> torch.Tensor:
    """``grad_x``. ``unique``: the caller guarantees distinct indices per image (checked by
    smsd.ops), and the rows are found through :func:`inverse_index` (one scatter) instead
    of a sort (:func:`sampled_rows_csr`)."""
    B, K, D = grad_out.shape
    grad_x = torch.empty((B, n_tokens, D), device=grad_out.device, dtype=grad_out.dtype)
    if grad_x.numel() == 0:
        return grad_x
    if unique:
        order = inverse_index(index, perm, n_tokens)
        offsets = order  # unused with UNIQUE
    else:
        order, offsets = sampled_rows_csr(index, perm, n_tokens)
    block_r, block_d = _tile(D, grad_out.element_size())
    grid = (triton.cdiv(B * n_tokens, block_r), triton.cdiv(D, block_d))
    masked_sample_bwd_kernel[grid](
        grad_out, order, offsets, grad_x,
        B * n_tokens, n_tokens, K, D,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        BLOCK_R=block_r, BLOCK_D=block_d, ACC_FP64=grad_out.dtype == torch.float64,
        UNIQUE=unique, num_warps=4,
    )
    return grad_x
