"""Files as Flower records: a safetensors file's bytes split into ``uint8`` Arrays.

Nothing is pickled: each chunk is an :class:`flwr.app.Array` holding raw bytes, and a
:class:`flwr.app.ConfigRecord` beside it carries the kind, size, chunk count and
SHA-256, all checked on receipt before the bytes reach the project's file readers.

Why chunk: Flower's gRPC servers cap one message at ``GRPC_MAX_MESSAGE_LENGTH``
(2 GiB − 1 in flwr 1.42) and protobuf cannot serialize an object above 2 GiB. flwr
1.42 already pushes every Array as separate 5 MB ``ArrayChunk`` objects
(``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``), one object per request, so there the cap binds
per object, not per message; splitting files ourselves (``chunk_bytes``, 256 MiB by
default) keeps multi-GB shards within every cap without relying on that internal
behaviour, and bounds the size of any single Array.
"""

from __future__ import annotations

import hashlib

from ..checks import positive_int
from ..errors import SmsdError

__all__ = ["DEFAULT_CHUNK_BYTES", "TransferError", "message_bytes", "pack_file", "unpack_file"]

DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024
_STYPE = "smsd.raw-bytes"
_CHUNK_KEY = "chunk-{:05d}"


class TransferError(SmsdError, ValueError):
    """A file received through Flower is incomplete, corrupted, or of the wrong kind."""


def pack_file(data: bytes, kind: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """``data`` → ``(ArrayRecord of chunks, ConfigRecord describing them)``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    positive_int("chunk_bytes", chunk_bytes)
    if not isinstance(data, bytes) or not data:
        raise ValueError("data must be non-empty bytes")
    view = memoryview(data)
    chunks = {}
    for index, start in enumerate(range(0, len(data), chunk_bytes)):
        piece = bytes(view[start:start + chunk_bytes])
        chunks[_CHUNK_KEY.format(index)] = Array(dtype="uint8", shape=(len(piece),),
                                                  stype=_STYPE, data=piece)
    meta = ConfigRecord({"kind": kind, "size": len(data), "chunks": len(chunks),
                         "sha256": hashlib.sha256(data).hexdigest()})
    return ArrayRecord(chunks), meta


def unpack_file(chunks, meta, kind: str, source: str) -> bytes:
    """Reassemble and verify a file packed by :func:`pack_file`; ``source`` names the
    sender in errors."""
    from flwr.app import ArrayRecord, ConfigRecord

    if not isinstance(chunks, ArrayRecord) or not isinstance(meta, ConfigRecord):
        raise TransferError(f"{source} sent no {kind} (missing chunk or metadata record)")
    if meta.get("kind") != kind:
        raise TransferError(f"{source} sent a {meta.get('kind')!r}, expected a {kind!r}")
    count, size = meta.get("chunks"), meta.get("size")
    if not isinstance(count, int) or not isinstance(size, int) or count < 1 or size < 1:
        raise TransferError(f"{source}: malformed {kind} metadata (chunks={count!r}, "
                            f"size={size!r})")
    expected = [_CHUNK_KEY.format(i) for i in range(count)]
    if sorted(chunks.keys()) != expected:
        raise TransferError(f"{source}: {kind} has chunks {sorted(chunks.keys())[:4]}…, "
                            f"expected {count} named {expected[0]}…")
    parts = []
    for key in expected:
        array = chunks[key]
        if array.stype != _STYPE or array.dtype != "uint8" or \
                list(array.shape) != [len(array.data)]:
            raise TransferError(f"{source}: {kind} chunk {key} is not a raw byte array")
        parts.append(array.data)
    data = b"".join(parts)
    if len(data) != size:
        raise TransferError(f"{source}: {kind} has {len(data)} bytes, metadata says {size}")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise TransferError(f"{source}: {kind} fails its SHA-256 check (corrupted in transit)")
    return data


def message_bytes(obj) -> int:
    """Bytes Flower stores and ships for a Message or RecordDict: the serialized size
    of every distinct object in its tree (what the SuperLink's object store holds)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())
