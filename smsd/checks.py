"""Argument checks shared by the library's configs and functions (the ops have their own,
tensor-aware ones in :mod:`smsd.ops._checks`)."""

from __future__ import annotations

__all__ = ["non_negative_int", "positive_int", "positive_ints"]


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1 (not a bool); else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def positive_ints(obj: object, *names: str) -> None:
    """:func:`positive_int` on each named attribute of ``obj`` (a config's fields)."""
    for name in names:
        positive_int(name, getattr(obj, name))


def non_negative_int(name: str, value: object, note: str = "") -> int:
    """``value`` if it is an int >= 0 (not a bool); else ValueError naming ``name``
    (``note`` explains what 0 means, e.g. ``"0 = off"``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        extra = f" ({note})" if note else ""
        raise ValueError(f"{name} must be an int >= 0{extra}, got {value!r}")
    return value
