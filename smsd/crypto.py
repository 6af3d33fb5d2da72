"""The client's secret: a 256-bit key from which every image's token permutation derives.

A permutation of ``n`` tokens is the stable argsort of ``n`` 64-bit values drawn from
HMAC-SHA256(key, domain || n || image id || counter) (a keyed PRF in counter mode).
So the permutation space is limited by the 256-bit key, not by a 64-bit RNG seed,
and a client can recompute any image's permutation from its id without storing it.
The key never appears in ``repr``, logs or error messages.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .checks import positive_int
from .errors import KeyFileError
from .io import atomic_write_bytes
from .secret_files import read_secret_file

__all__ = ["PermutationKey", "invert"]

KEY_BYTES = 32
KEY_FORMAT = "smsd-permutation-key"
KEY_VERSION = 1
_MAX_KEY_FILE_BYTES = 4096
_DOMAIN = b"smsd/token-permutation/v1"

ImageId = int | str | bytes


def _encode_id(image_id: ImageId) -> bytes:
    """Unambiguous bytes for an image id (type tag + length prefix)."""
    if isinstance(image_id, (bool, np.bool_)):
        raise TypeError("image ids must be int, str or bytes, not bool")
    if isinstance(image_id, (int, np.integer)):
        value = int(image_id)
        if value < 0:
            raise ValueError(f"integer image ids must be >= 0, got {value}")
        raw, tag = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"), b"i"
    elif isinstance(image_id, str):
        raw, tag = image_id.encode("utf-8"), b"s"
    elif isinstance(image_id, bytes):
        raw, tag = image_id, b"b"
    else:
        raise TypeError(f"image ids must be int, str or bytes, got {type(image_id).__name__}")
    return tag + len(raw).to_bytes(8, "big") + raw


class PermutationKey:
    """A client's secret permutation key. Create with :meth:`generate` or :meth:`load`."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != KEY_BYTES:
            raise ValueError(f"a permutation key is exactly {KEY_BYTES} bytes")
        self._secret = secret

    @classmethod
    def generate(cls) -> PermutationKey:
        """A fresh key from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def derive(cls, label: str) -> PermutationKey:
        """A reproducible key: SHA-256 of ``label``. Anyone who knows the label has the
        key, so it protects nothing; it is for simulations and tests, where every run
        must draw the same permutations (``smsd simulate`` derives
        ``"smsd/simulate/{seed}/{client}"``). Real clients use :meth:`generate`."""
        if not isinstance(label, str) or not label:
            raise ValueError("label must be a non-empty str")
        return cls(hashlib.sha256(label.encode()).digest())

    @property
    def fingerprint(self) -> str:
        """A short public identifier of the key (a hash; reveals nothing usable)."""
        return hashlib.sha256(b"smsd/key-fingerprint/v1" + self._secret).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"PermutationKey(fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PermutationKey):
            return NotImplemented
        return hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self):
        raise TypeError("PermutationKey cannot be pickled; save it with .save(path)")

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the key to ``path`` atomically, readable by its owner only (mode 0600)."""
        payload = {"format": KEY_FORMAT, "version": KEY_VERSION, "key": self._secret.hex()}
        data = (json.dumps(payload) + "\n").encode("ascii")
        atomic_write_bytes(path, data, mode=0o600, overwrite=overwrite)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PermutationKey:
        """Read and validate a key file written by :meth:`save`.

        Refuses files that other users can read or write (``chmod 600 FILE``).
        """
        path = Path(path)
        raw = read_secret_file(path, "key file", error=KeyFileError,
                               max_bytes=_MAX_KEY_FILE_BYTES)
        try:
            payload = json.loads(raw.decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise KeyFileError(f"key file {path} is not a smsd key file (not JSON)") from None
        if not isinstance(payload, dict) or payload.get("format") != KEY_FORMAT:
            raise KeyFileError(f"key file {path} is not a smsd key file (format field)")
        if payload.get("version") != KEY_VERSION:
            raise KeyFileError(
                f"key file {path} has version {payload.get('version')!r}; "
                f"this smsd reads version {KEY_VERSION}"
            )
        hex_key = payload.get("key")
        try:
            secret = bytes.fromhex(hex_key) if isinstance(hex_key, str) else b""
        except ValueError:
            secret = b""
        if len(secret) != KEY_BYTES:
            raise KeyFileError(
                f"key file {path} holds a malformed key (expected {KEY_BYTES} bytes)"
            )
        return cls(secret)

    # ------------------------------------------------------------ permutations
    def _permutation(self, image_id: ImageId, n_tokens: int) -> np.ndarray:
        prefix = _DOMAIN + n_tokens.to_bytes(8, "big") + _encode_id(image_id)
        n_blocks = -(-8 * n_tokens // 32)
        stream = b"".join(
            hmac.digest(self._secret, prefix + i.to_bytes(8, "big"), "sha256")
            for i in range(n_blocks)
        )
        keys = np.frombuffer(stream, dtype=">u8", count=n_tokens)
        # Ties between 64-bit values have probability < n^2 / 2^65; stable sort breaks them.
        return np.argsort(keys, kind="stable")

    def permutations(
        self,
        image_ids: Iterable[ImageId] | torch.Tensor,
        n_tokens: int,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """One secret permutation of ``range(n_tokens)`` per image id: int64 ``[len(ids), n]``.

        Same key and id give the same permutation; different ids give independent ones.
        Ids are ints (>= 0), strings or bytes; ``1`` and ``"1"`` are different ids.
        """
        positive_int("n_tokens", n_tokens)
        if isinstance(image_ids, torch.Tensor):
            if image_ids.dtype.is_floating_point or image_ids.dim() != 1:
                raise ValueError("image_ids as a tensor must be 1-D integers")
            image_ids = image_ids.tolist()
        if isinstance(image_ids, (str, bytes)):
            raise TypeError("image_ids must be a sequence of ids, not a single str/bytes")
        rows = [self._permutation(i, n_tokens) for i in image_ids]
        out = np.stack(rows) if rows else np.empty((0, n_tokens), dtype=np.int64)
        return torch.from_numpy(out.astype(np.int64, copy=False)).to(device)


def invert(perm: torch.Tensor) -> torch.Tensor:
    """Inverse permutation along the last dimension: ``invert(p)[..., p[..., i]] == i``."""
    if not isinstance(perm, torch.Tensor) or perm.dtype not in (torch.int32, torch.int64):
        raise TypeError("perm must be an int32/int64 torch.Tensor")
    if perm.dim() == 0:
        raise ValueError("perm must have at least one dimension")
    positions = torch.arange(perm.shape[-1], device=perm.device, dtype=perm.dtype)
    return torch.empty_like(perm).scatter_(-1, perm.long(), positions.expand_as(perm).clone())
