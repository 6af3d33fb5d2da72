"""smsd: kernel-accelerated single-round self-supervised distributed training of ViTs.

Masked sampling distillation ("MS-DINO"): clients upload permuted ViT tokens once,
the server trains the ViT body with DINO-style self-distillation on random token
subsets, and sends the body back once.

The subpackages below load on first access (``smsd.nn.DINOLoss`` after ``import smsd``,
as ``torch.nn`` after ``import torch``), so ``import smsd`` stays light: it does not pull
in Flower, DALI or matplotlib.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

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

# Loaded on first access (PEP 562); kept out of __all__ so `from smsd import *` stays light.
_LAZY_SUBMODULES = frozenset({
    "audit", "bench", "data", "experiments", "federation", "models", "nn", "protocol",
    "recipe", "sealing", "testing",
})

if TYPE_CHECKING:  # let type checkers and IDEs see the lazy subpackages
    from . import audit as audit
    from . import bench as bench
    from . import data as data
    from . import experiments as experiments
    from . import federation as federation
    from . import models as models
    from . import nn as nn
    from . import protocol as protocol
    from . import recipe as recipe
    from . import sealing as sealing
    from . import testing as testing


def __getattr__(name: str) -> ModuleType:
    if name not in _LAZY_SUBMODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        # import_module also binds the submodule on this package, so this runs once per name.
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise  # the submodule exists but one of its dependencies is missing: say which
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from exc


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES})
