"""Pure-PyTorch reference of every smsd op: the oracle the kernels are tested against.

Each function is written for clarity, not speed, and defines the op's semantics,
edge cases included. Autograd through these functions gives the reference
gradients.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["attention", "dino_loss", "fused_linear_dino_loss", "masked_sample"]


def masked_sample(
    x: torch.Tensor, index: torch.Tensor, perm: torch.Tensor | None = None
) -> torch.Tensor:
    """Sample tokens: ``out[b, j] = x[b, index[b, j]]``, or ``x[b, perm[b, index[b, j]]]``.

    With ``perm`` the tokens are first put in the order ``perm`` gives (a client's
    secret permutation) and then sampled. Duplicate indices are allowed: each
    occurrence is an independent copy in the output, and their gradients add up
    in the backward pass (as ``torch.gather``'s do). Rows of ``x`` that no index
    selects receive a zero gradient.
    """
    if perm is not None:
        x = torch.gather(x, 1, perm.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.gather(x, 1, index.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


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
    """DINO's distillation loss, as ``DINOLoss.forward`` of facebookresearch/dino computes it.

    Rows are view-major (``student[v * B + b]`` is view ``v`` of image ``b``). Teacher view
    ``i`` is compared with every student view ``v != i``; each pair's cross-entropy is
    averaged over the batch and the pairs are averaged. Afterwards (the loss used the old
    center) ``center`` is moved in place toward the batch mean of the raw teacher outputs,
    all-reduced across ranks when ``torch.distributed`` is initialized.
    """
    student_out = (student / student_temp).chunk(n_student_views)
    teacher_out = F.softmax((teacher - center) / teacher_temp, dim=-1).detach()
    total, n_terms = 0.0, 0
    for i, q in enumerate(teacher_out.chunk(n_teacher_views)):
        for v, s in enumerate(student_out):
            if v == i:
                continue
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            n_terms += 1
    total = total / n_terms
    if update_center:
        _dino_center_update(center, teacher, center_momentum)
    return total


@torch.no_grad()
def _dino_center_update(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> None:
    batch_center = torch.sum(teacher, dim=0, keepdim=True)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_center)
        world = dist.get_world_size()
    batch_center = batch_center / (len(teacher) * world)
    center.copy_(center * momentum + batch_center * (1 - momentum))


def fused_linear_dino_loss(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    weight: torch.Tensor,
    center: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """:func:`dino_loss` of the head's logits ``feats @ weight.T`` (``weight`` is ``[K, D]``);
    the teacher's logits use ``teacher_weight`` when given."""
    teacher_weight = weight if teacher_weight is None else teacher_weight
    return dino_loss(student_feats @ weight.T, teacher_feats @ teacher_weight.T, center,
                     **options)
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    index: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Non-causal multi-head attention, optionally on a token subset or on packed sequences.

    Dense: ``q, k, v`` are ``[B, H, N, d]`` and the result is ``[B, H, N, d]``.
    With ``index`` (``[B, M]``): attention among the tokens ``index[b, :]`` of each
    sequence, in that order, giving ``[B, H, M, d]``; gradients land in the full
    ``[B, H, N, d]`` inputs (zero for tokens never selected). Entries of a row of
    ``index`` must be distinct: a token is either in the view or not.
    With ``cu_seqlens`` (int32 ``[S + 1]``): ``q, k, v`` are packed ``[T, H, d]`` and
    sequence ``s`` is rows ``cu_seqlens[s]:cu_seqlens[s + 1]``, attending only within itself.
    ``scale`` defaults to ``d ** -0.5``.
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        pieces = [
            attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), scale=scale)[0]
            for a, b in itertools.pairwise(bounds)
        ]
        return torch.cat([p.transpose(0, 1) for p in pieces]) if pieces else q.new_empty(q.shape)
    if index is not None:
        rows = index.long()[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])
        q, k, v = (torch.gather(t, 2, rows) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
