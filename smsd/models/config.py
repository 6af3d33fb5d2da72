"""The public model configuration: every client and the server build the same model from it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..checks import non_negative_int, positive_int

__all__ = ["ViTConfig", "vit_base", "vit_small", "vit_tiny"]


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a :class:`~smsd.models.SplitViT`.

    ``head_seed`` is part of the public configuration: the patch-embedding weights of a
    model built without a checkpoint come from it, so every client gets the same head.
    ``patch_embed_gain`` and ``pos_embed_scale`` scale that seeded head (patch-embedding
    weights and the sin-cos position embedding): with a small input, a larger gain lets
    the image signal, rather than the position embedding, dominate each token.
    ``init_std`` is the std of the body's linear weights at init (timm's 0.02 suits widths
    of 384-768; a narrow model needs about ``embed_dim ** -0.5`` for its residual
    branches, and so its CLS output, to depend on the input).
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_classes: int = 0
    head_seed: int = 0
    patch_embed_gain: float = 1.0
    pos_embed_scale: float = 1.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            positive_int(name, getattr(self, name))
        non_negative_int("num_classes", self.num_classes)
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        for name in ("patch_embed_gain", "pos_embed_scale", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        """Patch tokens per image (N), without the CLS token."""
        return self.grid**2

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config is not valid JSON: {exc}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or set(fields) - known:
            raise ValueError(f"model config has unknown fields: {sorted(set(fields) - known)}")
        return cls(**fields)


def _make(defaults: dict[str, Any], overrides: dict[str, Any]) -> ViTConfig:
    return ViTConfig(**{**defaults, **overrides})


def vit_tiny(*, patch_size: int = 16, img_size: int = 224, in_chans: int = 3, **overrides: Any):
    """ViT-Ti (dim 192, depth 12, 3 heads); ``overrides`` change any other field."""
    base = dict(embed_dim=192, depth=12, num_heads=3)
    sizes = dict(patch_size=patch_size, img_size=img_size, in_chans=in_chans)
    return _make(base | sizes, overrides)


def vit_small(*, patch_size: int = 16, img_size: int = 224, in_chans: int = 3, **overrides: Any):
    """ViT-S (dim 384, depth 12, 6 heads); ``overrides`` change any other field."""
    base = dict(embed_dim=384, depth=12, num_heads=6)
    sizes = dict(patch_size=patch_size, img_size=img_size, in_chans=in_chans)
    return _make(base | sizes, overrides)


def vit_base(*, patch_size: int = 16, img_size: int = 224, in_chans: int = 3, **overrides: Any):
    """ViT-B (dim 768, depth 12, 12 heads); ``overrides`` change any other field."""
    base = dict(embed_dim=768, depth=12, num_heads=12)
    sizes = dict(patch_size=patch_size, img_size=img_size, in_chans=in_chans)
    return _make(base | sizes, overrides)
