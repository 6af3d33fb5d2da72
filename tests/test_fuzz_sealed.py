"""Hostile sealed files: every corruption of a sealed shard or body fails authentication
in the loader's own error naming the file, never another exception, and nothing is
accepted. The cases run are counted in the "fuzz cases run" section of the test output
(``make test`` fails below the targets in ``tests/conftest.py``); ``SMSD_FUZZ_EXAMPLES``
sets the cases per corruption and file kind (default 60)."""

from __future__ import annotations

import pytest
import torch
from fuzz_files import run_cases

from smsd.models import ViTBody, ViTConfig
from smsd.protocol.body_io import BodyFileError, load_body, save_body
from smsd.protocol.shard import ShardError, read_shard, write_shard
from smsd.sealing import RecipientPrivateKey

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

KEY = RecipientPrivateKey.generate("server")
CONFIG = ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2,
                   mlp_ratio=2.0)
KINDS = {
    "sealed shard": (lambda p: read_shard(p, key=KEY), ShardError),
    "sealed body": (lambda p: load_body(p, key=KEY), BodyFileError),
}


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("sealed")
    shard = write_shard(folder / "s", torch.randn(6, 4, 8), head_fingerprint="ab" * 32, grid=2,
                        seal_to=[KEY.public_key()])
    body = save_body(folder / "b", ViTBody(CONFIG), head_fingerprint="ab" * 32,
                     seal_to=[KEY.public_key()])
    return {"sealed shard": shard.read_bytes(), "sealed body": body.read_bytes()}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-sealed") / "input.sealed"


def _must_fail(kind: str, path, data: bytes) -> None:
    load, error = KINDS[kind]
    path.write_bytes(data)
    with pytest.raises(error) as info:
        load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_valid_sealed_files_load(valid, target, kind):
    target.write_bytes(valid[kind])
    KINDS[kind][0](target)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sealed_flipped_bytes(valid, target, kind, fuzz_count):
    data = valid[kind]

    def body(args):
        position, mask = args
        position %= len(data)
        flipped = data[:position] + bytes([data[position] ^ mask]) + data[position + 1:]
        _must_fail(kind, target, flipped)

    run_cases("sealed flipped bytes", kind,
         st.tuples(st.integers(0, 10**9), st.integers(1, 255)), body, fuzz_count)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sealed_truncated_or_extended(valid, target, kind, fuzz_count):
    data = valid[kind]

    def body(args):
        cut, tail = args
        _must_fail(kind, target, data[:cut % len(data)] if not tail else data + tail)

    run_cases("sealed truncated/extended", kind,
         st.tuples(st.integers(0, 10**9), st.binary(max_size=64)), body, fuzz_count)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sealed_random_bytes_after_the_mark(target, kind, fuzz_count):
    run_cases("sealed random bytes", kind, st.binary(max_size=512),
         lambda b: _must_fail(kind, target, b"SMSDSEAL" + b), fuzz_count)
