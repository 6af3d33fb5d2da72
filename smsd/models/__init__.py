"""Vision Transformer split for the single-round protocol: client head, server body, tails."""

from .config import ViTConfig, vit_base, vit_small, vit_tiny
from .heads import DINOHead
from .presets import list_models, model_config, register_model
from .pretrained import load_pretrained
from .vit import Block, ClassifierTail, PatchHead, SplitViT, ViTBody, head_fingerprint

__all__ = [
    "Block",
    "ClassifierTail",
    "DINOHead",
    "PatchHead",
    "SplitViT",
    "ViTBody",
    "ViTConfig",
    "head_fingerprint",
    "list_models",
    "load_pretrained",
    "model_config",
    "register_model",
    "vit_base",
    "vit_small",
    "vit_tiny",
]
