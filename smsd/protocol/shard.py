"""Token shards: what a client uploads. safetensors with one ``tokens`` tensor.

A shard holds fp16 tokens ``[n, N, D]`` (head output + position embedding, each
image's tokens in a secret order) and public metadata: format, version, head
fingerprint, grid, dtype and count. Never the key, labels, file names or image ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SmsdError
from ..io import write_with

__all__ = ["SHARD_FORMAT", "SHARD_VERSION", "ShardError", "ShardInfo", "read_shard", "write_shard"]

SHARD_FORMAT = "smsd-token-shard"
SHARD_VERSION = 1
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


def _header(path: Path) -> dict:
    """The safetensors JSON header, parsed without loading the tensors."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise ShardError(f"shard {path} is truncated (no safetensors header)")
            size = int.from_bytes(raw, "little")
            if size > 100_000_000:
                raise ShardError(f"shard {path} is not a safetensors file (header size {size})")
            header = json.loads(handle.read(size))
    except FileNotFoundError:
        raise ShardError(f"shard {path} does not exist") from None
    except IsADirectoryError:
        raise ShardError(f"shard {path} is a folder, not a shard file") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ShardError(f"shard {path} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ShardError(f"shard {path} is not a safetensors file (bad header)")
    return header


def inspect_shard(path: str | os.PathLike, *, head_fingerprint: str | None = None,
                  grid: int | None = None, embed_dim: int | None = None) -> ShardInfo:
    """Check a shard's metadata and tensor header against the expected model (cheap)."""
    path = Path(path)
    header = _header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != SHARD_FORMAT:
        raise ShardError(f"shard {path} is not a smsd token shard (format {meta.get('format')!r})")
    if meta.get("version") != str(SHARD_VERSION):
        raise ShardError(f"shard {path} has version {meta.get('version')!r}; "
                         f"this smsd reads version {SHARD_VERSION}")
    if set(meta) != _METADATA_KEYS:
        raise ShardError(f"shard {path} has unexpected metadata fields "
                         f"{sorted(set(meta) ^ _METADATA_KEYS)}")
    if head_fingerprint is not None and meta["head_fingerprint"] != head_fingerprint:
        raise ShardError(
            f"shard {path} was encoded with a different head (fingerprint "
            f"{meta['head_fingerprint'][:16]}…, expected {head_fingerprint[:16]}…): "
            "the client used another model config or checkpoint"
        )
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(tensors) != {"tokens"}:
        raise ShardError(f"shard {path} must hold exactly one tensor 'tokens', "
                         f"has {sorted(tensors)}")
    spec = tensors["tokens"]
    try:
        g, d, count = int(meta["grid"]), int(meta["embed_dim"]), int(meta["count"])
    except ValueError:
        raise ShardError(f"shard {path} has malformed grid/embed_dim/count metadata") from None
    if spec.get("dtype") != "F16" or meta["dtype"] != "float16":
        raise ShardError(f"shard {path}: tokens must be float16, header says {spec.get('dtype')}")
    if spec.get("shape") != [count, g * g, d] or count < 1:
        raise ShardError(f"shard {path}: tokens have shape {spec.get('shape')}, metadata says "
                         f"[{count}, {g * g}, {d}]")
    if grid is not None and g != grid:
        raise ShardError(f"shard {path} has a {g}×{g} grid, the model has {grid}×{grid}")
    if embed_dim is not None and d != embed_dim:
        raise ShardError(f"shard {path} has embed_dim {d}, the model has {embed_dim}")
    return ShardInfo(path, meta["head_fingerprint"], g, d, count)


def read_shard(path: str | os.PathLike, *, head_fingerprint: str | None = None,
               grid: int | None = None, embed_dim: int | None = None) -> torch.Tensor:
    """Validate and load a shard's tokens (fp16 ``[n, N, D]``); all values must be finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = inspect_shard(path, head_fingerprint=head_fingerprint, grid=grid, embed_dim=embed_dim)
    try:
        tokens = load_file(str(info.path))["tokens"]
    except (SafetensorError, OSError) as exc:
        raise ShardError(f"shard {info.path} cannot be read: {exc}") from None
    if not torch.isfinite(tokens).all():
        bad = int((~torch.isfinite(tokens)).sum())
        raise ShardError(f"shard {info.path} holds {bad} non-finite token values")
    return tokens
