"""Privacy audit: what an honest-but-curious server can recover from a token shard.

``smsd audit`` runs :func:`audit_tokens` on a shard; the attacks and metrics are usable
on their own.
"""

from .attacks import reconstruct, unshuffle_known_head, unshuffle_known_positions
from .metrics import position_accuracy, psnr, ssim
from .report import AuditRow, audit_tokens, format_table

__all__ = [
    "AuditRow",
    "audit_tokens",
    "format_table",
    "position_accuracy",
    "psnr",
    "reconstruct",
    "ssim",
    "unshuffle_known_head",
    "unshuffle_known_positions",
]
