"""Input validation switch for the ops.

Checks that need to read tensor values (index ranges, "is this a permutation")
synchronize with the device. They are on by default; turn them off in a hot
training loop with ``smsd.set_validation(False)``, the context manager
``smsd.validation(False)``, or the environment variable ``SMSD_VALIDATE=0``.
Shape, dtype and device checks cost nothing and always run.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

__all__ = ["set_validation", "validation", "validation_enabled"]

_global: bool | None = None
_scoped: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "smsd_validation", default=None
)


def _env_default() -> bool:
    return os.environ.get("SMSD_VALIDATE", "1").strip().lower() not in ("0", "false", "off", "no")


def validation_enabled() -> bool:
    """Whether value checks that synchronize with the device run."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    return _env_default() if _global is None else _global


def set_validation(enabled: bool) -> None:
    """Turn value checks on or off from now on."""
    global _global
    _global = bool(enabled)


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Turn value checks on or off inside a ``with`` block."""
    token = _scoped.set(bool(enabled))
    try:
        yield
    finally:
        _scoped.reset(token)
