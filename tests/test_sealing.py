"""Sealed files: recipient keys, the chunked format, sealed shards and bodies."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from smsd.models import ViTBody, ViTConfig
from smsd.protocol.body_io import BodyFileError, load_body, save_body
from smsd.protocol.shard import ShardError, inspect_shard, read_shard, write_shard
from smsd.sealing import (
    RecipientKeyError,
    RecipientPrivateKey,
    RecipientPublicKey,
    SealedFileError,
    generate_recipient,
    read_sealed_header,
)
from smsd.sealing.files import seal_file, seal_tensors
from smsd.sealing.stream import AEADS, MAGIC, TAG_BYTES, SealWriter, unseal_into

FINGERPRINT = "cd" * 32


@pytest.fixture
def pair(tmp_path):
    public, private = generate_recipient(tmp_path / "server")
    return RecipientPublicKey.load(public), RecipientPrivateKey.load(private)


def _seal(path, data: bytes, recipients, *, chunk_bytes=1024, aead="aes-256-gcm",
          public=None, piece=777):
    with open(path, "wb") as handle:
        writer = SealWriter(handle, recipients, plaintext_bytes=len(data), content="test",
                            public=public or {"n": len(data)}, aead=aead,
                            chunk_bytes=chunk_bytes)
        for start in range(0, len(data), piece):
            writer.write(data[start:start + piece])
        writer.close()
    return path


def _open(path, key) -> bytes:
    return bytes(unseal_into(read_sealed_header(path), key))


# ------------------------------------------------------------------ keys
def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path):
    public, private = generate_recipient(tmp_path / "site")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = RecipientPrivateKey.load(private)
    assert key.public_key() == RecipientPublicKey.load(public)
    assert key.name == "site"
    secret = json.loads(private.read_text())["x25519"]
    assert secret not in repr(key) and secret not in str(key)
    with pytest.raises(FileExistsError):
        generate_recipient(tmp_path / "site")


def test_a_private_key_other_users_can_open_is_refused(tmp_path):
    _, private = generate_recipient(tmp_path / "site")
    os.chmod(private, 0o644)
    with pytest.raises(RecipientKeyError, match="chmod 600"):
        RecipientPrivateKey.load(private)


@pytest.mark.parametrize("case", ["swapped", "garbage", "missing", "bad hex"])
def test_malformed_key_files_are_named(tmp_path, case):
    public, private = generate_recipient(tmp_path / "site")
    if case == "swapped":  # a .key given where a .pub is expected, and back
        with pytest.raises(RecipientKeyError, match="PRIVATE"):
            RecipientPublicKey.load(private)
        with pytest.raises(RecipientKeyError, match=str(public)):
            os.chmod(public, 0o600)
            RecipientPrivateKey.load(public)
        return
    target = tmp_path / "bad.pub"
    if case == "garbage":
        target.write_bytes(b"\x00\xff not json")
    elif case == "bad hex":
        payload = json.loads(public.read_text())
        payload["x25519"] = "zz" * 32
        target.write_text(json.dumps(payload))
    with pytest.raises(RecipientKeyError, match=str(target)):
        RecipientPublicKey.load(target)


def test_a_key_pair_cannot_be_pickled(pair):
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(pair[1])


# ---------------------------------------------------------------- format
@pytest.mark.parametrize("aead", sorted(AEADS))
@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 3072, 5000])
def test_round_trip_at_chunk_boundaries(tmp_path, pair, aead, size):
    data = os.urandom(size)
    path = _seal(tmp_path / "x.sealed", data, [pair[0]], aead=aead)
    header = read_sealed_header(path)
    assert header.chunks == max(1, -(-size // 1024))
    assert path.stat().st_size == header.data_start + size + TAG_BYTES * header.chunks
    assert _open(path, pair[1]) == data


def test_every_recipient_and_nobody_else_opens_it(tmp_path, pair):
    other = RecipientPrivateKey.generate("client")
    stranger = RecipientPrivateKey.generate("stranger")
    data = os.urandom(3000)
    path = _seal(tmp_path / "x.sealed", data, [pair[0], other.public_key()])
    assert _open(path, pair[1]) == data == _open(path, other)
    with pytest.raises(SealedFileError, match="is not sealed to private key 'stranger'"):
        _open(path, stranger)


def test_the_same_content_seals_differently_each_time(tmp_path, pair):
    data = os.urandom(2000)
    a = _seal(tmp_path / "a", data, [pair[0]]).read_bytes()
    b = _seal(tmp_path / "b", data, [pair[0]]).read_bytes()
    assert a != b and data not in a


def _chunks(path):
    header = read_sealed_header(path)
    raw = path.read_bytes()
    head, body = raw[:header.data_start], raw[header.data_start:]
    step = header.chunk_bytes + TAG_BYTES
    return head, [body[i:i + step] for i in range(0, len(body), step)]


@pytest.mark.parametrize("attack", ["reorder", "duplicate", "drop last", "splice",
                                    "other header", "extend", "truncate"])
def test_reordered_spliced_cut_or_extended_files_fail(tmp_path, pair, attack):
    data = os.urandom(4096)
    path = _seal(tmp_path / "x.sealed", data, [pair[0]])
    twin = _seal(tmp_path / "y.sealed", data, [pair[0]])
    head, chunks = _chunks(path)
    twin_head, twin_chunks = _chunks(twin)
    forged = {
        "reorder": head + b"".join([chunks[1], chunks[0], *chunks[2:]]),
        "duplicate": head + b"".join([chunks[0], chunks[0], *chunks[2:]]),
        "drop last": head + b"".join(chunks[:-1]),
        "splice": head + b"".join([chunks[0], twin_chunks[1], *chunks[2:]]),
        "other header": twin_head + b"".join(chunks),
        "extend": head + b"".join(chunks) + b"\x00" * 16,
        "truncate": head + b"".join(chunks)[:-1],
    }[attack]
    bad = tmp_path / "forged.sealed"
    bad.write_bytes(forged)
    with pytest.raises(SealedFileError, match=str(bad)):
        _open(bad, pair[1])


def test_a_flipped_bit_anywhere_fails(tmp_path, pair):
    data = os.urandom(1500)
    path = _seal(tmp_path / "x.sealed", data, [pair[0]])
    raw = path.read_bytes()
    bad = tmp_path / "flipped.sealed"
    failures = 0
    for position in range(len(raw)):
        bad.write_bytes(raw[:position] + bytes([raw[position] ^ 0x01]) + raw[position + 1:])
        with pytest.raises(SealedFileError, match=str(bad)):
            _open(bad, pair[1])
        failures += 1
    assert failures == len(raw)


def test_the_writer_refuses_content_of_another_size(tmp_path, pair):
    with open(tmp_path / "x", "wb") as handle:
        writer = SealWriter(handle, [pair[0]], plaintext_bytes=10, content="t", public={})
        writer.write(b"12345")
        with pytest.raises(ValueError, match="short"):
            writer.close()
        with pytest.raises(ValueError, match="more content"):
            writer.write(b"123456")


def test_not_a_sealed_file(tmp_path, pair):
    path = tmp_path / "plain"
    path.write_bytes(b"not sealed at all")
    with pytest.raises(SealedFileError, match="not a sealed smsd file"):
        read_sealed_header(path)
    assert path.read_bytes().startswith(MAGIC) is False


# ---------------------------------------------------------- shards, bodies
def _tokens(n=5, grid=2, dim=8):
    return torch.randn(n, grid * grid, dim)


def test_a_sealed_shard_reads_as_the_clear_one(tmp_path, pair):
    tokens = _tokens()
    clear = write_shard(tmp_path / "clear.safetensors", tokens, head_fingerprint=FINGERPRINT,
                        grid=2)
    sealed = write_shard(tmp_path / "s.sealed", tokens, head_fingerprint=FINGERPRINT, grid=2,
                         seal_to=[pair[0]])
    assert torch.equal(read_shard(sealed, key=pair[1]), read_shard(clear))
    info = inspect_shard(sealed, head_fingerprint=FINGERPRINT, grid=2)  # no key needed
    assert info.count == 5
    with pytest.raises(ShardError, match="--unseal-key"):
        read_shard(sealed)
    with pytest.raises(ShardError, match="different head"):
        inspect_shard(sealed, head_fingerprint="ef" * 32)


def test_the_sealed_content_is_a_safetensors_file_safetensors_reads(tmp_path, pair):
    """An independent decoder (the safetensors library) reads the unsealed bytes."""
    from safetensors.torch import load

    tokens = _tokens().half()
    sealed = write_shard(tmp_path / "s.sealed", tokens, head_fingerprint=FINGERPRINT, grid=2,
                         seal_to=[pair[0]])
    clear = _open(sealed, pair[1])
    assert torch.equal(load(clear)["tokens"], tokens)


def test_a_public_header_that_lies_is_refused(tmp_path, pair):
    """A sealer whose public header differs from the sealed content's own header."""
    tokens = _tokens()
    good = write_shard(tmp_path / "s.sealed", tokens, head_fingerprint=FINGERPRINT, grid=2,
                       seal_to=[pair[0]])
    clear = _open(good, pair[1])
    public = dict(read_sealed_header(good).public)
    public["metadata"] = dict(public["metadata"], head_fingerprint="ef" * 32)
    liar = tmp_path / "liar.sealed"
    with open(liar, "wb") as handle:
        writer = SealWriter(handle, [pair[0]], plaintext_bytes=len(clear),
                            content="smsd-token-shard", public=public)
        writer.write(clear)
        writer.close()
    with pytest.raises(ShardError, match="differs from its public header"):
        read_shard(liar, key=pair[1])


def test_a_shard_sealed_as_a_body_is_refused(tmp_path, pair):
    shard = write_shard(tmp_path / "s.sealed", _tokens(), head_fingerprint=FINGERPRINT, grid=2,
                        seal_to=[pair[0]])
    with pytest.raises(BodyFileError, match="expected a 'smsd-vit-body'"):
        load_body(shard, key=pair[1])


def test_a_sealed_body_round_trips(tmp_path, pair):
    config = ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1,
                       num_heads=2, mlp_ratio=2.0)
    body = ViTBody(config)
    path = save_body(tmp_path / "b.sealed", body, head_fingerprint=FINGERPRINT,
                     seal_to=[pair[0]])
    loaded, _, fingerprint = load_body(path, key=pair[1])
    assert fingerprint == FINGERPRINT
    for name, tensor in body.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    with pytest.raises(BodyFileError, match="--unseal-key"):
        load_body(path)


def test_seal_file_streams_an_existing_shard(tmp_path, pair):
    from smsd.safe_files import read_header

    clear = write_shard(tmp_path / "clear.safetensors", _tokens(40), grid=2,
                        head_fingerprint=FINGERPRINT)
    out = seal_file(clear, tmp_path / "s.sealed", [pair[0]], chunk_bytes=1024,
                    read_header=lambda p: read_header(p, "shard"))
    assert read_sealed_header(out).chunks > 1
    assert torch.equal(read_shard(out, key=pair[1]), read_shard(clear))


def test_sealing_twice_to_one_recipient_is_an_error(tmp_path, pair):
    with pytest.raises(ValueError, match="twice"):
        seal_tensors(tmp_path / "x", {"t": torch.ones(2)}, {}, [pair[0], pair[0]])
