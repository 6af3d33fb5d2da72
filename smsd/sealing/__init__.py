"""Sealed files: shards and bodies that only their recipients can open.

* :mod:`.keys` — recipient key pairs (X25519), ``smsd keygen --recipient NAME``.
* :mod:`.stream` — the sealed format: HPKE-wrapped file key, AEAD chunks (STREAM).
* :mod:`.files` — sealed safetensors files (shards, bodies), opened in memory.
* :mod:`.attestation` — ``--require-attestation``: seal only to an attested key.
"""

from __future__ import annotations

from .files import open_maybe_sealed, open_sealed, seal_file, seal_tensors
from .keys import RecipientKeyError, RecipientPrivateKey, RecipientPublicKey, generate_recipient
from .stream import SealedFileError, SealedHeader, is_sealed, read_sealed_header

__all__ = ["RecipientKeyError", "RecipientPrivateKey", "RecipientPublicKey", "SealedFileError",
           "SealedHeader", "generate_recipient", "is_sealed", "open_maybe_sealed", "open_sealed",
           "read_sealed_header", "seal_file", "seal_tensors"]
