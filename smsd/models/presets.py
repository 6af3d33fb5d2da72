"""Model configs by name, as timm names its models: ``model_config("vit_small", img_size=32)``.

``demo`` is the project's measured demo model; the ViT sizes are the usual ones (timm's
``vit_tiny/small/base_patch16_224``). Register more with :func:`register_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import ViTConfig, vit_base, vit_small, vit_tiny

__all__ = ["demo", "list_models", "model_config", "register_model"]

_PRESETS: dict[str, Callable[..., ViTConfig]] = {}


def register_model(name: str) -> Callable[[Callable[..., ViTConfig]], Callable[..., ViTConfig]]:
    """Decorator: make ``fn(**overrides) -> ViTConfig`` available as ``name``."""
    def add(fn: Callable[..., ViTConfig]) -> Callable[..., ViTConfig]:
        if name in _PRESETS:
            raise ValueError(f"model preset {name!r} is already registered")
        _PRESETS[name] = fn
        return fn
    return add


def list_models() -> list[str]:
    return sorted(_PRESETS)


def model_config(name: str, **overrides: Any) -> ViTConfig:
    """The preset ``name`` with ``overrides`` (any :class:`ViTConfig` field)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _PRESETS[name](**overrides)


@register_model("demo")
def demo(*, patch_size: int = 4, img_size: int = 32, in_chans: int = 1, **overrides: Any
         ) -> ViTConfig:
    """The demo model: a 4-block, 64-wide ViT on 32×32 images with 4×4 patches."""
    return vit_tiny(patch_size=patch_size, img_size=img_size, in_chans=in_chans,
                    **{"embed_dim": 64, "depth": 4, "num_heads": 4, **overrides})


register_model("vit_tiny")(vit_tiny)
register_model("vit_small")(vit_small)
register_model("vit_base")(vit_base)
