"""Neural-network modules of smsd (interim: replaced at merge by the attention/loss branches)."""

from .attention import Attention
from .dino_loss import DINOLoss

__all__ = ["Attention", "DINOLoss"]
