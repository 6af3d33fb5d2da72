"""Crash-safe file writes: a temporary file in the target folder, fsync, rename.

A reader sees either the old file or the complete new one, never half of it,
and a failure leaves the target untouched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "write_with"]


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, *, mode: int = 0o644, overwrite: bool = True
) -> Iterator[BinaryIO]:
    """Open a temporary file for binary writing; on success it replaces ``path``.

    ``mode`` is applied when the temporary file is created (so a 0o600 file is never
    readable by others, not even briefly). With ``overwrite=False`` an existing
    ``path`` raises :class:`FileExistsError` and is left alone.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {target}: folder {folder} does not exist")
    if not overwrite and target.exists():
        raise FileExistsError(f"{target} already exists; refusing to overwrite it")
    tmp = folder / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails if target appeared meanwhile
            os.unlink(tmp)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes, *, mode: int = 0o644, overwrite: bool = True
) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, mode=mode, overwrite=overwrite) as handle:
        handle.write(data)


def write_with(
    path: str | os.PathLike, writer: Callable[[Path], None], *, mode: int = 0o644
) -> None:
    """Atomically produce ``path`` with a library writer that takes a file name
    (``safetensors.torch.save_file``, ``matplotlib``'s ``savefig``...)."""
    target = Path(path)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp{target.suffix}"
    try:
        writer(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
