"""Drop-in ``torch.nn`` modules built on :mod:`smsd.ops`."""

from .dino_loss import DINOLoss

__all__ = ["DINOLoss"]
