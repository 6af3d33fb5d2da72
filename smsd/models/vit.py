"""SplitViT: a ViT cut into a client-side head, a server-trained body and task tails.

* head: patch embedding + position embedding. Frozen; its weights come from a seeded
  init that is part of the public :class:`ViTConfig` (or from a checkpoint), so all
  clients embed identically.
* body: CLS token, transformer blocks, final norm. It never sees positions (they are
  already folded into the tokens), so it is permutation-equivariant and its CLS output
  does not depend on token order: that is what lets clients shuffle tokens.
* tail: a linear classifier (or :class:`~smsd.models.DINOHead` for pre-training).

Parameter names follow timm (``patch_embed.proj``, ``blocks.N.attn.qkv``...), so
:func:`~smsd.models.load_pretrained` can read timm and DINO checkpoints.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import Attention
from .config import ViTConfig

__all__ = ["Block", "ClassifierTail", "PatchHead", "SplitViT", "ViTBody", "head_fingerprint"]


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``[grid*grid, dim]`` (MAE's), row-major."""
    if dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for the sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                         indexing="ij")
    parts = []
    for coord in (xs.reshape(-1), ys.reshape(-1)):
        angles = np.outer(coord, omega)
        parts += [np.sin(angles), np.cos(angles)]
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()


class PatchEmbed(nn.Module):
    """Image → patch tokens ``[B, N, D]`` (timm's ``patch_embed``)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size,
                              stride=config.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class PatchHead(nn.Module):
    """The client-side head: patch embedding plus position embedding of every patch."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.n_tokens, config.embed_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deterministic init from ``config.head_seed`` (identical on every machine)."""
        gen = torch.Generator().manual_seed(self.config.head_seed)
        weight = self.patch_embed.proj.weight
        fan_in, fan_out = weight[0].numel(), weight.shape[0]
        bound = (6.0 / (fan_in + fan_out)) ** 0.5  # Xavier-uniform on the flattened kernel (MAE)
        weight.copy_((torch.rand(weight.shape, generator=gen) * 2 * bound - bound)
                     * self.config.patch_embed_gain)
        self.patch_embed.proj.bias.zero_()
        pos = sincos_pos_embed(self.config.embed_dim, self.config.grid)
        self.pos_embed.copy_(pos[None] * self.config.pos_embed_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        expected = (c.in_chans, c.img_size, c.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape [B, {c.in_chans}, {c.img_size}, {c.img_size}], "
                f"got {list(images.shape)}"
            )
        return self.patch_embed(images) + self.pos_embed


def head_fingerprint(head: PatchHead) -> str:
    """sha256 of the head's weights (names, shapes and fp32 values), hex."""
    digest = hashlib.sha256(b"smsd/head/v1")
    for name, tensor in sorted(head.state_dict().items()):
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{list(data.shape)};".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm names)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        x = x + self.attn(self.norm1(x), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return x + self.mlp(self.norm2(x))


def _init_weights(module: nn.Module, std: float = 0.02) -> None:
    if isinstance(module, nn.Linear):
        if std:
            nn.init.trunc_normal_(module.weight, std=std)
        else:  # the limit of std -> 0 (trunc_normal_ divides by std)
            nn.init.zeros_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTBody(nn.Module):
    """CLS token + blocks + final norm; input tokens carry no positional information.

    The CLS token here already includes the CLS position embedding of timm checkpoints
    (a constant, so folding it in changes nothing).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, config.qkv_bias)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(lambda module: _init_weights(module, config.init_std))

    @classmethod
    def seeded(cls, config: ViTConfig, seed: int) -> ViTBody:
        """A randomly initialized body drawn from ``seed`` (the global RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)

    def _check(self, name: str, tokens: torch.Tensor, dims: int) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dim() != dims or tokens.shape[-1] != self.config.embed_dim:
            shape = "[B, K, D]" if dims == 3 else "[T, D]"
            raise ValueError(f"{name} must have shape {shape} with D={self.config.embed_dim}, "
                             f"got {list(tokens.shape)}")

    def forward(self, tokens: torch.Tensor, return_all: bool = False) -> torch.Tensor:
        """Dense: ``[B, K, D]`` tokens (any K) → CLS features ``[B, D]``
        (or all outputs ``[B, 1 + K, D]`` with ``return_all``)."""
        self._check("tokens", tokens, 3)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens],
                      dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x if return_all else x[:, 0]

    def forward_views(self, views: Sequence[torch.Tensor], packed: bool = False) -> torch.Tensor:
        """CLS features of several views ``[B_v, K_v, D]`` in one call → ``[sum B_v, D]``,
        view-major (the row order DINO's loss expects).

        ``packed`` runs every sequence of every view as one varlen batch (``cu_seqlens``);
        otherwise views with the same token count are batched densely together.
        """
        if not views:
            raise ValueError("views must hold at least one tensor")
        for v, view in enumerate(views):
            self._check(f"views[{v}]", view, 3)
        if packed:
            return self._forward_packed(views)
        out: list[torch.Tensor | None] = [None] * len(views)
        by_size: dict[int, list[int]] = {}
        for v, view in enumerate(views):
            by_size.setdefault(view.shape[1], []).append(v)
        for members in by_size.values():
            feats = self(torch.cat([views[v] for v in members]))
            for v, chunk in zip(members, feats.split([views[v].shape[0] for v in members]),
                                strict=True):
                out[v] = chunk
        return torch.cat(out)  # type: ignore[arg-type]

    def _forward_packed(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        dim = self.config.embed_dim
        pieces, lengths = [], []
        for view in views:
            b, k, _ = view.shape
            cls = self.cls_token.expand(b, 1, dim).to(view.dtype)
            pieces.append(torch.cat([cls, view], dim=1).reshape(b * (k + 1), dim))
            lengths += [k + 1] * b
        x = torch.cat(pieces)
        seqlens = torch.tensor(lengths, dtype=torch.int32, device=x.device)
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=x.device)
        cu_seqlens[1:] = seqlens.cumsum(0)
        return self.forward_packed(x, cu_seqlens, max(lengths), cu_seqlens[:-1].long())

    def forward_packed(self, rows: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       cls_rows: torch.Tensor, checkpoint_blocks: int = 0) -> torch.Tensor:
        """Packed varlen sequences ``rows`` ``[T, D]`` (each starting with its CLS row;
        ``cu_seqlens`` int32 ``[S + 1]``) → the CLS features ``[len(cls_rows), D]`` of the
        rows ``cls_rows``, in that order.

        The first ``checkpoint_blocks`` blocks keep only their input for the backward pass
        and run their forward again there (activation checkpointing): at ViT-S scale each
        block's saved activations take ~36 bytes per token and channel, its input 4.
        """
        x = rows
        for i, block in enumerate(self.blocks):
            if i < checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                               use_reentrant=False)
            else:
                x = block(x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        # LayerNorm is per token: normalizing only the CLS rows gives the same features.
        return self.norm(x.index_select(0, cls_rows))


class ClassifierTail(nn.Module):
    """Linear classifier on CLS features (timm's ``head``)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


class SplitViT(nn.Module):
    """head (frozen, client) → body (server-trained) → tail (classifier, if ``num_classes``)."""

    def __init__(self, config: ViTConfig, *, body_seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.head = PatchHead(config)
        self.head.requires_grad_(False)
        if body_seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(body_seed)
                self.body = ViTBody(config)
                self.tail = ClassifierTail(config.embed_dim, config.num_classes) \
                    if config.num_classes else None
        else:
            self.body = ViTBody(config)
            self.tail = ClassifierTail(config.embed_dim, config.num_classes) \
                if config.num_classes else None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """CLS features ``[B, D]`` of images."""
        return self.body(self.head(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.features(images)
        return feats if self.tail is None else self.tail(feats)
