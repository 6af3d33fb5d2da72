"""The sealed file format: hybrid public-key encryption, streamed in authenticated chunks.

Nothing here is a new primitive; the parts are standard and come from ``cryptography``:

* a fresh random 256-bit *file key* encrypts the content;
* the file key is wrapped for each recipient with HPKE (RFC 9180, base mode:
  DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, and the file's AEAD), so only the holder of
  a recipient's private key can recover it;
* the content is split into chunks of ``chunk_bytes``, each sealed with the AEAD
  (AES-256-GCM, or ChaCha20-Poly1305 for CPUs without AES instructions) in the STREAM
  construction (Hoang, Reyhanitabar, Rogaway and Vizár, CRYPTO 2015; as in age and
  Tink): chunk ``i``'s nonce is ``i`` as 11 big-endian bytes followed by a final-chunk
  flag byte, and its associated data is the SHA-256 of the whole public header.

So a flipped bit anywhere, a truncated or extended file, chunks reordered, duplicated
or taken from another file, and a header edited or taken from another file all fail
authentication; a file is only ever used after every chunk has verified.

Layout: ``b"SMSDSEAL"``, the header's length (4 bytes, little-endian), the header
(UTF-8 JSON, public: what the content is, its public metadata, its size, the chunk
size, the AEAD and one wrapped file key per recipient), then the sealed chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ..errors import SmsdError
from .keys import RecipientPrivateKey, RecipientPublicKey

__all__ = ["AEADS", "DEFAULT_CHUNK_BYTES", "MAGIC", "SealWriter", "SealedFileError",
           "SealedHeader", "is_sealed", "read_sealed_header", "unseal_chunks", "unseal_into"]

MAGIC = b"SMSDSEAL"
SEALED_FORMAT = "smsd-sealed"
SEALED_VERSION = 1
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 1 << 10, 1 << 26
MAX_HEADER_BYTES = 1 << 20
MAX_RECIPIENTS = 256
TAG_BYTES = 16
# name → (the chunk cipher, the same AEAD inside HPKE)
AEADS = {"aes-256-gcm": (AESGCM, hpke.AEAD.AES_256_GCM),
         "chacha20-poly1305": (ChaCha20Poly1305, hpke.AEAD.CHACHA20_POLY1305)}
_HEADER_FIELDS = {"format", "version", "aead", "chunk_bytes", "plaintext_bytes", "content",
                  "public", "recipients"}
_WRAP_INFO = b"smsd/sealed-file/v1/file-key"


class SealedFileError(SmsdError, ValueError):
    """A sealed file is missing, malformed, tampered with, or not sealed to this key."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"sealed file {path} {problem}")
        self.path, self.problem = Path(path), problem


def _suite(aead: str) -> hpke.Suite:
    return hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, AEADS[aead][1])


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _chunk_count(plaintext_bytes: int, chunk_bytes: int) -> int:
    return max(1, -(-plaintext_bytes // chunk_bytes))


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _wrap_context(header: dict, fingerprint: str) -> bytes:
    """HPKE ``info`` for one recipient: the header without the wrapped keys (which
    cannot contain themselves) and the recipient. The chunks bind the whole header."""
    public = {k: v for k, v in header.items() if k != "recipients"}
    return _WRAP_INFO + hashlib.sha256(_canonical(public)).digest() + fingerprint.encode()


@dataclass(frozen=True)
class SealedHeader:
    """The public header of a sealed file (readable without any key)."""

    path: Path
    aead: str
    chunk_bytes: int
    plaintext_bytes: int
    content: str
    public: dict
    recipients: tuple[dict, ...]
    data_start: int
    digest: bytes  # SHA-256 of the header bytes: every chunk's associated data

    @property
    def chunks(self) -> int:
        return _chunk_count(self.plaintext_bytes, self.chunk_bytes)

    @property
    def file_size(self) -> int:
        return self.data_start + self.plaintext_bytes + TAG_BYTES * self.chunks

    def fail(self, problem: str) -> SealedFileError:
        return SealedFileError(self.path, problem)

    def recipient_names(self) -> str:
        return ", ".join(f"{r['name']} ({r['fingerprint'][:16]}…)" for r in self.recipients)


class SealWriter:
    """Seal ``plaintext_bytes`` bytes, written in any pieces, to ``handle``.

    Args:
        handle: a binary file open for writing (:func:`smsd.io.atomic_write` gives one
            that appears only once complete).
        recipients: whose private keys can open the file (at least one).
        plaintext_bytes: the exact size of the content (the header states it).
        content: what the content is (its own format name, e.g. ``"smsd-token-shard"``).
        public: public facts about the content, authenticated with it (e.g. its
            safetensors header), a JSON-serializable dict.
        aead: ``"aes-256-gcm"`` or ``"chacha20-poly1305"``.
        chunk_bytes: plaintext bytes per authenticated chunk.
    """

    def __init__(self, handle: BinaryIO, recipients: Sequence[RecipientPublicKey], *,
                 plaintext_bytes: int, content: str, public: dict,
                 aead: str = "aes-256-gcm", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if aead not in AEADS:
            raise ValueError(f"aead must be one of {sorted(AEADS)}, got {aead!r}")
        if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
        if not isinstance(plaintext_bytes, int) or plaintext_bytes < 0:
            raise ValueError(f"plaintext_bytes must be an int >= 0, got {plaintext_bytes!r}")
        if not recipients or len(recipients) > MAX_RECIPIENTS:
            raise ValueError(f"seal to 1 to {MAX_RECIPIENTS} recipients, got {len(recipients)}")
        if len({r.raw for r in recipients}) != len(recipients):
            raise ValueError("the same recipient is named twice")
        file_key = os.urandom(32)  # the OS CSPRNG; both AEADs take 256-bit keys
        header = {"format": SEALED_FORMAT, "version": SEALED_VERSION, "aead": aead,
                  "chunk_bytes": chunk_bytes, "plaintext_bytes": plaintext_bytes,
                  "content": content, "public": public, "recipients": []}
        suite = _suite(aead)
        header["recipients"] = [
            {"name": r.name, "fingerprint": r.fingerprint,
             "wrapped_key": suite.encrypt(file_key, r.key,
                                          info=_wrap_context(header, r.fingerprint)).hex()}
            for r in recipients]
        raw = _canonical(header)
        if len(raw) > MAX_HEADER_BYTES:
            raise ValueError(f"the public header is {len(raw)} bytes (limit {MAX_HEADER_BYTES})")
        self._handle = handle
        self._cipher = AEADS[aead][0](file_key)
        self._ad = hashlib.sha256(raw).digest()
        self._chunk_bytes = chunk_bytes
        self._remaining = plaintext_bytes
        self._chunks = _chunk_count(plaintext_bytes, chunk_bytes)
        self._index = 0
        self._buffer = bytearray()
        self._out = bytearray(chunk_bytes + TAG_BYTES)
        handle.write(MAGIC + len(raw).to_bytes(4, "little") + raw)

    def _emit(self, data) -> None:
        last = self._index == self._chunks - 1
        out = memoryview(self._out)[:len(data) + TAG_BYTES]
        self._cipher.encrypt_into(_nonce(self._index, last), data, self._ad, out)
        self._handle.write(out)
        self._index += 1

    def write(self, data) -> None:
        """Add the next bytes of the content (any bytes-like object)."""
        view = memoryview(data).cast("B")
        if len(view) > self._remaining:
            raise ValueError(f"more content than the {self._remaining} bytes still declared")
        self._remaining -= len(view)
        # A chunk goes out once full, except the last one, which close() seals.
        while len(view):
            if not self._buffer and len(view) >= self._chunk_bytes and \
                    self._index < self._chunks - 1:
                self._emit(view[:self._chunk_bytes])
                view = view[self._chunk_bytes:]
                continue
            take = min(len(view), self._chunk_bytes - len(self._buffer))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == self._chunk_bytes and self._index < self._chunks - 1:
                self._emit(self._buffer)
                self._buffer.clear()

    def close(self) -> None:
        """Seal the final chunk; the content must have been written in full."""
        if self._remaining:
            raise ValueError(f"the content ended {self._remaining} bytes short of the "
                             "declared size")
        if self._index != self._chunks - 1:
            raise ValueError("close() called twice")
        self._emit(self._buffer)
        self._buffer.clear()


def is_sealed(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a sealed file (reads 8 bytes; False if unreadable)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _parse_header(raw: bytes, path: Path, data_start: int) -> SealedHeader:
    def fail(problem: str) -> SealedFileError:
        return SealedFileError(path, problem)

    try:
        header = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise fail("has a malformed header (not ASCII JSON)") from None
    if not isinstance(header, dict) or set(header) != _HEADER_FIELDS:
        raise fail("has a malformed header (unexpected or missing fields)")
    if _canonical(header) != raw:  # one byte string per header: nothing to re-interpret
        raise fail("has a header that is not in canonical form")
    if header["format"] != SEALED_FORMAT or header["version"] != SEALED_VERSION:
        raise fail(f"has format {header['format']!r} version {header['version']!r}; this smsd "
                   f"reads {SEALED_FORMAT} version {SEALED_VERSION}")
    aead, chunk, size = header["aead"], header["chunk_bytes"], header["plaintext_bytes"]
    if aead not in AEADS:
        raise fail(f"names an unknown cipher {aead!r}")
    if not (type(chunk) is int and MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES
            and type(size) is int and size >= 0):
        raise fail("has a malformed chunk size or content size")
    recipients = header["recipients"]
    if not (isinstance(recipients, list) and 1 <= len(recipients) <= MAX_RECIPIENTS and all(
            isinstance(r, dict) and set(r) == {"name", "fingerprint", "wrapped_key"}
            and all(isinstance(v, str) for v in r.values()) for r in recipients)):
        raise fail("has a malformed recipient list")
    if not isinstance(header["content"], str) or not isinstance(header["public"], dict):
        raise fail("has a malformed content description")
    return SealedHeader(path, aead, chunk, size, header["content"], header["public"],
                        tuple(recipients), data_start, hashlib.sha256(raw).digest())


def read_sealed_header(path: str | os.PathLike) -> SealedHeader:
    """The public header of a sealed file, checked for form and for the file's size
    (authenticity is checked with the key, by :func:`unseal_chunks`)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(len(MAGIC) + 4)
            if prefix[:len(MAGIC)] != MAGIC:
                raise SealedFileError(path, "is not a sealed smsd file (no SMSDSEAL mark)")
            if len(prefix) < len(MAGIC) + 4:
                raise SealedFileError(path, "is truncated (no header)")
            n = int.from_bytes(prefix[len(MAGIC):], "little")
            if n > MAX_HEADER_BYTES or n > size - len(prefix):
                raise SealedFileError(path, f"is truncated or malformed (declares a {n}-byte "
                                      f"header in a {size}-byte file)")
            raw = handle.read(n)
    except FileNotFoundError:
        raise SealedFileError(path, "does not exist") from None
    except IsADirectoryError:
        raise SealedFileError(path, "is a folder, not a file") from None
    except OSError as exc:
        raise SealedFileError(path, f"cannot be read: {exc.strerror}") from None
    header = _parse_header(raw, path, len(MAGIC) + 4 + n)
    if size != header.file_size:
        raise header.fail(f"is truncated or extended: {size} bytes, its header implies "
                          f"{header.file_size}")
    return header


def _file_key(header: SealedHeader, key: RecipientPrivateKey) -> bytes:
    fingerprint = key.public_key().fingerprint
    stanza = next((r for r in header.recipients if r["fingerprint"] == fingerprint), None)
    if stanza is None:
        raise header.fail(f"is not sealed to private key {key.name!r} "
                          f"({fingerprint[:16]}…); it is sealed to {header.recipient_names()}")
    public = {"format": SEALED_FORMAT, "version": SEALED_VERSION, "aead": header.aead,
              "chunk_bytes": header.chunk_bytes, "plaintext_bytes": header.plaintext_bytes,
              "content": header.content, "public": header.public}
    try:
        wrapped = bytes.fromhex(stanza["wrapped_key"])
        return _suite(header.aead).decrypt(wrapped, key.key,
                                           info=_wrap_context(public, fingerprint))
    except (ValueError, InvalidTag):
        raise header.fail(f"cannot be opened with private key {key.name!r}: its key block "
                          "fails authentication (tampered header or wrong key)") from None


def unseal_chunks(header: SealedHeader, key: RecipientPrivateKey,
                  out: memoryview | None = None) -> Iterator[memoryview]:
    """Decrypt and verify the content chunk by chunk (memory: one chunk).

    Yields each verified chunk's plaintext; with ``out`` (a writable buffer of
    ``plaintext_bytes``) the chunks are decrypted into it in place. A consumer must
    treat the content as valid only once the iterator is exhausted: the last chunk's
    flag is what proves the file was not cut short.
    """
    cipher = AEADS[header.aead][0](_file_key(header, key))
    chunk_in = bytearray(header.chunk_bytes + TAG_BYTES)
    scratch = bytearray(header.chunk_bytes + TAG_BYTES) if out is None else None
    remaining, position = header.plaintext_bytes, 0
    try:
        with open(header.path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size != header.file_size:
                raise header.fail("changed while it was being read")
            handle.seek(header.data_start)
            for index in range(header.chunks):
                n = min(header.chunk_bytes, remaining)
                view = memoryview(chunk_in)[:n + TAG_BYTES]
                if handle.readinto(view) != n + TAG_BYTES:
                    raise header.fail("changed while it was being read (short read)")
                target = (memoryview(scratch) if out is None else out[position:])
                try:
                    cipher.decrypt_into(_nonce(index, index == header.chunks - 1), view,
                                        header.digest, target[:n])
                except InvalidTag:
                    raise header.fail(
                        f"fails authentication at chunk {index} of {header.chunks} "
                        "(corrupted, truncated, reordered, or spliced from another file)"
                    ) from None
                yield target[:n]
                remaining -= n
                position += n
    except OSError as exc:
        raise header.fail(f"cannot be read: {exc.strerror or exc}") from None


def unseal_into(header: SealedHeader, key: RecipientPrivateKey) -> bytearray:
    """The whole verified content in one buffer (no second copy of it is made)."""
    out = bytearray(header.plaintext_bytes)
    for _ in unseal_chunks(header, key, memoryview(out)):
        pass
    return out
