"""smsd ops: each an autograd-aware function with ``triton``, ``cpp`` and ``torch`` backends.

``smsd.ops.reference`` holds the pure-PyTorch oracle of every op.
"""

from . import reference
from .attention import attention, attention_qkv
from .dino_loss import dino_loss
from .fused_linear_dino_loss import fused_linear_dino_loss
from .masked_sample import masked_sample
from .sample_views import sample_views, view_size

__all__ = [
    "attention",
    "attention_qkv",
    "dino_loss",
    "fused_linear_dino_loss",
    "masked_sample",
    "reference",
    "sample_views",
    "view_size",
]
