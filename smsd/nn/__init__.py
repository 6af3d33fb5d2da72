"""smsd.nn: modules built on the smsd ops."""

from .attention import Attention

__all__ = ["Attention"]
