"""smsd: kernel-accelerated single-round self-supervised distributed training of ViTs.

Masked sampling distillation ("MS-DINO"): clients upload permuted ViT tokens once,
the server trains the ViT body with DINO-style self-distillation on random token
subsets, and sends the body back once.
"""

from . import ops
from .backend import (
    BackendUnavailableError,
    backends,
    get_backend,
    set_backend,
    use_backend,
)
from .crypto import PermutationKey
from .errors import SmsdError
from .validation import set_validation, validation, validation_enabled

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "PermutationKey",
    "SmsdError",
    "__version__",
    "backends",
    "get_backend",
    "ops",
    "set_backend",
    "set_validation",
    "use_backend",
    "validation",
    "validation_enabled",
]
