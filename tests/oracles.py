"""Independent formulas of the fused ops, for the accuracy tests.

Each op is written out from its docstring with plain tensor algebra and closed-form
gradients: nothing here calls ``smsd.ops.reference`` (the ``torch`` backend) or autograd,
so the ``torch`` backend is tested against an independent implementation, not itself.
Run in float64 the formulas are the tests' oracle; run in fp32 on the upcast inputs
they are the baseline of the kernels that accumulate in fp32 (``smsd.testing``).
"""

from __future__ import annotations

import itertools

import torch


# ---------------------------------------------------------------- dino_loss
def dino_loss(student, teacher, center, *, n_student_views, n_teacher_views=2,
              student_temp=0.1, teacher_temp=0.04, center_momentum=0.9):
    """(loss, d loss / d student, center after the update) of DINO's loss, in the
    inputs' precision (the center's dtype joins by promotion, as in the op).

    ``loss = mean over pairs (i, v), i != v, of mean over b of
    -sum_k softmax((t_ib - c) / teacher_temp)_k * log_softmax(s_vb / student_temp)_k``;
    its gradient for row (v, b) is ``(n_v softmax(s_vb / student_temp) - sum_{i != v}
    q_ib) / (student_temp * n_pairs * B)``, n_v the teacher views paired with view v.
    """
    S, T = n_student_views, n_teacher_views
    K = student.shape[1]
    B = student.shape[0] // S
    s = (student / student_temp).reshape(S, B, K)
    z = s - s.amax(-1, keepdim=True)
    logp = z - z.exp().sum(-1, keepdim=True).log()
    x = ((teacher - center) / teacher_temp).reshape(T, B, K)
    e = (x - x.amax(-1, keepdim=True)).exp()
    q = e / e.sum(-1, keepdim=True)
    pairs = [(i, v) for i in range(T) for v in range(S) if v != i]
    cross = torch.stack([-(q[i] * logp[v]).sum(-1) for i, v in pairs])  # [pairs, B]
    loss = cross.mean(-1).mean()
    p = logp.exp()
    rows = []
    for v in range(S):
        targets = [q[i] for i in range(T) if i != v]  # none: view v is in no pair
        rows.append(len(targets) * p[v] - sum(targets, torch.zeros_like(p[v])))
    grad = (torch.stack(rows) / (student_temp * len(pairs) * B)).reshape(S * B, K)
    batch_mean = teacher.sum(0, keepdim=True) / teacher.shape[0]
    new_center = center * center_momentum + batch_mean * (1 - center_momentum)
    return loss, grad.to(student.dtype), new_center


# ---------------------------------------------------------------- attention
def _attend(q, k, v, do, scale):
    """Attention of ``[..., L, d]`` tensors and its closed-form backward, plus the
    magnitudes that bound the roundings of a flash-attention kernel (see
    :func:`attention`)."""
    s = scale * (q @ k.transpose(-1, -2))
    e = (s - s.amax(-1, keepdim=True)).exp()
    p = e / e.sum(-1, keepdim=True)
    out = p @ v
    dp = do @ v.transpose(-1, -2)
    delta = (p * dp).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = scale * (ds @ k)
    dk = scale * (ds.transpose(-1, -2) @ q)
    dv = p.transpose(-1, -2) @ do
    r = (do.abs() * out.abs()).sum(-1, keepdim=True)  # the terms of delta = rowsum(dO * O)
    mags = (
        p @ v.abs(),  # out = P V with P rounded
        scale * (ds.abs() @ k.abs() + r * (p @ k.abs())),  # dq: dS rounded, delta of rounded O
        scale * (ds.abs().transpose(-1, -2) @ q.abs()
                 + p.transpose(-1, -2) @ (r * q.abs())),  # dk: the same, transposed
        p.transpose(-1, -2) @ do.abs(),  # dv = P^T dO with P rounded
    )
    return (out, dq, dk, dv), mags


def attention(q, k, v, grad_out, *, index=None, cu_seqlens=None, scale=None):
    """``(out, dq, dk, dv)`` of softmax(scale q k^T) v and, second, the first-order
    magnitudes ``|P| |V|``, ``scale (|dS| |K| + ...)``, ... of each output: what a kernel
    that rounds P and dS (and reads O back rounded for delta) to the input dtype before
    its fp32-accumulated products may be off by, per unit of that dtype's eps.

    Dense ``[B, H, N, d]``; with ``index`` ``[B, M]`` the view is gathered by indexing
    and the gradients scattered back (zero elsewhere); packed ``[T, H, d]`` with
    ``cu_seqlens``, one sequence at a time.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        outs = [torch.zeros_like(t) for t in (q, k, v, q)]
        mags = [torch.zeros_like(t) for t in (q, k, v, q)]
        bounds = cu_seqlens.tolist()
        for a, b in itertools.pairwise(bounds):
            if a == b:
                continue
            piece = [t[a:b].transpose(0, 1) for t in (q, k, v, grad_out)]  # [H, L, d]
            res, mag = _attend(*piece, scale)
            for dst, src in ((outs, res), (mags, mag)):
                for i in range(4):
                    dst[i][a:b] = src[i].transpose(0, 1)
        return outs, mags
    if index is None:
        return _attend(q, k, v, grad_out, scale)
    index = index.long()
    rows = torch.arange(q.shape[0], device=index.device)[:, None]
    view = [t[rows, :, index].transpose(1, 2) for t in (q, k, v)]  # [B, H, M, d]
    res, mag = _attend(*view, grad_out, scale)

    def scatter(t):  # [B, H, M, d] -> [B, H, N, d], zero outside the view
        full = torch.zeros_like(q)
        full[rows, :, index] = t.transpose(1, 2)
        return full

    return ([res[0], *(scatter(t) for t in res[1:])],
            [mag[0], *(scatter(t) for t in mag[1:])])


# ---------------------------------------------------------------- masked_sample
def masked_sample(x, index, perm=None):
    """``out[b, j] = x[b, perm[b, index[b, j]]]`` by advanced indexing."""
    rows = torch.arange(x.shape[0], device=index.device)[:, None]
    src = index.long() if perm is None else perm.long()[rows, index.long()]
    return x[rows, src]


def masked_sample_grad(grad_out, index, perm, n_tokens):
    """Its gradient: ``grad_out`` rows added into the rows they were copied from, one
    at a time in output order (repeats add up; rows never sampled stay zero)."""
    B, K, D = grad_out.shape
    rows = torch.arange(B, device=index.device)[:, None]
    src = (index.long() if perm is None else perm.long()[rows, index.long()]).tolist()
    grad = torch.zeros(B, n_tokens, D, dtype=grad_out.dtype, device=grad_out.device)
    for b in range(B):
        for j in range(K):
            grad[b, src[b][j]] += grad_out[b, j]
    return grad
