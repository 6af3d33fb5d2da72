"""Sealed safetensors files: shards and bodies, sealed and opened without a clear copy on disk.

The sealed content is the exact bytes of the safetensors file (so an unsealed file is
one that ``safetensors`` itself reads), streamed into the sealer tensor by tensor; its
public header repeats the file's metadata and tensor shapes (authenticated), so a
server can check a shard's head fingerprint and shape before it holds the key. Opening
verifies every chunk, then checks that the content's own header says exactly what the
public header said.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..errors import SmsdError
from ..io import atomic_write
from ..safe_files import MemoryFile, SafetensorsHeader
from .keys import RecipientPrivateKey, RecipientPublicKey
from .stream import (
    DEFAULT_CHUNK_BYTES,
    SealedFileError,
    SealWriter,
    is_sealed,
    read_sealed_header,
    unseal_chunks,
    unseal_into,
)

__all__ = ["open_maybe_sealed", "open_sealed", "public_description", "seal_file",
           "seal_tensors"]

log = logging.getLogger("smsd.sealing")

_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def public_description(metadata: Mapping[str, str],
                       tensors: Mapping[str, tuple[str, Sequence[int]]]) -> dict:
    """What a sealed safetensors file shows without its key: the metadata and each
    tensor's dtype and shape."""
    return {"metadata": dict(metadata),
            "tensors": {name: {"dtype": dtype, "shape": list(shape)}
                        for name, (dtype, shape) in tensors.items()}}


def _safetensors_prefix(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                        ) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding ``tensors`` in
    order, padded with spaces to 8 bytes as ``safetensors`` pads it."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor in tensors.items():
        n = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def seal_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str], recipients: Sequence[RecipientPublicKey], *,
                 aead: str = "aes-256-gcm", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 overwrite: bool = True) -> Path:
    """Write ``tensors`` as a sealed safetensors file, atomically; the clear bytes
    exist only in memory, one chunk at a time beyond the tensors themselves."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    prefix = _safetensors_prefix(tensors, metadata)
    size = len(prefix) + sum(t.numel() * t.element_size() for t in tensors.values())
    public = public_description(metadata, {n: (_DTYPE_NAMES[t.dtype], t.shape)
                                           for n, t in tensors.items()})
    with atomic_write(path, overwrite=overwrite) as handle:
        writer = SealWriter(handle, recipients, plaintext_bytes=size,
                            content=str(metadata.get("format", "safetensors")), public=public,
                            aead=aead, chunk_bytes=chunk_bytes)
        writer.write(prefix)
        for tensor in tensors.values():
            writer.write(_tensor_bytes(tensor))
        writer.close()
    return Path(path)


def seal_file(source: str | os.PathLike, path: str | os.PathLike,
              recipients: Sequence[RecipientPublicKey], *,
              read_header: Callable[[Path], SafetensorsHeader],
              aead: str = "aes-256-gcm", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
              overwrite: bool = False) -> Path:
    """Seal an existing safetensors file, streamed (memory: one chunk), after
    ``read_header`` checked it (e.g. :func:`smsd.protocol.shard.inspect_shard`'s reader)."""
    source = Path(source)
    header = read_header(source)
    public = public_description(header.metadata, {s.name: (s.dtype, s.shape)
                                                  for s in header.tensors.values()})
    with open(source, "rb") as src, atomic_write(path, overwrite=overwrite) as handle:
        if os.fstat(src.fileno()).st_size != header.file_size:
            raise header.fail("changed while it was being sealed")
        writer = SealWriter(handle, recipients, plaintext_bytes=header.file_size,
                            content=header.metadata.get("format", "safetensors"),
                            public=public, aead=aead, chunk_bytes=chunk_bytes)
        buffer = bytearray(chunk_bytes)
        while n := src.readinto(buffer):
            writer.write(memoryview(buffer)[:n])
        writer.close()
    return Path(path)


def open_sealed(path: str | os.PathLike, key: RecipientPrivateKey, *, what: str,
                error: type[SmsdError], content: str) -> tuple[MemoryFile, dict]:
    """Verify and decrypt a sealed safetensors file into memory.

    Returns the clear file (for :func:`smsd.safe_files.read_header`) and the public
    description it was sealed with; the caller's header check must agree with it
    (:func:`check_public`). Errors are ``error`` naming the file as ``what``.
    """
    try:
        header = read_sealed_header(path)
        if header.content != content:
            raise header.fail(f"holds a {header.content!r}, expected a {content!r}")
        data = unseal_into(header, key)
    except SealedFileError as exc:
        raise error(f"sealed {what} {exc.path} {exc.problem}") from None
    return MemoryFile(Path(path), data), header.public


def check_public(header: SafetensorsHeader, public: dict) -> None:
    """The clear content's header must say exactly what the sealed file's public header
    said (a sealer that lied in public would otherwise mislead the server's checks)."""
    inner = public_description(header.metadata, {s.name: (s.dtype, s.shape)
                                                 for s in header.tensors.values()})
    if inner != public:
        raise header.fail("holds sealed content whose header differs from its public header")


def open_maybe_sealed(path: str | os.PathLike, key: RecipientPrivateKey | None, *,
                      what: str, error: type[SmsdError], content: str,
                      ) -> tuple[Path | MemoryFile, dict | None]:
    """A file to read as it is, or its sealed content opened with ``key``.

    A sealed file without a key is refused (naming the flag); a clear file read while
    a key was given is read, and named as unsealed in the log.
    """
    path = Path(path)
    if is_sealed(path):
        if key is None:
            raise error(f"{what} {path} is sealed: give the private key it is sealed to "
                        "(--unseal-key)")
        return open_sealed(path, key, what=what, error=error, content=content)
    if key is not None:
        log.warning("%s %s is NOT sealed: anyone who could read the file could read it",
                    what, path)
    return path, None


def unseal_file_chunks(path: str | os.PathLike, key: RecipientPrivateKey):
    """Iterate over a sealed file's verified clear chunks (see
    :func:`smsd.sealing.stream.unseal_chunks`), for streaming benchmarks and tools."""
    return unseal_chunks(read_sealed_header(path), key)
