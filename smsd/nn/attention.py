"""smsd.nn.Attention: timm's ViT attention block on the smsd attention kernels."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import attention_qkv

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head self-attention, a drop-in for ``timm.models.vision_transformer.Attention``.

    Parameters are named as in timm (``qkv``: Linear dim -> 3·dim, ``proj``: Linear
    dim -> dim), so timm and DINO state dicts load unchanged.

    ``forward(x)`` takes ``[B, N, dim]``; ``forward(x, cu_seqlens, max_seqlen)`` takes
    packed ``[T, dim]`` tokens of several sequences (int32 ``cu_seqlens`` ``[S + 1]``),
    each attending only within itself, so views of every size run in one launch.
    The fused kernels have no dropout: with ``attn_drop > 0`` in training mode the
    block runs ``F.scaled_dot_product_attention`` with ``dropout_p`` instead.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        packed = cu_seqlens is not None
        expected = 2 if packed else 3
        if x.dim() != expected:
            layout = "[T, dim] with cu_seqlens" if packed else "[B, N, dim]"
            raise ValueError(f"x must be {layout}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        # [..., 3, H, d]: one projection, handed to the op whole, so its gradient comes
        # back as one buffer in this layout (no per-q/k/v copies either way).
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        if self.training and self.attn_drop > 0:
            q, k, v = qkv.unbind(-3)
            if not packed:  # [B, N, H, d] -> [B, H, N, d]
                q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            out = self._dropout_attention(q, k, v, cu_seqlens)
        else:
            out = attention_qkv(qkv, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                scale=self.scale)
        if not packed:
            out = out.transpose(1, 2)
        return self.proj_drop(self.proj(out.reshape(*lead, -1)))

    def _dropout_attention(self, q, k, v, cu_seqlens):
        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop,
                                                  scale=self.scale)

        if cu_seqlens is None:
            return sdpa(q, k, v)
        parts = [
            sdpa(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            for a, b in itertools.pairwise(cu_seqlens.tolist())
        ]
        return torch.cat(parts)
