"""Vision Transformer split for the single-round protocol: client head, server body, tails."""

from .config import ViTConfig, vit_base, vit_small, vit_tiny
from .heads import DINOHead
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
    "load_pretrained",
    "vit_base",
    "vit_small",
    "vit_tiny",
]
