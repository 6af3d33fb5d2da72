"""Triton kernels of attention: FlashAttention-2, non-causal, rows read through an index.

Every program works on one (sequence, head) "view" (grid axis 0, which has room for
the 10^5+ views of a packed step) and one block of its rows (axis 1):
- dense ``[B, H, N, d]``: sequence ``b``; with ``index`` its row ``r`` is token
  ``index[b, r]``, loaded in the kernel (no permuted copy of q/k/v exists);
- packed ``[T, H, d]`` (``cu_seqlens``): sequence ``s`` is tokens
  ``cu_seqlens[s]:cu_seqlens[s + 1]``; all sequences of any size share one launch
  (programs past the end of a short sequence exit at once).
Input-side rows (q, k, v, dq, dk, dv) are addressed by token; output-side rows
(out, grad_out, lse, delta) are consecutive. Rows and columns past the sequence
end or the head dim are masked, so neither N nor d need be a block multiple.

Loops over the other side of the sequence are ``for ... in range`` on the GPU (so
the compiler pipelines them, ``num_stages``) and ``while`` loops in the interpreter,
whose ``range`` cannot take a runtime bound with NumPy >= 2; the loop bodies are
shared ``@triton.jit`` helpers, so both forms run the same code.

Forward: online softmax in base 2, one pass over the keys, saves the log-sum-exp
in base 2 (of scale·log2(e)·qkᵀ): the backward recomputes P = exp2(s - lse) with no
change of base. Backward: a preprocess computes ``delta = rowsum(dO * O)``; one
kernel walks the queries for a block of keys (dK, dV), one walks the keys for a
block of queries (dQ); no atomics, so gradients are deterministic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _view(cu_ptr, seq, M, VARLEN: tl.constexpr):
    """First packed row and length of sequence ``seq``."""
    if VARLEN:
        row0 = tl.load(cu_ptr + seq)
        length = tl.load(cu_ptr + seq + 1) - row0
    else:
        # tensors in both branches, so the helper returns one type (M may arrive as a
        # constexpr when it is 1)
        row0 = seq * 0
        length = M + seq * 0
    return row0, length


@triton.jit
def _tokens(index_ptr, seq, stride_ib, row0, rows, ok, HAS_INDEX: tl.constexpr):
    """Token (position along N or T) of each row of the view."""
    if HAS_INDEX:
        tok = tl.load(index_ptr + seq.to(tl.int64) * stride_ib + rows, mask=ok, other=0)
    else:
        tok = row0 + rows
    return tok.to(tl.int64)


@triton.jit
def _mm(a, b, DOT_PRECISION: tl.constexpr):
    """tl.dot; "upcast" multiplies in fp32, for bf16 under the interpreter, whose bf16
    dot is wrong (bf16 products are exact in fp32, so the result matches a GPU's)."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _fwd_block(q, k_base, v_base, Index, seq, sib, row0, start_n, L, skn, svn, offs_d, d_ok,
               qk_scale, m_i, l_i, acc,
               HAS_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of one query block with keys/values start_n:start_n+BLOCK_N."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < L
    tok_n = _tokens(Index, seq, sib, row0, offs_n, n_ok, HAS_INDEX)
    kt = tl.load(k_base + tok_n[None, :] * skn + offs_d[:, None],
                 mask=d_ok[:, None] & n_ok[None, :], other=0.0)
    v = tl.load(v_base + tok_n[:, None] * svn + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    s = _mm(q, kt, DOT_PRECISION) * qk_scale
    s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # 0 on the first block
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_PRECISION)
    return m_new, l_i, acc


# _tile_delta: the softmax-backward correction delta_i = sum_j P_ij dP_ij. The
# preprocess computes it as rowsum(dO * O), which needs no pass over the keys but sees O
# rounded to the input dtype; when one block holds every key of the view the block
# helpers take it from the tile instead, which is exact for 1-token views (ds = 0).
@triton.jit
def _dkdv_block(k, v, n_ok, q_base, do_base, Lse, Delta, stat_base, Index, seq, sib, row0,
                start_m, L, sqn, son, sln, offs_d, d_ok, qk_scale, dk, dv,
                HAS_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """dK/dV contributions of queries start_m:start_m+BLOCK_M to one key block."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    tok_m = _tokens(Index, seq, sib, row0, offs_m, m_ok, HAS_INDEX)
    rows = (row0 + offs_m).to(tl.int64)
    qt = tl.load(q_base + tok_m[None, :] * sqn + offs_d[:, None],
                 mask=d_ok[:, None] & m_ok[None, :], other=0.0)
    do = tl.load(do_base + rows[:, None] * son + offs_d[None, :],
                 mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(Lse + stat_base + rows * sln, mask=m_ok, other=0.0)
    delta = tl.load(Delta + stat_base + rows * sln, mask=m_ok, other=0.0)
    # P^T = exp(scale * K Q^T - lse), in base 2
    pt = tl.math.exp2(_mm(k, qt, DOT_PRECISION) * qk_scale - lse[None, :])
    pt = tl.where(n_ok[:, None] & m_ok[None, :], pt, 0.0)
    dv += _mm(pt.to(do.dtype), do, DOT_PRECISION)
    dpt = _mm(v, tl.trans(do), DOT_PRECISION)
    if L <= BLOCK_N:  # this block holds every key: delta from the tile (see _tile_delta)
        delta = tl.sum(pt * dpt, 0)
    dst = pt * (dpt - delta[None, :])
    dk += _mm(dst.to(qt.dtype), tl.trans(qt), DOT_PRECISION)
    return dk, dv


@triton.jit
def _dq_block(q, do, lse, delta, k_base, v_base, Index, seq, sib, row0, start_n, L, skn, svn,
              offs_d, d_ok, qk_scale, dq,
              HAS_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ contribution of keys start_n:start_n+BLOCK_N to one query block."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < L
    tok_n = _tokens(Index, seq, sib, row0, offs_n, n_ok, HAS_INDEX)
    dn_mask = d_ok[:, None] & n_ok[None, :]
    kt = tl.load(k_base + tok_n[None, :] * skn + offs_d[:, None], mask=dn_mask, other=0.0)
    vt = tl.load(v_base + tok_n[None, :] * svn + offs_d[:, None], mask=dn_mask, other=0.0)
    p = tl.math.exp2(_mm(q, kt, DOT_PRECISION) * qk_scale - lse[:, None])
    p = tl.where(n_ok[None, :], p, 0.0)
    dp = _mm(do, vt, DOT_PRECISION)
    if L <= BLOCK_N:  # this block holds every key: delta from the tile (see _tile_delta)
        delta = tl.sum(p * dp, 1)
    ds = p * (dp - delta[:, None])
    dq += _mm(ds.to(kt.dtype), tl.trans(kt), DOT_PRECISION)
    return dq


@triton.jit
def attention_fwd_kernel(
    Q, K, V, Out, Lse, Index, Cu,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    sob, soh, son, slb, slh, sln, sib,
    H, M, D, qk_scale,
    HAS_INDEX: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WHILE_LOOPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(1)
    seq = tl.program_id(0) // H
    head = tl.program_id(0) % H
    row0, L = _view(Cu, seq, M, VARLEN)
    if start_m * BLOCK_M >= L:
        return
    seq64, head64 = seq.to(tl.int64), head.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < D
    tok_m = _tokens(Index, seq, sib, row0, offs_m, m_ok, HAS_INDEX)
    q_base = Q + seq64 * sqb + head64 * sqh
    k_base = K + seq64 * skb + head64 * skh
    v_base = V + seq64 * svb + head64 * svh
    q = tl.load(q_base + tok_m[:, None] * sqn + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if WHILE_LOOPS:
        start_n = 0
        while start_n < L:
            m_i, l_i, acc = _fwd_block(q, k_base, v_base, Index, seq, sib, row0, start_n, L,
                                       skn, svn, offs_d, d_ok, qk_scale, m_i, l_i, acc,
                                       HAS_INDEX, DOT_PRECISION, BLOCK_N)
            start_n += BLOCK_N
    else:
        for start_n in range(0, L, BLOCK_N):
            m_i, l_i, acc = _fwd_block(q, k_base, v_base, Index, seq, sib, row0, start_n, L,
                                       skn, svn, offs_d, d_ok, qk_scale, m_i, l_i, acc,
                                       HAS_INDEX, DOT_PRECISION, BLOCK_N)

    acc = acc / l_i[:, None]
    out_rows = (row0 + offs_m).to(tl.int64)
    tl.store(Out + seq64 * sob + head64 * soh + out_rows[:, None] * son + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + seq64 * slb + head64 * slh + out_rows * sln,
             m_i + tl.math.log2(l_i), mask=m_ok)


@triton.jit
def attention_bwd_preprocess_kernel(
    Out, DOut, Delta, Cu,
    sob, soh, son, slb, slh, sln,
    H, M, D,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(1)
    seq = tl.program_id(0) // H
    head = tl.program_id(0) % H
    row0, L = _view(Cu, seq, M, VARLEN)
    if start_m * BLOCK_M >= L:
        return
    seq64, head64 = seq.to(tl.int64), head.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    rows = (row0 + offs_m).to(tl.int64)
    offs = seq64 * sob + head64 * soh + rows[:, None] * son + offs_d[None, :]
    mask = m_ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + seq64 * slb + head64 * slh + rows * sln, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, Index, Cu,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    sob, soh, son, slb, slh, sln, sgb, sgh, sgn, sib,
    H, M, D, scale, qk_scale,
    HAS_INDEX: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WHILE_LOOPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_n = tl.program_id(1)
    seq = tl.program_id(0) // H
    head = tl.program_id(0) % H
    row0, L = _view(Cu, seq, M, VARLEN)
    if start_n * BLOCK_N >= L:
        return
    seq64, head64 = seq.to(tl.int64), head.to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < L
    d_ok = offs_d < D
    tok_n = _tokens(Index, seq, sib, row0, offs_n, n_ok, HAS_INDEX)
    nd_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + seq64 * skb + head64 * skh + tok_n[:, None] * skn + offs_d[None, :],
                mask=nd_mask, other=0.0)
    v = tl.load(V + seq64 * svb + head64 * svh + tok_n[:, None] * svn + offs_d[None, :],
                mask=nd_mask, other=0.0)
    q_base = Q + seq64 * sqb + head64 * sqh
    do_base = DOut + seq64 * sob + head64 * soh
    stat_base = seq64 * slb + head64 * slh

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if WHILE_LOOPS:
        start_m = 0
        while start_m < L:
            dk, dv = _dkdv_block(k, v, n_ok, q_base, do_base, Lse, Delta, stat_base, Index,
                                 seq, sib, row0, start_m, L, sqn, son, sln, offs_d, d_ok,
                                 qk_scale, dk, dv, HAS_INDEX, DOT_PRECISION, BLOCK_M, BLOCK_N)
            start_m += BLOCK_M
    else:
        for start_m in range(0, L, BLOCK_M):
            dk, dv = _dkdv_block(k, v, n_ok, q_base, do_base, Lse, Delta, stat_base, Index,
                                 seq, sib, row0, start_m, L, sqn, son, sln, offs_d, d_ok,
                                 qk_scale, dk, dv, HAS_INDEX, DOT_PRECISION, BLOCK_M, BLOCK_N)

    g_offs = seq64 * sgb + head64 * sgh + tok_n[:, None] * sgn + offs_d[None, :]
    tl.store(DK + g_offs, (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + g_offs, dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, Index, Cu,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    sob, soh, son, slb, slh, sln, sgb, sgh, sgn, sib,
    H, M, D, scale, qk_scale,
    HAS_INDEX: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WHILE_LOOPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(1)
    seq = tl.program_id(0) // H
    head = tl.program_id(0) % H
    row0, L = _view(Cu, seq, M, VARLEN)
    if start_m * BLOCK_M >= L:
        return
    seq64, head64 = seq.to(tl.int64), head.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < D
    tok_m = _tokens(Index, seq, sib, row0, offs_m, m_ok, HAS_INDEX)
    rows = (row0 + offs_m).to(tl.int64)
    md_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + seq64 * sqb + head64 * sqh + tok_m[:, None] * sqn + offs_d[None, :],
                mask=md_mask, other=0.0)
    do = tl.load(DOut + seq64 * sob + head64 * soh + rows[:, None] * son + offs_d[None, :],
                 mask=md_mask, other=0.0)
    stat_base = seq64 * slb + head64 * slh
    lse = tl.load(Lse + stat_base + rows * sln, mask=m_ok, other=0.0)
    delta = tl.load(Delta + stat_base + rows * sln, mask=m_ok, other=0.0)
    k_base = K + seq64 * skb + head64 * skh
    v_base = V + seq64 * svb + head64 * svh

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if WHILE_LOOPS:
        start_n = 0
        while start_n < L:
            dq = _dq_block(q, do, lse, delta, k_base, v_base, Index, seq, sib, row0, start_n, L,
                           skn, svn, offs_d, d_ok, qk_scale, dq,
                           HAS_INDEX, DOT_PRECISION, BLOCK_N)
            start_n += BLOCK_N
    else:
        for start_n in range(0, L, BLOCK_N):
            dq = _dq_block(q, do, lse, delta, k_base, v_base, Index, seq, sib, row0, start_n, L,
                           skn, svn, offs_d, d_ok, qk_scale, dq,
                           HAS_INDEX, DOT_PRECISION, BLOCK_N)

    tl.store(DQ + seq64 * sgb + head64 * sgh + tok_m[:, None] * sgn + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=md_mask)


# ---------------------------------------------------------------- launch helpers
def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _blocks(head_dim: int, dtype: torch.dtype, short_views: bool = False) -> dict:
    """Tile sizes and launch settings per pass (H100-oriented, untuned; small in the
    interpreter, where a tile is a NumPy array and large masked tiles only cost time).

    ``short_views`` (packed input): the row tile each program owns shrinks to 64 so a
    49-token view fills 77% of it instead of 38%; for N=197 both sizes pad to 256 rows.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if _interpreted():
        return {"block_d": block_d, "fwd": (32, 32, 4, 1), "dkdv": (32, 32, 4, 1),
                "dq": (32, 32, 4, 1)}
    wide = block_d > 64 or dtype == torch.float32  # fp32 / d=128 tiles double the smem
    rows = 64 if short_views else 128
    return {
        "block_d": block_d,
        # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        "fwd": (128, 32, 8, 2) if wide else (rows, 64, 4, 3),
        "dkdv": (32, 64, 4, 2) if wide else (32, rows, 4, 3),
        "dq": (64, 32, 4, 2) if wide else (rows, 32, 4, 3),
    }


def _dot_precision(dtype: torch.dtype) -> str | None:
    # tf32 would add ~1e-3 relative error to fp32 inputs, beyond the accuracy rule;
    # 16-bit inputs keep Triton's default.
    if dtype == torch.bfloat16 and _interpreted():
        return "upcast"
    return "ieee" if dtype == torch.float32 else None


def _input_strides(t: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(sequence, head, token) strides; a packed tensor's sequences are token ranges."""
    return (0, t.stride(1), t.stride(0)) if packed else (t.stride(0), t.stride(1), t.stride(2))


def _geometry(q, index, cu_seqlens, max_seqlen):
    packed = cu_seqlens is not None
    if packed:
        T, H, D = q.shape
        return packed, cu_seqlens.numel() - 1, H, D, max_seqlen, T
    B, H, N, D = q.shape
    M = index.shape[1] if index is not None else N
    return packed, B, H, D, M, M


def _output_strides(packed: bool, H: int, M: int, D: int) -> tuple[int, int, int]:
    """Strides of the contiguous out / grad_out: [T, H, d] packed, [B, H, M, d] dense."""
    return (0, D, H * D) if packed else (H * M * D, M * D, D)


def _stat_strides(packed: bool, H: int, M: int, T: int) -> tuple[int, int, int]:
    """Strides of lse / delta: [H, T] packed, [B, H, M] dense."""
    return (0, T, 1) if packed else (H * M, M, 1)


def attention_forward(q, k, v, index, cu_seqlens, max_seqlen, scale):
    packed, S, H, D, M, T = _geometry(q, index, cu_seqlens, max_seqlen)
    if packed:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((H, T), device=q.device, dtype=torch.float32)
    else:
        out = torch.empty((S, H, M, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((S, H, M), device=q.device, dtype=torch.float32)
    if out.numel() == 0 or M == 0 or S == 0:
        return out, lse
    cfg = _blocks(D, q.dtype, short_views=packed)
    block_m, block_n, warps, stages = cfg["fwd"]
    dummy = lse  # stands in for index / cu_seqlens when absent (never read)
    attention_fwd_kernel[(S * H, triton.cdiv(M, block_m))](
        q, k, v, out, lse,
        index if index is not None else dummy, cu_seqlens if packed else dummy,
        *_input_strides(q, packed), *_input_strides(k, packed), *_input_strides(v, packed),
        *_output_strides(packed, H, M, D), *_stat_strides(packed, H, M, T),
        index.stride(0) if index is not None else 0,
        H, M, D, scale * LOG2E,
        HAS_INDEX=index is not None, VARLEN=packed, DOT_PRECISION=_dot_precision(q.dtype),
        WHILE_LOOPS=_interpreted(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg["block_d"],
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, index, cu_seqlens, max_seqlen, scale):
    packed, S, H, D, M, T = _geometry(q, index, cu_seqlens, max_seqlen)
    # Tokens outside the view receive no write and must read as zero gradient.
    alloc = torch.zeros if index is not None else torch.empty
    dq, dk, dv = (alloc(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    if out.numel() == 0 or M == 0 or S == 0:
        return dq, dk, dv
    grad_out = grad_out.contiguous()
    delta = torch.empty_like(lse)
    cfg = _blocks(D, q.dtype, short_views=packed)
    block_d = cfg["block_d"]
    dummy = lse
    index_arg = index if index is not None else dummy
    cu_arg = cu_seqlens if packed else dummy
    out_strides = _output_strides(packed, H, M, D)
    stat_strides = _stat_strides(packed, H, M, T)
    in_strides = (*_input_strides(q, packed), *_input_strides(k, packed),
                  *_input_strides(v, packed))
    common = {"HAS_INDEX": index is not None, "VARLEN": packed,
              "DOT_PRECISION": _dot_precision(q.dtype), "WHILE_LOOPS": _interpreted(),
              "BLOCK_D": block_d}
    sib = index.stride(0) if index is not None else 0

    pre_m = 64 if not _interpreted() else 32
    attention_bwd_preprocess_kernel[(S * H, triton.cdiv(M, pre_m))](
        out, grad_out, delta, cu_arg, *out_strides, *stat_strides, H, M, D,
        VARLEN=packed, BLOCK_M=pre_m, BLOCK_D=block_d,
    )
    block_m, block_n, warps, stages = cfg["dkdv"]
    attention_bwd_dkdv_kernel[(S * H, triton.cdiv(M, block_n))](
        q, k, v, grad_out, lse, delta, dk, dv, index_arg, cu_arg,
        *in_strides, *out_strides, *stat_strides, *_input_strides(dk, packed), sib,
        H, M, D, scale, scale * LOG2E, **common,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
    )
    block_m, block_n, warps, stages = cfg["dq"]
    attention_bwd_dq_kernel[(S * H, triton.cdiv(M, block_m))](
        q, k, v, grad_out, lse, delta, dq, index_arg, cu_arg,
        *in_strides, *out_strides, *stat_strides, *_input_strides(dq, packed), sib,
        H, M, D, scale, scale * LOG2E, **common,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv
