"""Drop-in ``torch.nn`` modules built on :mod:`smsd.ops`."""

from .attention import Attention
from .dino_loss import DINOLoss

__all__ = ["Attention", "DINOLoss"]
