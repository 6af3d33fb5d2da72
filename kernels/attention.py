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

Buffers: q, k, v are read in place with any strides whose rows are contiguous (e.g. the
views of one ``[B, N, 3, H, d]`` / ``[T, 3, H, d]`` qkv projection output);
``attention_backward(..., out=(dq, dk, dv))`` writes the gradients into caller-given
tensors of any strides (e.g. views of one qkv-shaped gradient buffer). Gradient
buffers are zeroed only when an ``index`` selects fewer than all N tokens (rows of an
index are distinct, so M == N is a permutation and every row is written).

Tiles: ``SM90_TABLE`` per pass, head-dim bucket, dtype and layout, every entry free of
register spills per ``ptxas -v`` (tests/test_attention_compile.py compiles each with
the launch's own specialization: ``sample_launches``, ``compile_launch``,
``ptxas_usage``).

Tensor descriptors (TMA): the dense forward (no index, fp16 / bf16, 16-byte aligned
strides) can read q, k, v through host-side ``TensorDescriptor``s of the 4-D
``[B, H, N, d]`` views (zero padding does the masking), ``USE_TMA``; it compiles for
sm_90 to ``cp.async.bulk.tensor`` loads without spills and runs in Triton 3.6's
interpreter, but is off by default (``TMA_FORWARD``, or ``tma=`` per call) because no
GPU has timed it yet. Left out elsewhere: the index path is a row gather (TMA gather
is sm_100 only); packed views start at arbitrary token offsets and are shorter than a
tile, so a box would read the next sequence's rows and need the pointer path's masks
anyway; the backward's stores go through token indices or into strided qkv views, and
fp32 (FMA dots) gains nothing and its d=128 descriptor forward spills.
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
def _fwd_block(q, k_base, v_base, KDesc, VDesc, Index, seq, head, sib, row0, start_n, L, skn,
               svn, offs_d, d_ok, qk_scale, m_i, l_i, acc,
               HAS_INDEX: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online-softmax update of one query block with keys/values start_n:start_n+BLOCK_N."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < L
    if USE_TMA:  # dense [B, H, N, d] descriptors: rows past N and columns past d read 0
        kt = tl.trans(KDesc.load([seq, head, start_n, 0]).reshape(BLOCK_N, BLOCK_D))
        v = VDesc.load([seq, head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
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
    Q, K, V, Out, Lse, Index, Cu, QDesc, KDesc, VDesc,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    sob, soh, son, slb, slh, sln, sib,
    H, M, D, qk_scale,
    HAS_INDEX: tl.constexpr, VARLEN: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WHILE_LOOPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    if USE_TMA:
        q = QDesc.load([seq, head, start_m * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q = tl.load(q_base + tok_m[:, None] * sqn + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if WHILE_LOOPS:
        start_n = 0
        while start_n < L:
            m_i, l_i, acc = _fwd_block(q, k_base, v_base, KDesc, VDesc, Index, seq, head, sib,
                                       row0, start_n, L, skn, svn, offs_d, d_ok, qk_scale,
                                       m_i, l_i, acc, HAS_INDEX, USE_TMA, DOT_PRECISION,
                                       BLOCK_N, BLOCK_D)
            start_n += BLOCK_N
    else:
        for start_n in range(0, L, BLOCK_N):
            m_i, l_i, acc = _fwd_block(q, k_base, v_base, KDesc, VDesc, Index, seq, head, sib,
                                       row0, start_n, L, skn, svn, offs_d, d_ok, qk_scale,
                                       m_i, l_i, acc, HAS_INDEX, USE_TMA, DOT_PRECISION,
                                       BLOCK_N, BLOCK_D)

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
    sob, soh, son, slb, slh, sln, sgb, sgh, sgn, sdvb, sdvh, sdvn, sib,
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

    tl.store(DK + seq64 * sgb + head64 * sgh + tok_n[:, None] * sgn + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + seq64 * sdvb + head64 * sdvh + tok_n[:, None] * sdvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=nd_mask)


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


# ---------------------------------------------------------------- tile table
LAYOUTS = ("dense", "index", "packed")
PASSES = ("fwd", "dkdv", "dq")
PREPROCESS_BLOCK_M = 64

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass on sm_90, by head-dim bucket (the
# padded BLOCK_D: 16 and 32 use the 64 entries), dtype class ("16": fp16 / bf16, "32":
# fp32) and layout. Chosen (without a GPU to time them) as the largest tiles found that
# compile with ZERO register spills per `ptxas -v` for every layout, with the launch's
# own specialization (tests/test_attention_compile.py checks each BLOCK_D <= 128 entry;
# its docstring lists registers / spills / shared memory). fp32 uses FMA dots ("ieee"),
# whose operand layouts cost far more registers than the tensor-core path: 8 warps and
# 32-wide tiles; ptxas is erratic there (fwd d=128 (32, 32, 8, 2) spills with an index
# and not without), so every layout is compiled, not one. BLOCK_D = 16 and 32 reuse the
# 64 entries (smaller tiles of the same shape); no model here uses d > 128, but the 256
# entries are spill-free as well.
Tiles = tuple[int, int, int, int]


def _sm90_table() -> dict[tuple[int, str, str], dict[str, Tiles]]:
    table = {}
    for layout in LAYOUTS:
        short = layout == "packed"  # 64-row tiles: a 49-token view fills 77%, not 38%
        table[64, "16", layout] = {
            "fwd": (64, 64, 4, 3) if short else (128, 64, 4, 3),
            "dkdv": (32, 64, 4, 3) if short else (32, 128, 8, 3),
            "dq": (64, 32, 4, 3) if short else (128, 32, 4, 3),
        }
        table[128, "16", layout] = {
            "fwd": (128, 32, 8, 2), "dkdv": (32, 64, 8, 2), "dq": (64, 32, 4, 2)}
        table[256, "16", layout] = {
            "fwd": (64, 32, 8, 2), "dkdv": (16, 32, 8, 2), "dq": (32, 16, 8, 2)}
        table[64, "32", layout] = {
            "fwd": (64, 32, 8, 2), "dkdv": (32, 64, 8, 2), "dq": (64, 32, 8, 2)}
        table[128, "32", layout] = {
            "fwd": (32, 32, 8, 3), "dkdv": (16, 32, 8, 2), "dq": (32, 32, 8, 2)}
        table[256, "32", layout] = {
            "fwd": (16, 16, 4, 2), "dkdv": (16, 16, 4, 2), "dq": (16, 16, 4, 2)}
        for kind in ("16", "32"):
            table[16, kind, layout] = table[32, kind, layout] = table[64, kind, layout]
    return table


SM90_TABLE = _sm90_table()
_INTERPRETER_TILES = {"fwd": (32, 32, 4, 1), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _layout(index, cu_seqlens) -> str:
    return "packed" if cu_seqlens is not None else "index" if index is not None else "dense"


def _blocks(head_dim: int, dtype: torch.dtype, layout: str = "dense") -> dict:
    """Tile sizes and launch settings, ``{"block_d": D, pass: (BLOCK_M, BLOCK_N,
    num_warps, num_stages)}`` for the passes "fwd", "dkdv" and "dq", as the launch uses
    them: SM90_TABLE (above) on a GPU, small tiles in the interpreter (a tile is a
    NumPy array there and large masked tiles only cost time). ``layout`` is "dense",
    "index" or "packed" (short views: 64-row tiles, so a 49-token view fills 77% of a
    tile instead of 38%)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    if _interpreted():
        return {"block_d": block_d, **_INTERPRETER_TILES}
    kind = "32" if dtype == torch.float32 else "16"
    return {"block_d": block_d, **SM90_TABLE[block_d, kind, layout]}


def _dot_precision(dtype: torch.dtype) -> str | None:
    # tf32 would add ~1e-3 relative error to fp32 inputs, beyond the accuracy rule;
    # 16-bit inputs keep Triton's default.
    if dtype == torch.bfloat16 and _interpreted():
        return "upcast"
    return "ieee" if dtype == torch.float32 else None


# ---------------------------------------------------------------- launch helpers
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


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are contiguous (any other strides are kernel arguments:
    views of one qkv buffer are read in place), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


# Tensor descriptors (TMA) for q, k, v in the dense forward: off by default (see the
# module docstring); ``tma=`` of ``attention_forward`` overrides it per call.
TMA_FORWARD = False


def _tma_ok(tensors, layout: str) -> bool:
    """Whether the descriptor forward applies: dense [B, H, N, d] fp16 / bf16 tensors (no
    index), 16-byte aligned base and strides, contiguous rows. (fp32's FMA dots gain
    nothing from it and its d=128 descriptor forward spills.)"""
    if layout != "dense" or tensors[0].dtype not in (torch.float16, torch.bfloat16):
        return False
    for t in tensors:
        if t.stride(-1) != 1 or t.data_ptr() % 16 or 0 in t.shape:
            return False
        if any(stride * t.element_size() % 16 for stride in t.stride()[:-1]):
            return False
    return True


def _descriptors(q, k, v, block_m, block_n, block_d):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, block_d])
                 for t, rows in ((q, block_m), (k, block_n), (v, block_n)))


def _forward_launches(q, k, v, index, cu_seqlens, max_seqlen, scale, out, lse,
                      tma: bool | None = None) -> list:
    """``[(pass, kernel, grid, args, kwargs)]`` of the forward."""
    packed, S, H, D, M, T = _geometry(q, index, cu_seqlens, max_seqlen)
    layout = _layout(index, cu_seqlens)
    cfg = _blocks(D, q.dtype, layout)
    block_m, block_n, warps, stages = cfg["fwd"]
    use_tma = (TMA_FORWARD if tma is None else tma) and _tma_ok((q, k, v), layout)
    descs = (_descriptors(q, k, v, block_m, block_n, cfg["block_d"]) if use_tma
             else (None, None, None))
    dummy = lse  # stands in for index / cu_seqlens when absent (never read)
    args = (
        q, k, v, out, lse,
        index if index is not None else dummy, cu_seqlens if packed else dummy, *descs,
        *_input_strides(q, packed), *_input_strides(k, packed), *_input_strides(v, packed),
        *_output_strides(packed, H, M, D), *_stat_strides(packed, H, M, T),
        index.stride(0) if index is not None else 0,
        H, M, D, scale * LOG2E,
    )
    kwargs = dict(
        HAS_INDEX=index is not None, VARLEN=packed, USE_TMA=use_tma,
        DOT_PRECISION=_dot_precision(q.dtype),
        WHILE_LOOPS=_interpreted(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg["block_d"],
        num_warps=warps, num_stages=stages,
    )
    return [("fwd", attention_fwd_kernel, (S * H, triton.cdiv(M, block_m)), args, kwargs)]


def _backward_launches(grad_out, q, k, v, o, lse, delta, dq, dk, dv, index, cu_seqlens,
                       max_seqlen, scale) -> list:
    """``[(pass, kernel, grid, args, kwargs)]`` of the backward: "pre", "dkdv", "dq"."""
    packed, S, H, D, M, T = _geometry(q, index, cu_seqlens, max_seqlen)
    cfg = _blocks(D, q.dtype, _layout(index, cu_seqlens))
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

    pre_m = PREPROCESS_BLOCK_M if not _interpreted() else 32
    launches = [(
        "pre", attention_bwd_preprocess_kernel, (S * H, triton.cdiv(M, pre_m)),
        (o, grad_out, delta, cu_arg, *out_strides, *stat_strides, H, M, D),
        dict(VARLEN=packed, BLOCK_M=pre_m, BLOCK_D=block_d),
    )]
    block_m, block_n, warps, stages = cfg["dkdv"]
    launches.append((
        "dkdv", attention_bwd_dkdv_kernel, (S * H, triton.cdiv(M, block_n)),
        (q, k, v, grad_out, lse, delta, dk, dv, index_arg, cu_arg,
         *in_strides, *out_strides, *stat_strides, *_input_strides(dk, packed),
         *_input_strides(dv, packed), sib, H, M, D, scale, scale * LOG2E),
        dict(**common, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages),
    ))
    block_m, block_n, warps, stages = cfg["dq"]
    launches.append((
        "dq", attention_bwd_dq_kernel, (S * H, triton.cdiv(M, block_m)),
        (q, k, v, grad_out, lse, delta, dq, index_arg, cu_arg,
         *in_strides, *out_strides, *stat_strides, *_input_strides(dq, packed), sib,
         H, M, D, scale, scale * LOG2E),
        dict(**common, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages),
    ))
    return launches


def _run(launches) -> None:
    for _, kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)


def attention_forward(q, k, v, index, cu_seqlens, max_seqlen, scale, *, tma=None):
    """``(out, lse)``: out ``[B, H, M, d]`` (dense) or ``[T, H, d]`` (packed), contiguous;
    lse ``[B, H, M]`` / ``[H, T]`` fp32. q, k, v may have any strides with contiguous rows
    (e.g. views of one qkv buffer; they are read in place). ``tma``: read q, k, v through
    tensor descriptors where they allow it (dense, no index; default ``TMA_FORWARD``)."""
    q, k, v = (_rows(t) for t in (q, k, v))
    packed, S, H, D, M, T = _geometry(q, index, cu_seqlens, max_seqlen)
    if packed:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        lse = torch.empty((H, T), device=q.device, dtype=torch.float32)
    else:
        out = torch.empty((S, H, M, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((S, H, M), device=q.device, dtype=torch.float32)
    if out.numel() == 0 or M == 0 or S == 0:
        return out, lse
    _run(_forward_launches(q, k, v, index, cu_seqlens, max_seqlen, scale, out, lse, tma))
    return out, lse


def _grad_buffers(q, index, out):
    """(dq, dk, dv) for the kernels to write, and the tensors to return. Every token row
    is written unless ``index`` selects fewer than all N tokens (its rows are distinct, so
    M == N is a permutation); only then are unselected rows zeroed."""
    partial = index is not None and index.shape[1] < q.shape[2]
    if out is None:
        alloc = torch.zeros if partial else torch.empty
        grads = tuple(alloc(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
        return grads, grads
    out = tuple(out)
    if len(out) != 3:
        raise ValueError(f"out must be three tensors (dq, dk, dv), got {len(out)}")
    for name, g in zip(("dq", "dk", "dv"), out, strict=True):
        if g.shape != q.shape or g.dtype != q.dtype or g.device != q.device:
            raise ValueError(f"out {name} must be a {tuple(q.shape)} {q.dtype} tensor on "
                             f"{q.device}, got {tuple(g.shape)} {g.dtype} on {g.device}")
    # rows the kernel cannot address (last stride != 1) are written to a scratch tensor
    work = tuple(_rows(g) for g in out)
    if partial:
        for g in work:
            g.zero_()
    return work, out


def attention_backward(grad_out, q, k, v, o, lse, index, cu_seqlens, max_seqlen, scale, *,
                       out=None):
    """``(dq, dk, dv)``, each shaped like q. ``o`` is the forward's output, ``lse`` its
    log-sum-exp. With ``out=(dq, dk, dv)`` (tensors shaped like q, any strides, e.g. three
    views of one ``[B, N, 3, H, d]`` / ``[T, 3, H, d]`` gradient buffer) the gradients are
    written there and those tensors are returned; their previous contents need not be
    zero (rows outside a partial ``index`` are zeroed here)."""
    q, k, v = (_rows(t) for t in (q, k, v))
    _, S, _, _, M, _ = _geometry(q, index, cu_seqlens, max_seqlen)
    (dq, dk, dv), result = _grad_buffers(q, index, out)
    if o.numel() and M and S:
        grad_out, o = grad_out.contiguous(), o.contiguous()
        delta = torch.empty_like(lse)
        _run(_backward_launches(grad_out, q, k, v, o, lse, delta, dq, dk, dv, index,
                                cu_seqlens, max_seqlen, scale))
    for g, r in zip((dq, dk, dv), result, strict=True):
        if g is not r:
            r.copy_(g)
    return result


# ---------------------------------------------------------------- compiled form (sm_90)
def sample_launches(head_dim: int, dtype: torch.dtype, layout: str, *, heads: int = 6,
                    tokens: int = 197, batch: int = 2,
                    lengths: tuple[int, ...] = (197, 197, 37, 37, 37, 37),
                    tma: bool | None = None) -> list:
    """The launches of one forward and backward step (``[(pass, kernel, grid, args,
    kwargs)]``, passes "fwd", "pre", "dkdv", "dq") on "meta" tensors laid out as a ViT's
    qkv projection gives them (q, k, v and dq, dk, dv: views of one ``[B, N, 3, H, d]``
    or ``[T, 3, H, d]`` buffer; ``index`` a full permutation), with the tiles
    :func:`_blocks` picks: exactly what :func:`attention_forward` and
    :func:`attention_backward` launch for that shape."""
    meta = dict(device="meta", dtype=dtype)
    if layout == "packed":
        qkv = torch.empty(sum(lengths), 3, heads, head_dim, **meta)
        q, k, v = qkv.unbind(1)
        grads = torch.empty_like(qkv).unbind(1)
        cu = torch.empty(len(lengths) + 1, device="meta", dtype=torch.int32)
        index, max_seqlen = None, max(lengths)
    else:
        qkv = torch.empty(batch, tokens, 3, heads, head_dim, **meta)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        grads = tuple(t.transpose(1, 2) for t in torch.empty_like(qkv).unbind(2))
        cu, max_seqlen = None, 0
        index = (torch.empty(batch, tokens, device="meta", dtype=torch.int64)
                 if layout == "index" else None)
    packed, S, H, D, M, T = _geometry(q, index, cu, max_seqlen)
    shape = (T, H, D) if packed else (S, H, M, D)
    out, grad_out = torch.empty(shape, **meta), torch.empty(shape, **meta)
    lse = torch.empty((H, T) if packed else (S, H, M), device="meta", dtype=torch.float32)
    scale = head_dim ** -0.5
    return [*_forward_launches(q, k, v, index, cu, max_seqlen, scale, out, lse, tma),
            *_backward_launches(grad_out, q, k, v, out, lse, torch.empty_like(lse), *grads,
                                index, cu, max_seqlen, scale)]


def compile_launch(kernel, args, kwargs, capability: int = 90):
    """Compile one launch for ``sm_<capability>`` (no GPU needed) with the specialization
    Triton's JIT gives the same call: its own argument binder (pointers and ints divisible
    by 16 get tt.divisibility=16, ints equal to 1 become constants). Needs the compiled
    kernels (TRITON_INTERPRET unset)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("compile_launch needs the compiled kernels (TRITON_INTERPRET unset)")
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def ptxas_usage(compiled) -> dict:
    """Resources of a compiled kernel per ``ptxas -v`` on its PTX (the ptxas bundled with
    Triton, the arch the PTX targets): registers, spill stores / loads (bytes), static
    smem (bytes), and ``shared``: the dynamic shared memory Triton launches it with."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target (sm_\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(int(re.sub(r"\D", "", arch))).path, "-v", f"--gpu-name={arch}", src,
             "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True).stderr

    def number(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"),
            "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"),
            "smem": number(r"(\d+) bytes smem"),
            "shared": compiled.metadata.shared}
