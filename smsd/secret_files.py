"""Reading files that hold secrets (permutation keys, recipient private keys).

A secret file must be a regular file that only its owner can read or write: a file
that other users can open is refused, with the ``chmod`` that fixes it, because the
secret may already have been copied.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import SmsdError

__all__ = ["read_secret_file"]


def read_secret_file(path: str | os.PathLike, what: str, *, error: type[SmsdError],
                     max_bytes: int = 4096) -> bytes:
    """The bytes of secret file ``path`` (``what`` names it in errors, raised as
    ``error``): it must exist, be a regular file of at most ``max_bytes`` and, on POSIX,
    have no group or other permission bits."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path} is not a regular file")
    if os.name == "posix" and info.st_mode & 0o077:
        raise error(f"{what} {path} is accessible by other users "
                    f"(mode {stat.S_IMODE(info.st_mode):o}); run: chmod 600 {path}")
    if info.st_size > max_bytes:
        raise error(f"{what} {path} is {info.st_size} bytes, not a {what}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise error(f"{what} {path} cannot be read: {exc.strerror}") from None
