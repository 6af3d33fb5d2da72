"""Multi-head self-attention, timm-named.

Interim: replaced at merge by the attention/loss branches.

Plain PyTorch (SDPA) implementation of the ``smsd.nn.Attention`` contract: parameters
``qkv`` and ``proj``; dense ``[B, N, dim]`` input, or packed ``[T, dim]`` sequences with
int32 ``cu_seqlens`` (attention stays inside each sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention"]


class Attention(nn.Module):
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
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _dense(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4
        )
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        if cu_seqlens is None:
            return self._dense(x)
        # Packed: one sequence of all tokens with a block-diagonal mask.
        seq_id = torch.repeat_interleave(
            torch.arange(cu_seqlens.numel() - 1, device=x.device),
            (cu_seqlens[1:] - cu_seqlens[:-1]).long(),
        )
        mask = seq_id[:, None] == seq_id[None, :]
        return self._dense(x[None], mask)[0]
