"""Privacy audit: what an honest-but-curious server can recover from a client's upload.

``smsd audit`` runs :func:`run_audit` (every defence against every attack, with the
reference levels, ε of the noise rows, a table, JSON and a figure) or
:func:`audit_shard` (an existing shard). Each attack is a function
``attack(tokens, knowledge) -> Attempt`` in its own module (``smsd.audit.prior``,
``.blind``, ``.jigsaw``, ``.inverse_net``; the known-head ones in ``.attacks``), usable on
its own; :data:`~smsd.audit.catalog.ATTACKS` lists them.
"""

from .attacks import reconstruct, unshuffle_known_head, unshuffle_known_positions
from .budget import gaussian_epsilon, noise_budget
from .collusion import estimate_head
from .defences import DEFAULT_DEFENCES, Defence, simulate_upload
from .inverse_net import InverseNetConfig
from .knowledge import Attempt, Knowledge
from .metrics import position_accuracy, psnr, ssim
from .plan import AuditPlan
from .report import AuditReport, AuditRow, format_table
from .run import audit_shard
from .suite import run_audit

__all__ = [
    "DEFAULT_DEFENCES",
    "Attempt",
    "AuditPlan",
    "AuditReport",
    "AuditRow",
    "Defence",
    "InverseNetConfig",
    "Knowledge",
    "audit_shard",
    "estimate_head",
    "format_table",
    "gaussian_epsilon",
    "noise_budget",
    "position_accuracy",
    "psnr",
    "reconstruct",
    "run_audit",
    "simulate_upload",
    "ssim",
    "unshuffle_known_head",
    "unshuffle_known_positions",
]
