"""Recipient key pairs: X25519 keys that sealed files are addressed to.

``smsd keygen --recipient NAME`` writes ``NAME.pub`` (public: hand it to whoever seals
to you) and ``NAME.key`` (secret, mode 0600; a key file other users can open is
refused). The server has one pair (clients seal shards to it); each client has one
(the server seals the returned body to it). The keys are X25519 keys of the
``cryptography`` package; the files are small JSON documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from ..errors import SmsdError
from ..io import atomic_write_bytes
from ..secret_files import read_secret_file

__all__ = ["PRIVATE_KEY_FORMAT", "PUBLIC_KEY_FORMAT", "RecipientKeyError",
           "RecipientPrivateKey", "RecipientPublicKey", "generate_recipient"]

PUBLIC_KEY_FORMAT = "smsd-recipient-public-key"
PRIVATE_KEY_FORMAT = "smsd-recipient-private-key"
KEY_VERSION = 1
_RAW = serialization.Encoding.Raw
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_FILE_BYTES = 4096


class RecipientKeyError(SmsdError, ValueError):
    """A recipient key file is missing, malformed, too open, or of the wrong kind."""


def _fingerprint(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a recipient name is 1-64 letters, digits, '.', '_' or '-' "
                         f"(starting with a letter or digit), got {name!r}")
    return name


def _parse(raw: bytes, path: Path, what: str, fmt: str) -> tuple[str, bytes]:
    """``(name, 32 key bytes)`` of a key file's JSON."""
    try:
        payload = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RecipientKeyError(f"{what} {path} is not a smsd recipient key (not JSON)") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        other = payload.get("format") if isinstance(payload, dict) else None
        raise RecipientKeyError(f"{what} {path} is not a {fmt} file (format {other!r})")
    if payload.get("version") != KEY_VERSION:
        raise RecipientKeyError(f"{what} {path} has version {payload.get('version')!r}; "
                                f"this smsd reads version {KEY_VERSION}")
    if set(payload) != {"format", "version", "name", "x25519"}:
        raise RecipientKeyError(f"{what} {path} has unexpected or missing fields")
    name, hex_key = payload["name"], payload["x25519"]
    try:
        key = bytes.fromhex(hex_key) if isinstance(hex_key, str) else b""
        _check_name(name)
    except (ValueError, TypeError):
        key = b""
    if len(key) != 32:
        raise RecipientKeyError(f"{what} {path} holds a malformed key or name")
    return name, key


def _dump(fmt: str, name: str, key: bytes) -> bytes:
    payload = {"format": fmt, "version": KEY_VERSION, "name": name, "x25519": key.hex()}
    return (json.dumps(payload) + "\n").encode("ascii")


class RecipientPublicKey:
    """Whom a file is sealed to: a name and an X25519 public key."""

    __slots__ = ("_key", "name", "raw")

    def __init__(self, raw: bytes, name: str) -> None:
        if not isinstance(raw, bytes) or len(raw) != 32:
            raise ValueError("an X25519 public key is exactly 32 bytes")
        self.raw = raw
        self.name = _check_name(name)
        self._key = x25519.X25519PublicKey.from_public_bytes(raw)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the raw public key (hex): what sealed files and attestation
        evidence name the recipient by."""
        return _fingerprint(self.raw)

    @property
    def key(self) -> x25519.X25519PublicKey:
        return self._key

    def __repr__(self) -> str:
        return f"RecipientPublicKey(name={self.name!r}, fingerprint={self.fingerprint[:16]})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecipientPublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        atomic_write_bytes(path, _dump(PUBLIC_KEY_FORMAT, self.name, self.raw),
                           overwrite=overwrite)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RecipientPublicKey:
        path = Path(path)
        try:
            if path.stat().st_size > _MAX_FILE_BYTES:
                raise RecipientKeyError(f"public key {path} is too large to be a key file")
            raw = path.read_bytes()
        except FileNotFoundError:
            raise RecipientKeyError(f"public key {path} does not exist") from None
        except IsADirectoryError:
            raise RecipientKeyError(f"public key {path} is a folder, not a file") from None
        except OSError as exc:
            raise RecipientKeyError(f"public key {path} cannot be read: {exc.strerror}") from None
        if raw.lstrip().startswith(b'{"format": "' + PRIVATE_KEY_FORMAT.encode()):
            raise RecipientKeyError(f"public key {path} is a PRIVATE key file; pass the .pub "
                                    "file (and keep the .key file secret)")
        name, key = _parse(raw, path, "public key", PUBLIC_KEY_FORMAT)
        return cls(key, name)


class RecipientPrivateKey:
    """The secret half of a recipient key pair; never shown in ``repr`` or logs."""

    __slots__ = ("_key", "name")

    def __init__(self, key: x25519.X25519PrivateKey, name: str) -> None:
        self._key = key
        self.name = _check_name(name)

    @classmethod
    def generate(cls, name: str) -> RecipientPrivateKey:
        """A fresh key pair from the operating system's CSPRNG."""
        return cls(x25519.X25519PrivateKey.generate(), name)

    def public_key(self) -> RecipientPublicKey:
        raw = self._key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        return RecipientPublicKey(raw, self.name)

    @property
    def key(self) -> x25519.X25519PrivateKey:
        return self._key

    def __repr__(self) -> str:
        return f"RecipientPrivateKey(name={self.name!r}, " \
               f"fingerprint={self.public_key().fingerprint[:16]})"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("RecipientPrivateKey cannot be pickled; save it with .save(path)")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the secret key atomically, readable by its owner only (mode 0600)."""
        raw = self._key.private_bytes(_RAW, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption())
        atomic_write_bytes(path, _dump(PRIVATE_KEY_FORMAT, self.name, raw), mode=0o600,
                           overwrite=overwrite)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RecipientPrivateKey:
        """Read a key written by :meth:`save`; refuses a file other users can open."""
        path = Path(path)
        raw = read_secret_file(path, "private key", error=RecipientKeyError,
                               max_bytes=_MAX_FILE_BYTES)
        name, key = _parse(raw, path, "private key", PRIVATE_KEY_FORMAT)
        return cls(x25519.X25519PrivateKey.from_private_bytes(key), name)


def generate_recipient(prefix: str | os.PathLike, *, name: str | None = None,
                       overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new pair as ``PREFIX.pub`` and ``PREFIX.key`` (named after the prefix's
    file name unless ``name``); refuses to replace existing files unless ``overwrite``.
    Returns ``(public path, private path)``."""
    prefix = Path(prefix)
    public_path = prefix.with_name(prefix.name + ".pub")
    private_path = prefix.with_name(prefix.name + ".key")
    if not overwrite:
        for path in (public_path, private_path):
            if path.exists():
                raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    private = RecipientPrivateKey.generate(name or prefix.name)
    private.save(private_path, overwrite=overwrite)
    private.public_key().save(public_path, overwrite=overwrite)
    return public_path, private_path
