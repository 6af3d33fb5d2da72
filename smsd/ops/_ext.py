"""Access to the compiled C++ extension ``smsd._C``."""

from __future__ import annotations

import importlib
from types import ModuleType


def extension() -> ModuleType:
    """The ``smsd._C`` module (dispatch has already checked that it imports)."""
    return importlib.import_module("smsd._C")
