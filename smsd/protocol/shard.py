"""Token shards: what a client uploads. safetensors with one ``tokens`` tensor.

A shard holds fp16 tokens ``[n, N, D]`` (head output + position embedding, each
image's tokens in a secret order) and public metadata: format, version, head
fingerprint, grid, dtype and count. Never the key, labels, file names or image ids.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SmsdError
from ..io import write_with
from ..safe_files import (
    FLOAT_DTYPES,
    MemoryFile,
    SafetensorsHeader,
    TensorSpec,
    check_fingerprint,
    check_metadata,
    read_header,
    read_tensors,
)
from ..sealing.files import check_public, open_maybe_sealed, seal_tensors
from ..sealing.keys import RecipientPrivateKey, RecipientPublicKey
from ..sealing.stream import SealedFileError, is_sealed, read_sealed_header

__all__ = ["SHARD_FORMAT", "SHARD_VERSION", "ShardError", "ShardInfo", "count_images",
           "inspect_shard", "read_shard", "shard_digest", "write_shard"]

SHARD_FORMAT = "smsd-token-shard"
SHARD_VERSION = 1
_POSITIVE_INT = re.compile(r"[1-9][0-9]{0,9}")
_METADATA_KEYS = {"format", "version", "head_fingerprint", "grid", "embed_dim", "dtype", "count"}


class ShardError(SmsdError, ValueError):
    """A token shard is missing, malformed, or does not match the model."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    head_fingerprint: str
    grid: int
    embed_dim: int
    count: int


def write_shard(path: str | os.PathLike, tokens: torch.Tensor, *, head_fingerprint: str,
                grid: int, seal_to: Sequence[RecipientPublicKey] = ()) -> Path:
    """Write ``tokens`` ``[n, grid*grid, D]`` as an fp16 shard, atomically; with
    ``seal_to``, sealed to those recipients (:mod:`smsd.sealing`), never in the clear."""
    from safetensors.torch import save_file

    if tokens.dim() != 3 or tokens.shape[1] != grid * grid or tokens.shape[0] < 1:
        raise ValueError(f"tokens must have shape [n>=1, {grid * grid}, D], "
                         f"got {list(tokens.shape)}")
    tokens = tokens.detach().to("cpu", torch.float16).contiguous()
    if not torch.isfinite(tokens).all():
        raise ValueError("tokens overflow fp16 or are not finite; refusing to write the shard")
    metadata = {
        "format": SHARD_FORMAT, "version": str(SHARD_VERSION),
        "head_fingerprint": head_fingerprint, "grid": str(grid),
        "embed_dim": str(tokens.shape[2]), "dtype": "float16", "count": str(tokens.shape[0]),
    }
    path = Path(path)
    if seal_to:
        return seal_tensors(path, {"tokens": tokens}, metadata, seal_to)
    write_with(path, lambda tmp: save_file({"tokens": tokens}, str(tmp), metadata=metadata))
    return path


def _check(header: SafetensorsHeader, head_fingerprint: str | None, grid: int | None,
           embed_dim: int | None) -> ShardInfo:
    path = header.path
    meta = check_metadata(header, format=SHARD_FORMAT, version=str(SHARD_VERSION),
                          fields=_METADATA_KEYS, kind="smsd token shard")
    check_fingerprint(header, meta["head_fingerprint"])
    if head_fingerprint is not None and meta["head_fingerprint"] != head_fingerprint:
        raise ShardError(
            f"shard {path} was encoded with a different head (fingerprint "
            f"{meta['head_fingerprint'][:16]}…, expected {head_fingerprint[:16]}…): "
            "the client used another model config or checkpoint"
        )
    if set(header.tensors) != {"tokens"}:
        raise ShardError(f"shard {path} must hold exactly one tensor 'tokens', "
                         f"has {sorted(header.tensors)}")
    spec = header.tensors["tokens"]
    if not all(_POSITIVE_INT.fullmatch(meta[k]) for k in ("grid", "embed_dim", "count")):
        raise ShardError(f"shard {path} has malformed grid/embed_dim/count metadata "
                         "(positive integers, written plainly)")
    g, d, count = int(meta["grid"]), int(meta["embed_dim"]), int(meta["count"])
    if spec.dtype != "F16" or meta["dtype"] != "float16":
        raise ShardError(f"shard {path}: tokens must be float16, header says {spec.dtype}")
    if spec.shape != (count, g * g, d):
        raise ShardError(f"shard {path}: tokens have shape {list(spec.shape)}, metadata says "
                         f"[{count}, {g * g}, {d}]")
    if grid is not None and g != grid:
        raise ShardError(f"shard {path} has a {g}×{g} grid, the model has {grid}×{grid}")
    if embed_dim is not None and d != embed_dim:
        raise ShardError(f"shard {path} has embed_dim {d}, the model has {embed_dim}")
    return ShardInfo(path, meta["head_fingerprint"], g, d, count)


def _read_header(path: str | os.PathLike | MemoryFile) -> SafetensorsHeader:
    # All dtypes are parsed so that a float32 shard is named as such, not as garbage.
    return read_header(path, "shard", error=ShardError, dtypes=FLOAT_DTYPES)


def _public_header(path: Path) -> SafetensorsHeader:
    """A sealed shard's public header, in the form of a safetensors header (no data)."""
    try:
        public = read_sealed_header(path).public
    except SealedFileError as exc:
        raise ShardError(f"sealed shard {exc.path} {exc.problem}") from None
    try:
        specs = {name: TensorSpec(name, t["dtype"], tuple(t["shape"]), 0, 0)
                 for name, t in public["tensors"].items()}
        metadata = public["metadata"]
        if not all(isinstance(v, str) for v in metadata.values()):
            raise TypeError
    except (KeyError, TypeError, AttributeError):
        raise ShardError(f"shard {path} has a malformed public header") from None
    return SafetensorsHeader(path, "shard", ShardError, metadata, specs, 0, 0)


def inspect_shard(path: str | os.PathLike, *, head_fingerprint: str | None = None,
                  grid: int | None = None, embed_dim: int | None = None) -> ShardInfo:
    """Check a shard's header and metadata against the expected model (reads no tokens;
    for a sealed shard its public header, which :func:`read_shard` authenticates)."""
    path = Path(path)
    header = _public_header(path) if is_sealed(path) else _read_header(path)
    return _check(header, head_fingerprint, grid, embed_dim)


def count_images(paths: Sequence[str | os.PathLike]) -> int:
    """How many images the shards hold together (their headers only)."""
    return sum(inspect_shard(path).count for path in paths)


def shard_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the shard file as stored (header and data, sealed or not), streamed:
    what a checkpoint records to know a resume is given the same data."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_shard(path: str | os.PathLike, *, head_fingerprint: str | None = None,
               grid: int | None = None, embed_dim: int | None = None,
               key: RecipientPrivateKey | None = None) -> torch.Tensor:
    """Validate and load a shard's tokens (fp16 ``[n, N, D]``); all values must be finite.

    A sealed shard needs the private ``key`` it was sealed to; it is verified and
    decrypted in memory (see :mod:`smsd.sealing`).
    """
    source, public = open_maybe_sealed(path, key, what="shard", error=ShardError,
                                       content=SHARD_FORMAT)
    header = _read_header(source)
    if public is not None:
        check_public(header, public)
    _check(header, head_fingerprint, grid, embed_dim)
    return read_tensors(header)["tokens"]
