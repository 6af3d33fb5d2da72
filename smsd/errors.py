"""Errors smsd raises for bad input; the CLI prints them without a traceback."""

from __future__ import annotations


class SmsdError(Exception):
    """Base of smsd's own errors: the message says what is wrong and where."""


class KeyFileError(SmsdError, ValueError):
    """A permutation key file is missing, unreadable, malformed or too open."""
