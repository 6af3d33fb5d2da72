"""Token shards: what a client uploads. safetensors with one ``tokens`` tensor.

A shard holds fp16 tokens ``[n, N, D]`` (head output + position embedding, each
image's tokens in a secret order) and public metadata: format, version, head
fingerprint, grid, dtype and count. Never the key, labels, file names or image ids.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SmsdError
from ..io import write_with
from ..safe_files import (
    FLOAT_DTYPES,
    SafetensorsHeader,
    check_fingerprint,
    check_metadata,
    read_header,
    read_tensors,
)

__all__ = ["SHARD_FORMAT", "SHARD_VERSION", "ShardError", "ShardInfo", "read_shard", "write_shard"]

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
                grid: int) -> Path:
    """Write ``tokens`` ``[n, grid*grid, D]`` as an fp16 shard, atomically."""
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


def _read_header(path: str | os.PathLike) -> SafetensorsHeader:
    # All dtypes are parsed so that a float32 shard is named as such, not as garbage.
    return read_header(path, "shard", error=ShardError, dtypes=FLOAT_DTYPES)


def inspect_shard(path: str | os.PathLike, *, head_fingerprint: str | None = None,
                  grid: int | None = None, embed_dim: int | None = None) -> ShardInfo:
    """Check a shard's header and metadata against the expected model (reads no tokens)."""
    return _check(_read_header(path), head_fingerprint, grid, embed_dim)


def read_shard(path: str | os.PathLike, *, head_fingerprint: str | None = None,
               grid: int | None = None, embed_dim: int | None = None) -> torch.Tensor:
    """Validate and load a shard's tokens (fp16 ``[n, N, D]``); all values must be finite."""
    header = _read_header(path)
    _check(header, head_fingerprint, grid, embed_dim)
    return read_tensors(header)["tokens"]
