"""The permutation key stays in its key file: a whole protocol run through the CLI
(keygen → encode → pretrain with checkpoints → finetune → evaluate, debug logging on)
writes it to no other file and prints or logs it nowhere, in raw, hex or base64 form."""

from __future__ import annotations

import base64
import logging
import stat
from pathlib import Path

import pytest
from image_files import write_separable_folder

from smsd.cli import main
from smsd.crypto import PermutationKey
from smsd.models import model_config
from smsd.protocol.client import Client

MODEL_ARGS = ["--img-size", "16", "--patch-size", "4", "--in-chans", "1"]


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_separable_folder(tmp_path / "data", per_class=4)


def secret_forms(secret: bytes) -> dict[str, list[bytes]]:
    """Byte patterns that would betray the key: its 8-byte windows raw and in hex, and
    the whole key in the usual text encodings."""
    windows = [secret[i:i + 8] for i in range(len(secret) - 7)]
    return {
        "raw": windows,
        "hex": [w.hex().encode() for w in windows] + [w.hex().upper().encode() for w in windows],
        "base64": [base64.b64encode(secret), base64.b64encode(secret).rstrip(b"="),
                   base64.urlsafe_b64encode(secret).rstrip(b"="), base64.b32encode(secret)],
    }


def leaks(blob: bytes, forms: dict[str, list[bytes]]) -> list[str]:
    return [form for form, patterns in forms.items() if any(p in blob for p in patterns)]


def test_key_is_in_no_file_log_or_output(tmp_path, folder, capfd, caplog):
    key, shard = tmp_path / "client.key", tmp_path / "shard.safetensors"
    body, model, work = tmp_path / "body.safetensors", tmp_path / "model.safetensors", \
        tmp_path / "work"
    with caplog.at_level(logging.DEBUG):
        assert main(["-v", "keygen", "--out", str(key)]) == 0
        assert main(["-v", "encode", "--data", str(folder), "--key", str(key), "--out",
                     str(shard), *MODEL_ARGS]) == 0
        assert main(["-v", "pretrain", "--shards", str(shard), "--out", str(body), "--epochs",
                     "2", "--checkpoint-every", "1", "--work-dir", str(work), "--batch-size",
                     "4", "--out-dim", "32", "--hidden-dim", "16", "--bottleneck-dim", "8",
                     "--warmup-epochs", "0", "--local-keep", "0.25", *MODEL_ARGS]) == 0
        assert main(["-v", "finetune", "--body", str(body), "--data", str(folder), "--out",
                     str(model), "--epochs", "1", "--batch-size", "4"]) == 0
        assert main(["-v", "evaluate", "--model", str(model), "--data", str(folder)]) == 0
        # Error paths after the key is loaded: messages must not carry it either.
        (folder / "zero" / "broken.png").write_bytes(b"not an image")
        assert main(["encode", "--data", str(folder), "--key", str(key), "--out",
                     str(tmp_path / "again.safetensors"), *MODEL_ARGS]) == 2
    out = capfd.readouterr()

    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    loaded = PermutationKey.load(key)
    forms = secret_forms(loaded._secret)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != key]
    assert {shard, body, model} <= set(written)
    assert any(p.parent == work for p in written), "pretraining wrote no checkpoint"
    found = {str(p): leaks(p.read_bytes(), forms) for p in written}
    assert not {p: f for p, f in found.items() if f}, found
    texts = {"stdout": out.out, "stderr": out.err, "log": caplog.text,
             "repr": repr(loaded) + str(loaded) + repr(Client(model_config("demo"), loaded))}
    found = {name: leaks(text.encode(), forms) for name, text in texts.items()}
    assert not {n: f for n, f in found.items() if f}, found
    assert "accuracy" in out.out and str(folder / "zero" / "broken.png") in out.err
    assert len(written) >= 5


def test_the_search_finds_a_planted_key():
    """The leak search is not vacuous: each form of the key is found where planted."""
    secret = PermutationKey.generate()._secret
    forms = secret_forms(secret)
    assert leaks(b"xx" + secret[3:15] + b"yy", forms) == ["raw"]
    assert leaks(f"key={secret.hex()}".encode(), forms) == ["hex"]
    assert leaks(b"k: " + base64.b64encode(secret), forms) == ["base64"]


def test_cli_refuses_a_readable_key(tmp_path, folder, capsys):
    key = tmp_path / "client.key"
    assert main(["keygen", "--out", str(key)]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for mode in (0o640, 0o604, 0o660):
        key.chmod(mode)
        assert main(["encode", "--data", str(folder), "--key", str(key), "--out",
                     str(tmp_path / "s.safetensors"), *MODEL_ARGS]) == 2
        err = capsys.readouterr().err
        assert f"chmod 600 {key}" in err and "Traceback" not in err
    assert not (tmp_path / "s.safetensors").exists()


def test_repr_and_str_depend_on_no_byte_of_the_secret():
    """Flip any one byte of a key: its repr changes only in the fingerprint (a hash), so
    not one byte of the secret is shown, in any encoding."""
    base = PermutationKey.generate()
    shown = repr(base).replace(base.fingerprint, "")
    for i in range(len(base._secret)):
        flipped = bytearray(base._secret)
        flipped[i] ^= 0xFF
        other = PermutationKey(bytes(flipped))
        assert other.fingerprint != base.fingerprint
        assert repr(other).replace(other.fingerprint, "") == shown, f"byte {i} shows"
        assert str(other).replace(other.fingerprint, "") == shown
