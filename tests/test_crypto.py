"""smsd.crypto: key files, keyed permutations, secrecy of the key."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys

import pytest
import torch

from smsd.crypto import PermutationKey, invert
from smsd.errors import KeyFileError

FIXED = PermutationKey(bytes(range(32)))


def test_generate_is_random_and_32_bytes():
    a, b = PermutationKey.generate(), PermutationKey.generate()
    assert a != b
    assert len(a._secret) == 32


def test_save_load_roundtrip_with_mode_0600(tmp_path):
    key = PermutationKey.generate()
    path = key.save(tmp_path / "client.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert PermutationKey.load(path) == key
    assert [p.name for p in tmp_path.iterdir()] == ["client.key"]  # no temp file left


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "k"
    first = PermutationKey.generate()
    first.save(path)
    with pytest.raises(FileExistsError):
        PermutationKey.generate().save(path)
    assert PermutationKey.load(path) == first
    second = PermutationKey.generate()
    second.save(path, overwrite=True)
    assert PermutationKey.load(path) == second


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_load_refuses_files_others_can_access(tmp_path, mode):
    path = PermutationKey.generate().save(tmp_path / "k")
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        PermutationKey.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (json.dumps({"format": "other", "version": 1, "key": "00" * 32}).encode(), "format"),
        (json.dumps({"format": "smsd-permutation-key", "version": 2, "key": "00" * 32}).encode(),
         "version 2"),
        (json.dumps({"format": "smsd-permutation-key", "version": 1, "key": "00" * 31}).encode(),
         "malformed key"),
        (json.dumps({"format": "smsd-permutation-key", "version": 1, "key": "zz" * 32}).encode(),
         "malformed key"),
        (json.dumps([1, 2]).encode(), "format"),
        (b"x" * 5000, "not a key file"),
    ],
)
def test_load_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match=message) as info:
        PermutationKey.load(path)
    assert str(path) in str(info.value)


def test_load_missing_file_and_folder(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        PermutationKey.load(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="not a regular file"):
        PermutationKey.load(tmp_path)


def test_key_never_appears_in_repr_str_or_errors(tmp_path):
    key = PermutationKey.generate()
    secret_hex = key._secret.hex()
    assert secret_hex not in repr(key) and secret_hex not in str(key)
    assert key.fingerprint in repr(key)
    with pytest.raises(TypeError) as info:
        pickle.dumps(key)
    assert secret_hex not in str(info.value)
    path = key.save(tmp_path / "k")
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError) as info:
        PermutationKey.load(path)
    assert secret_hex not in str(info.value)
    with pytest.raises(ValueError) as info:
        key.permutations([-1], 5)
    assert secret_hex not in str(info.value)


def test_permutations_are_valid_keyed_and_reproducible():
    key = PermutationKey.generate()
    perms = key.permutations(range(50), 197)
    assert perms.shape == (50, 197) and perms.dtype == torch.int64
    assert torch.equal(perms.sort(1).values, torch.arange(197).expand(50, -1))
    assert torch.equal(perms, key.permutations(list(range(50)), 197))
    assert len({tuple(p.tolist()) for p in perms}) == 50
    assert not torch.equal(perms, PermutationKey.generate().permutations(range(50), 197))
    single = key.permutations([7], 197)
    assert torch.equal(single[0], perms[7])  # a client recomputes one image without the rest


def test_ids_of_different_types_are_distinct():
    perms = FIXED.permutations([1, "1", b"1"], 64)
    assert len({tuple(p.tolist()) for p in perms}) == 3


def test_tensor_ids_and_device():
    a = FIXED.permutations(torch.tensor([3, 4]), 10, device="cpu")
    assert torch.equal(a, FIXED.permutations([3, 4], 10))


def test_derivation_is_pinned():
    """Changing the derivation would strand every client's encoded data: pin it."""
    expected = [[6, 2, 4, 7, 3, 0, 5, 1], [5, 4, 0, 2, 1, 3, 7, 6]]  # computed independently
    assert FIXED.permutations([0, "scan-1"], 8).tolist() == expected


def test_positions_are_close_to_uniform():
    """Token 0 lands in each of 8 slots ~1/8 of the time over 4000 ids (5 sigma)."""
    perms = FIXED.permutations(range(4000), 8)
    slots = (perms == 0).double().argmax(1)
    counts = torch.bincount(slots, minlength=8).double()
    mean, sd = 4000 / 8, (4000 * (1 / 8) * (7 / 8)) ** 0.5
    assert ((counts - mean).abs() < 5 * sd).all()


def test_same_permutation_in_another_process(tmp_path):
    path = FIXED.save(tmp_path / "k")
    code = (
        "import sys; from smsd.crypto import PermutationKey;"
        "print(PermutationKey.load(sys.argv[1]).permutations([11], 12).tolist())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, check=True, env=env)
    assert out.stdout.strip() == str(FIXED.permutations([11], 12).tolist())


@pytest.mark.parametrize(
    ("ids", "n", "error"),
    [([True], 5, TypeError), ([1.5], 5, TypeError), ([-3], 5, ValueError),
     ("abc", 5, TypeError), ([1], 0, ValueError), ([1], True, ValueError)],
)
def test_bad_permutation_arguments(ids, n, error):
    with pytest.raises(error):
        FIXED.permutations(ids, n)


def test_invert():
    perms = FIXED.permutations(range(5), 33)
    inv = invert(perms)
    assert torch.equal(torch.gather(perms, 1, inv), torch.arange(33).expand(5, -1))
    assert torch.equal(torch.gather(inv, 1, perms), torch.arange(33).expand(5, -1))
    assert torch.equal(invert(perms[0].int()), perms[0].argsort().int())
    with pytest.raises(TypeError):
        invert(perms.float())
